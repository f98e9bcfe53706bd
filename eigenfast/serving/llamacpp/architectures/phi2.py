"""Phi as llama.cpp's ``phi2``: attention and FFN in parallel on one LayerNorm, partial rotary, an LM head with a bias."""
from __future__ import annotations

from typing import Any

from ....errors import UnsupportedModelError
from ..blocks import Block
from .base import FixedHeads


class Phi2(FixedHeads):
    name = "phi2"
    tied_output = False
    output_bias = True
    ffn_norm = False

    def check(self) -> None:
        super().check()
        if self.config.qk_layernorm:
            raise UnsupportedModelError("llama.cpp's phi2 graph has no LayerNorm on queries and keys (qk_layernorm): "
                                        "export this model with eigenfast.serving.to_onnx")

    def metadata(self, writer: Any, blocks: list[Block]) -> None:
        super().metadata(writer, blocks)
        self.rotary(writer)
