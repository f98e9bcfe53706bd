"""llama.cpp serving: GGUF files of Llama-family models, whole or extracted (``to_gguf``), and running
them through llama-cpp-python (``engine``). Needs the ``[gguf]`` extra."""
from .writer import to_gguf

__all__ = ["to_gguf"]
