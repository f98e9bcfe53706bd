"""llama.cpp serving: GGUF files of models whole or extracted (``to_gguf``: Llama-family models in the
``deci`` graph, removed parts left out; GPT-2, NeoX and Phi in their own graphs, removed parts zero-filled),
and running them through llama-cpp-python (``engine``). Needs the ``[gguf]`` extra."""
from .writer import to_gguf

__all__ = ["to_gguf"]
