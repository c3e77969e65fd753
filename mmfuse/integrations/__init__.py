"""Adapters that plug mmfuse's ops into other libraries.

Each submodule imports its library lazily (only when the submodule itself is imported), so
``import mmfuse`` never needs them:

- ``mmfuse.integrations.transformers``: ``attn_implementation="mmfuse"`` for Hugging Face
  transformers >= 5 (``pip install mmfuse[hf]``).
"""
