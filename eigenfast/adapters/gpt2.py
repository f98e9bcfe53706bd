"""GPT-2: fused ``c_attn`` Conv1D holding [Q | K | V], each split into heads."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.models.gpt2 import modeling_gpt2

from ..errors import UnsupportedModelError
from .base import Adapter, LayerCall, contiguous_heads
from .calls import LayerParameters
from .projection import project


class GPT2Adapter(Adapter):
    family = "GPT-2"
    model_types = ("gpt2",)
    backbone_path = "transformer"
    layers_path = "transformer.h"
    attn_path = "attn"
    mlp_path = "mlp"
    attn_norm_path = "ln_1"
    mlp_norm_path = "ln_2"
    final_norm_path = "ln_f"
    projections = {
        "q": "attn.c_attn",
        "k": "attn.c_attn",
        "v": "attn.c_attn",
        "o": "attn.c_proj",
        "mlp_in": "mlp.c_fc",
        "mlp_out": "mlp.c_proj",
    }
    layer_arguments = ("encoder_hidden_states", "encoder_attention_mask")  # cross-attention: refused in layer_call

    def head_columns(self, component: str, n_heads: int, n_kv_heads: int) -> torch.Tensor:
        offset = "qkv".index(component) * n_heads * self.d_head
        return contiguous_heads(n_heads, self.d_head, offset=offset)

    def head_count_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        # GPT2Attention splits c_attn's output into [Q | K | V] by split_size; no GQA.
        return {"num_heads": n_heads, "split_size": n_heads * self.d_head}

    @classmethod
    def layer_call(cls, parameters: LayerParameters, args: tuple, kwargs: dict[str, Any]) -> LayerCall:
        call = super().layer_call(parameters, args, kwargs)
        encoder = call.kwargs.pop("encoder_hidden_states", None)
        call.kwargs.pop("encoder_attention_mask", None)
        if encoder is not None:
            raise UnsupportedModelError("eigenfast does not support GPT-2 cross-attention (encoder_hidden_states): use a decoder-only GPT-2")
        return call

    @classmethod
    def project_qkv(
        cls, attention: nn.Module, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (*x.shape[:-1], -1, attention.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in project(attention.c_attn, x, positions).split(attention.split_size, dim=-1))
        return q, k, v

    @classmethod
    def eager_attention(cls) -> Callable:
        return modeling_gpt2.eager_attention_forward
