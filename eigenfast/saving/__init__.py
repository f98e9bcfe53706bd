"""Saved models: safetensors + a JSON spec, never pickle (``serialization``); resolving a
``--model`` argument (``loading``); the module transformers runs for ``trust_remote_code``
(``hub_module``, copied into each save)."""
