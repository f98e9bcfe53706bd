"""Llama family (Llama, Mistral, Qwen2): separate q/k/v projections, GQA, gated MLP, RMSNorm."""
from __future__ import annotations

from .base import Adapter


class LlamaAdapter(Adapter):
    family = "Llama"
    model_types = ("llama", "mistral", "qwen2")
    backbone_path = "model"
    layers_path = "model.layers"
    attn_path = "self_attn"
    mlp_path = "mlp"
    attn_norm_path = "input_layernorm"
    mlp_norm_path = "post_attention_layernorm"
    final_norm_path = "norm"
    projections = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "mlp_in": "mlp.up_proj",
        "mlp_gate": "mlp.gate_proj",
        "mlp_out": "mlp.down_proj",
    }
