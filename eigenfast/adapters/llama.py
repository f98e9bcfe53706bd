"""Llama family (Llama, Mistral, Qwen2): separate q/k/v projections, GQA, gated MLP, RMSNorm."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn
from transformers.models.llama import modeling_llama

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
    mlp_activation = "act_fn"
    # LlamaConfig's flags; Mistral's and Qwen2's classes take none (Qwen2's q/k/v always have a bias, o never).
    bias_flags = {
        **dict.fromkeys(("q", "k", "v", "o"), "attention_bias"),
        **dict.fromkeys(("mlp_in", "mlp_gate", "mlp_out"), "mlp_bias"),
    }

    def bias_flag(self, component: str) -> str | None:
        return self.bias_flags.get(component) if self.config.model_type == "llama" else None

    @classmethod
    def rotary_embedding(cls) -> Callable:
        return modeling_llama.apply_rotary_pos_emb

    @classmethod
    def eager_attention(cls) -> Callable:
        return modeling_llama.eager_attention_forward  # Mistral's and Qwen2's are the same function

    @classmethod
    def attention_options(cls, attention: nn.Module) -> dict[str, Any]:
        # Qwen2 keeps a per-layer window on the module, Mistral one for all layers in the config.
        window = getattr(attention, "sliding_window", getattr(attention.config, "sliding_window", None))
        return {} if window is None else {"sliding_window": window}
