"""Serving a changed model: export (``torch.export``, AOTInductor, ONNX with and without a KV
cache), the decoding loops a serving stack runs (``decode``), and the cost model the serving
benchmark judges speed-ups against (``cost``), and GGUF files for llama.cpp (``llamacpp``, ``to_gguf``). Only the
GGUF export reads what extraction left in a model (it must write each layer's kept heads and constants
out); the rest does not depend on how a model was changed."""
from .decode import Decoded, decode, onnx_decode
from .export import aoti_package, decoder_to_onnx, export, export_decoder, to_onnx
from .llamacpp import to_gguf

__all__ = ["Decoded", "aoti_package", "decode", "decoder_to_onnx", "export", "export_decoder", "onnx_decode", "to_gguf",
           "to_onnx"]
