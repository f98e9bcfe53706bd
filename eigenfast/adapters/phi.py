"""Phi: attention and MLP in parallel, both reading one shared LayerNorm; partial rotary."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.models.phi import modeling_phi

from .base import Adapter


class PhiAdapter(Adapter):
    family = "Phi"
    model_types = ("phi",)
    backbone_path = "model"
    layers_path = "model.layers"
    attn_path = "self_attn"
    mlp_path = "mlp"
    attn_norm_path = "input_layernorm"
    mlp_norm_path = None
    final_norm_path = "final_layernorm"
    parallel = True
    projections = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.dense",
        "mlp_in": "mlp.fc1",
        "mlp_out": "mlp.fc2",
    }
    mlp_activation = "activation_fn"

    @classmethod
    def rotary_embedding(cls) -> Callable:
        return modeling_phi.apply_rotary_pos_emb

    @classmethod
    def rotate(
        cls, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, position_embeddings: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention.qk_layernorm:
            q, k = attention.q_layernorm(q), attention.k_layernorm(k)
        cos, sin = position_embeddings
        n = attention.rotary_ndims  # partial rotary: the rest of each head passes through
        q_rot, k_rot = cls.rotary_embedding()(q[..., :n], k[..., :n], cos, sin)
        return torch.cat((q_rot, q[..., n:]), dim=-1), torch.cat((k_rot, k[..., n:]), dim=-1)

    @classmethod
    def eager_attention(cls) -> Callable:
        return modeling_phi.eager_attention_forward
