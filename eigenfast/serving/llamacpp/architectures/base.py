"""What every llama.cpp architecture eigenfast writes provides, and the shared part of those whose
layers all have the same heads (``FixedHeads``: GPT-2, NeoX, Phi, written zero-filled)."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ....errors import UnsupportedModelError
from ..blocks import Block
from ..dense import NO_SPEED_UP, dense_blocks, zero_filled
from ..layers import Layer

log = logging.getLogger(__name__)

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # what llama.cpp's GELU computes (through an f16 table)


def rope_theta(config: Any) -> float:
    """The rotary base of a plain rotary embedding; other kinds are refused."""
    parameters = getattr(config, "rope_parameters", None) or {}
    kind = parameters.get("rope_type", "default")
    if kind != "default":
        raise UnsupportedModelError(f"rope_type {kind!r} is not written to GGUF yet (only the plain rotary embedding "
                                    "is): export this model with eigenfast.serving.to_onnx")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class Architecture:
    """One llama.cpp architecture: its name, checks, layers and keys.

    ``tied_output``: the loader reuses ``token_embd`` when ``output.weight`` is absent; ``output_bias``: the
    graph adds ``output.bias`` (and needs one).
    """

    name: str = ""
    tied_output: bool = True
    output_bias: bool = False

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        self.model, self.adapter, self.config = model, adapter, model.config

    def check(self) -> None:
        """Refuse what the architecture cannot express, before anything is read or written."""

    def blocks(self, layers: list[Layer], like: torch.Tensor) -> list[Block]:
        raise NotImplementedError

    def metadata(self, writer: Any, blocks: list[Block]) -> None:
        """The architecture's keys (the file type and the vocabulary are the writer's)."""
        raise NotImplementedError

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors besides the embeddings, the final norm, the LM head and the layers."""
        return {}

    def context_length(self) -> int:
        return int(self.config.max_position_embeddings)


class FixedHeads(Architecture):
    """An architecture whose graph sizes every layer alike (dense.py): removed parts are zero-filled, and the
    export says so. Layers are LayerNorms with biases, a fused [Q|K|V] projection and a GELU MLP."""

    ffn_norm = True  # the FFN has its own norm (Phi's reads the attention's)

    def activation(self) -> str:
        return str(self.config.hidden_act)

    def check(self) -> None:
        activation = self.activation()
        if activation == "gelu":
            log.warning("the model's GELU is the exact (erf) one and llama.cpp computes the tanh approximation: "
                        "logits differ from eager's by the approximation's error (about 1e-3 of an activation)")
        elif activation not in TANH_GELU:
            raise UnsupportedModelError(f"llama.cpp's {self.name} graph applies GELU, the model {activation!r}: "
                                        "export it with eigenfast.serving.to_onnx")

    def blocks(self, layers: list[Layer], like: torch.Tensor) -> list[Block]:
        adapter = self.adapter
        removed = zero_filled(layers, adapter.n_heads, adapter.d_head)
        if removed:
            log.warning("GGUF %s: %s; %s", self.name, "; ".join(removed), NO_SPEED_UP)
        n_ff = max((layer.mlp.up.shape[0] for layer in layers if layer.mlp is not None), default=1)
        return dense_blocks(layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_head, n_ff, like, self.ffn_norm)

    def metadata(self, writer: Any, blocks: list[Block]) -> None:
        writer.add_block_count(len(blocks))
        writer.add_context_length(self.context_length())
        writer.add_embedding_length(self.adapter.d_model)
        writer.add_feed_forward_length(blocks[0].n_ff)
        writer.add_head_count(self.adapter.n_heads)
        writer.add_head_count_kv(self.adapter.n_kv_heads)
        writer.add_layer_norm_eps(float(self.adapter.final_norm().eps))

    def rotary(self, writer: Any) -> None:
        """The rotary keys of a (partial) rotary embedding on the first dimensions of each head, rotated in
        halves as HF does (llama.cpp's NeoX-style rope, which these architectures use)."""
        theta = rope_theta(self.config)
        inv_freq = self.adapter.backbone().rotary_emb.inv_freq.detach().double().cpu()
        n_rot = 2 * inv_freq.numel()
        plain = theta ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
        if not torch.allclose(inv_freq, plain, rtol=1e-5):
            raise UnsupportedModelError("the rotary embedding's frequencies are not the plain ones llama.cpp computes "
                                        "from rope_theta: export this model with eigenfast.serving.to_onnx")
        writer.add_rope_dimension_count(n_rot)
        writer.add_rope_freq_base(theta)
