"""Audio front-end configuration, below the ops: analysis windows and mel filterbanks
(``filterbanks``) and each front end's argument rules and presets (``configs``). Built in
float64 on the CPU, no kernels here."""
