"""GPT-2 as llama.cpp's ``gpt2``: learned positions (``position_embd``), sequential residual, no rotary."""
from __future__ import annotations

import torch

from ....errors import UnsupportedModelError
from .base import FixedHeads


class GPT2(FixedHeads):
    name = "gpt2"

    def activation(self) -> str:
        return str(self.config.activation_function)

    def check(self) -> None:
        super().check()
        if not self.config.scale_attn_weights or self.config.scale_attn_by_inverse_layer_idx:
            raise UnsupportedModelError("llama.cpp's gpt2 graph scales attention scores by 1/sqrt(head size) only; the "
                                        "model sets scale_attn_weights=False or scale_attn_by_inverse_layer_idx: "
                                        "export it with eigenfast.serving.to_onnx")

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"position_embd.weight": self.adapter.backbone().wpe.weight}
