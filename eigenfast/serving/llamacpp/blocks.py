"""The layers of a ``deci`` GGUF file: per layer its head counts, FFN width and tensors.

llama.cpp's ``deci`` graph (Llama-3.1-Nemotron) skips a layer's attention where it has 0 query
heads and its FFN where ``feed_forward_length`` is 0, and takes an optional bias on the attention
output and on each FFN projection. Three of its details shape what is written here:

* with ``feed_forward_length`` 0 it skips the rest of the layer, the residual add of the
  attention included, so a layer that keeps its attention but lost its MLP gets an FFN of
  width 1 with zero weights (it adds exactly nothing) instead;
* the head size is read off layer 0's head count, so the first layer written always has a
  head: where its attention was removed, a padding head with zero weights (output 0);
* a removed attention adds nothing in ``deci``, so its constant output (zero ablation leaves the
  output projection's bias) goes into the bias of the layer before it (its FFN's down projection,
  or the padding head's output bias for the first layer): nothing reads the residual stream
  between the two, so the sum is the same. A removed MLP's constant is the bias of its width-1 FFN.

A layer with both parts removed and nothing to add is the identity and is left out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...errors import UnsupportedModelError
from .heads import describe, even_groups, regroup
from .layers import Attention, Layer, Mlp

log = logging.getLogger(__name__)


@dataclass
class Block:
    """One GGUF layer: ``tensors`` by name after ``blk.N.`` (HF orientation, ``(d_out, d_in)``)."""

    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _rope_order(d_head: int) -> torch.Tensor:
    """Rows of one head in llama.cpp's rotary order: it rotates pairs (2i, 2i+1), HF rotates (i, i + d_head/2)."""
    half = torch.arange(d_head // 2)
    return torch.stack([half, half + d_head // 2], dim=1).flatten()


def heads_in_order(rows: torch.Tensor, d_head: int, order: list[int | None]) -> torch.Tensor:
    """Row blocks of ``d_head`` in ``order`` (None: zeros); works for weights and biases."""
    blocks = rows.reshape(-1, d_head, *rows.shape[1:])
    zero = torch.zeros_like(blocks[0])
    return torch.cat([zero if index is None else blocks[index] for index in order])


def _roped(rows: torch.Tensor, d_head: int) -> torch.Tensor:
    blocks = rows.reshape(-1, d_head, *rows.shape[1:])
    return blocks[:, _rope_order(d_head)].reshape(rows.shape)


def _attention(block: Block, attention: Attention, d_head: int, layer: int) -> None:
    n_q, n_kv = attention.q.shape[0] // d_head, attention.k.shape[0] // d_head
    grouping = regroup(attention.kv_slots, n_kv)
    if not even_groups(attention.kv_slots, n_kv):
        log.info("GGUF layer %d: %s", layer, describe(grouping, n_q, n_kv))
    queries, copies = list(grouping.query_slots), list(grouping.kv_copies)
    block.n_head, block.n_head_kv = len(queries), len(copies)
    t = block.tensors
    t["attn_norm.weight"] = attention.norm
    t["attn_q.weight"] = _roped(heads_in_order(attention.q, d_head, queries), d_head)
    t["attn_k.weight"] = _roped(heads_in_order(attention.k, d_head, copies), d_head)
    t["attn_v.weight"] = heads_in_order(attention.v, d_head, copies)
    t["attn_output.weight"] = heads_in_order(attention.o.T, d_head, queries).T.contiguous()
    for name, bias, order, roped in (("attn_q", attention.q_bias, queries, True), ("attn_k", attention.k_bias, copies, True),
                                     ("attn_v", attention.v_bias, copies, False)):
        if bias is not None:
            t[f"{name}.bias"] = _roped(heads_in_order(bias, d_head, order), d_head) if roped else heads_in_order(bias, d_head, order)
    if attention.o_bias is not None:
        t["attn_output.bias"] = attention.o_bias


def _padding_head(block: Block, d_model: int, d_head: int, like: torch.Tensor) -> None:
    """One head with zero weights: its output is exactly its output bias (zero unless a constant goes there)."""
    block.n_head = block.n_head_kv = 1
    zeros = like.new_zeros
    block.tensors.update({
        "attn_norm.weight": like.new_ones(d_model),
        "attn_q.weight": zeros(d_head, d_model), "attn_k.weight": zeros(d_head, d_model),
        "attn_v.weight": zeros(d_head, d_model), "attn_output.weight": zeros(d_model, d_head),
    })


def _mlp(block: Block, mlp: Mlp) -> None:
    block.n_ff = mlp.gate.shape[0]
    t = block.tensors
    t.update({"ffn_norm.weight": mlp.norm, "ffn_gate.weight": mlp.gate, "ffn_up.weight": mlp.up,
              "ffn_down.weight": mlp.down})
    for name, bias in (("ffn_gate", mlp.gate_bias), ("ffn_up", mlp.up_bias), ("ffn_down", mlp.down_bias)):
        if bias is not None:
            t[f"{name}.bias"] = bias


def _null_ffn(block: Block, d_model: int, like: torch.Tensor) -> None:
    """An FFN of width 1 with zero weights: it adds exactly its down projection's bias."""
    block.n_ff = 1
    block.tensors.update({"ffn_norm.weight": like.new_ones(d_model), "ffn_gate.weight": like.new_zeros(1, d_model),
                          "ffn_up.weight": like.new_zeros(1, d_model), "ffn_down.weight": like.new_zeros(d_model, 1)})


def _add_bias(block: Block, name: str, value: torch.Tensor) -> None:
    block.tensors[name] = block.tensors[name] + value if name in block.tensors else value.clone()


def _nonzero(value: torch.Tensor | None) -> bool:
    return value is not None and bool(value.count_nonzero())


def build_blocks(layers: list[Layer], d_model: int, d_head: int, like: torch.Tensor) -> list[Block]:
    """The GGUF layers for ``layers`` (see the module docstring); ``like`` gives the dtype and device."""
    kept = [layer for layer in layers if layer.attention is not None or layer.mlp is not None
            or _nonzero(layer.attention_constant) or _nonzero(layer.mlp_constant)]
    if not kept:
        raise UnsupportedModelError("every layer of the model was removed, and a GGUF model needs at least one: "
                                    "keep at least one head or MLP")
    blocks = []
    for index, layer in enumerate(kept):
        block = Block(n_head=0, n_head_kv=0, n_ff=0)
        if layer.attention is not None:
            _attention(block, layer.attention, d_head, index)
        elif index == 0:
            _padding_head(block, d_model, d_head, like)
            if _nonzero(layer.attention_constant):
                block.tensors["attn_output.bias"] = layer.attention_constant.clone()
        elif _nonzero(layer.attention_constant):
            _add_bias(blocks[-1], "ffn_down.bias", layer.attention_constant)
        if layer.mlp is not None:
            _mlp(block, layer.mlp)
        else:
            _null_ffn(block, d_model, like)
            if _nonzero(layer.mlp_constant):
                _add_bias(block, "ffn_down.bias", layer.mlp_constant)
        blocks.append(block)
    return blocks
