"""Serving a changed model: export (``torch.export``, AOTInductor, ONNX with and without a KV
cache), the decoding loops a serving stack runs (``decode``), and the cost model the serving
benchmark judges speed-ups against (``cost``). Nothing here depends on how a model was changed."""
from .decode import Decoded, decode, onnx_decode
from .export import aoti_package, decoder_to_onnx, export, export_decoder, to_onnx

__all__ = ["Decoded", "aoti_package", "decode", "decoder_to_onnx", "export", "export_decoder", "onnx_decode", "to_onnx"]
