"""GPT-NeoX / Pythia: fused ``query_key_value`` laid out per head as [q_h | k_h | v_h]."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.models.gpt_neox import modeling_gpt_neox

from .base import Adapter, contiguous_heads
from .projection import project


class NeoXAdapter(Adapter):
    family = "GPT-NeoX"
    model_types = ("gpt_neox",)
    backbone_path = "gpt_neox"
    layers_path = "gpt_neox.layers"
    attn_path = "attention"
    mlp_path = "mlp"
    attn_norm_path = "input_layernorm"
    mlp_norm_path = "post_attention_layernorm"
    final_norm_path = "final_layer_norm"
    projections = {
        "q": "attention.query_key_value",
        "k": "attention.query_key_value",
        "v": "attention.query_key_value",
        "o": "attention.dense",
        "mlp_in": "mlp.dense_h_to_4h",
        "mlp_out": "mlp.dense_4h_to_h",
    }
    bias_flags = dict.fromkeys(("q", "k", "v", "o"), "attention_bias")  # the MLP always has biases
    @property
    def parallel(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.config, "use_parallel_residual", True))

    def head_columns(self, component: str, n_heads: int, n_kv_heads: int) -> torch.Tensor:
        offset = "qkv".index(component) * self.d_head
        return contiguous_heads(n_heads, self.d_head, offset=offset, stride=3 * self.d_head)

    def head_count_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        return {}  # GPTNeoXAttention reads the head count off query_key_value's output shape

    @classmethod
    def parallel_layer(cls, layer: nn.Module) -> bool:
        return bool(layer.use_parallel_residual)

    @classmethod
    def project_qkv(
        cls, attention: nn.Module, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = project(attention.query_key_value, x, positions)
        qkv = qkv.view(*x.shape[:-1], -1, 3 * attention.head_size).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        return q, k, v

    @classmethod
    def rotary_embedding(cls) -> Callable:
        return modeling_gpt_neox.apply_rotary_pos_emb  # partial rotary: cos/sin say how much

    @classmethod
    def eager_attention(cls) -> Callable:
        return modeling_gpt_neox.eager_attention_forward
