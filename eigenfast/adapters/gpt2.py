"""GPT-2: fused ``c_attn`` Conv1D holding [Q | K | V], each split into heads."""
from __future__ import annotations

import torch

from .base import Adapter, contiguous_heads


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

    def head_columns(self, component: str) -> torch.Tensor:
        offset = "qkv".index(component) * self.d_model
        return contiguous_heads(self.n_heads, self.d_head, offset=offset)

    def head_count_attributes(self, n_heads: int, n_kv_heads: int) -> dict[str, int]:
        # GPT2Attention splits c_attn's output into [Q | K | V] by split_size; no GQA.
        return {"num_heads": n_heads, "split_size": n_heads * self.d_head}
