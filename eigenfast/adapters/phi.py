"""Phi: attention and MLP in parallel, both reading one shared LayerNorm; partial rotary."""
from __future__ import annotations

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
