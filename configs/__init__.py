"""Run configs: each module's ``get_config(arg)`` returns an ``ml_collections.ConfigDict``.

``bort-jax MODE --config=configs/NAME.py:ARG`` loads one; ``common`` holds what they share.
"""
