"""``mmfuse-bench``: every op against its peers on the device present (see ``cli.py``)."""
