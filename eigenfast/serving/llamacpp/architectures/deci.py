"""Llama, Mistral and Qwen2 as llama.cpp's ``deci`` (Llama-3.1-Nemotron): per-layer head counts and FFN
widths, so removed heads and blocks are left out (blocks.py), not zero-filled."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ....errors import UnsupportedModelError
from ....rewrite.stand_ins import RemovedAttention
from ..blocks import Block, build_blocks
from ..layers import Layer
from .base import Architecture, rope_theta

log = logging.getLogger(__name__)


class Deci(Architecture):
    name = "deci"

    def check(self) -> None:
        activation = getattr(self.config, "hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedModelError(f"llama.cpp's deci graph gates its FFN with SiLU, the model with {activation!r}: "
                                        "export it with eigenfast.serving.to_onnx")
        if self.adapter.d_head % 2:
            raise UnsupportedModelError(f"the rotary embedding needs an even head size, the model has {self.adapter.d_head}")
        rope_theta(self.config)

    def blocks(self, layers: list[Layer], like: torch.Tensor) -> list[Block]:
        return build_blocks(layers, self.adapter.d_model, self.adapter.d_head, like)

    def context_length(self) -> int:
        """The trained context, or the sliding window where one is set: ``deci`` attends to every earlier
        position, which equals a windowed attention only while the sequence fits the window."""
        adapter = self.adapter
        length = int(self.config.max_position_embeddings)
        attentions = [adapter.attention(layer) for layer in range(adapter.n_layers)]
        windows = [adapter.attention_options(a).get("sliding_window") for a in attentions
                   if not isinstance(a, RemovedAttention)]
        window = min((w for w in windows if w is not None), default=None)
        if window is not None and window < length:
            log.warning("the model attends within a sliding window of %d positions and llama.cpp's deci graph attends "
                        "to all of them: outputs match up to %d tokens, the context length written", window, window)
            return int(window)
        return length

    def metadata(self, writer: Any, blocks: list[Block]) -> None:
        d_head = self.adapter.d_head
        writer.add_block_count(len(blocks))
        writer.add_context_length(self.context_length())
        writer.add_embedding_length(self.adapter.d_model)
        writer.add_feed_forward_length([block.n_ff for block in blocks])
        writer.add_head_count([block.n_head for block in blocks])
        writer.add_head_count_kv([block.n_head_kv for block in blocks])
        writer.add_key_length(d_head)
        writer.add_value_length(d_head)
        writer.add_rope_dimension_count(d_head)
        writer.add_rope_freq_base(rope_theta(self.config))
        writer.add_layer_norm_rms_eps(float(self.config.rms_norm_eps))
