"""The layers of a GGUF file in an architecture whose every layer has the same heads and FFN width
(llama.cpp's ``gpt2``, ``gptneox``, ``phi2``): removed parts are zero-filled, exactly.

Those graphs size every layer's fused ``attn_qkv`` and ``attn_output`` from the model's width and
one head count, and run every layer's attention and FFN, so nothing can be left out:

* a removed head is a head with zero Q, K, V rows and biases and zero output columns: it
  attends uniformly to zero values and adds exactly nothing;
* a removed attention is all such heads, and its constant output (what zero ablation leaves,
  or positions="mean" means) is the output projection's bias;
* a removed MLP has zero weights and biases (GELU(0) = 0) and its constant is the down
  projection's bias;
* with GQA (Phi), each kept KV head is written in its own group of ``n_head / n_head_kv`` query
  heads with its readers, padding heads filling the group, and unused groups are zero.

The file is exact and as large as the whole model: llama.cpp runs the zero heads and blocks
at full cost, which :func:`zero_filled` says so a user is not surprised. (The ``deci`` path for
Llama-family models skips them: blocks.py.)
"""
from __future__ import annotations

import torch

from .blocks import Block, heads_in_order
from .heads import grouped, readers
from .layers import Attention, Layer, Mlp

NO_SPEED_UP = ("written zero-filled (exact): no speed-up in llama.cpp for this architecture; the deci path for "
               "Llama-family models skips them")


def _placement(attention: Attention, n_head: int, n_head_kv: int, d_head: int) -> tuple[list[int | None], list[int | None]]:
    """The kept query slot of each of the ``n_head`` written heads and the kept KV slot of each of the
    ``n_head_kv`` written KV heads (None: zeros). A kept KV head has at most a group's readers: it had
    that many in the whole model."""
    group = n_head // n_head_kv
    layout = grouped(readers(attention.kv_slots, attention.k.shape[0] // d_head), group)
    unused = n_head_kv - len(layout.kv_copies)
    return [*layout.query_slots, *[None] * (unused * group)], [*layout.kv_copies, *[None] * unused]


def _or_zeros(bias: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(rows) if bias is None else bias


def _attention(t: dict[str, torch.Tensor], attention: Attention | None, constant: torch.Tensor | None,
               n_head: int, n_head_kv: int, d_head: int, like: torch.Tensor) -> None:
    d_model = like.shape[-1]
    width = (n_head + 2 * n_head_kv) * d_head
    if attention is None:
        t["attn_qkv.weight"], t["attn_qkv.bias"] = like.new_zeros(width, d_model), like.new_zeros(width)
        t["attn_output.weight"] = like.new_zeros(d_model, n_head * d_head)
        t["attn_output.bias"] = _or_zeros(constant, d_model, like).clone()
        return
    queries, kvs = _placement(attention, n_head, n_head_kv, d_head)
    rows = lambda matrix, order: heads_in_order(matrix, d_head, order)  # noqa: E731
    biases = [(_or_zeros(attention.q_bias, attention.q.shape[0], like), queries),
              (_or_zeros(attention.k_bias, attention.k.shape[0], like), kvs),
              (_or_zeros(attention.v_bias, attention.v.shape[0], like), kvs)]
    t["attn_qkv.weight"] = torch.cat([rows(attention.q, queries), rows(attention.k, kvs), rows(attention.v, kvs)])
    t["attn_qkv.bias"] = torch.cat([rows(bias, order) for bias, order in biases])
    t["attn_output.weight"] = rows(attention.o.T, queries).T.contiguous()
    t["attn_output.bias"] = _or_zeros(attention.o_bias, d_model, like)


def _mlp(t: dict[str, torch.Tensor], mlp: Mlp | None, constant: torch.Tensor | None, n_ff: int,
         like: torch.Tensor) -> None:
    d_model = like.shape[-1]
    if mlp is None:
        t["ffn_up.weight"], t["ffn_up.bias"] = like.new_zeros(n_ff, d_model), like.new_zeros(n_ff)
        t["ffn_down.weight"], t["ffn_down.bias"] = like.new_zeros(d_model, n_ff), _or_zeros(constant, d_model, like).clone()
        return
    t["ffn_up.weight"], t["ffn_up.bias"] = mlp.up, _or_zeros(mlp.up_bias, n_ff, like)
    t["ffn_down.weight"], t["ffn_down.bias"] = mlp.down, _or_zeros(mlp.down_bias, d_model, like)


def _norm(t: dict[str, torch.Tensor], name: str, part: Attention | Mlp | None, like: torch.Tensor) -> None:
    """A kept part's LayerNorm; a removed part's is never read (zero weights follow it): ones and zeros."""
    d_model = like.shape[-1]
    if part is None:
        t[f"{name}.weight"], t[f"{name}.bias"] = like.new_ones(d_model), like.new_zeros(d_model)
    else:
        t[f"{name}.weight"], t[f"{name}.bias"] = part.norm, _or_zeros(part.norm_bias, d_model, like)


def dense_blocks(layers: list[Layer], n_head: int, n_head_kv: int, d_head: int, n_ff: int, like: torch.Tensor,
                 ffn_norm: bool) -> list[Block]:
    """One block per layer, zero-filled; ``like``: a ``(vocab, d_model)`` weight (dtype, device, width).
    ``ffn_norm``: whether the architecture has an FFN norm of its own; without one (Phi) the FFN reads
    the attention's, which a removed attention leaves to the MLP it still feeds."""
    blocks = []
    for layer in layers:
        block = Block(n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff)
        _attention(block.tensors, layer.attention, layer.attention_constant, n_head, n_head_kv, d_head, like)
        _mlp(block.tensors, layer.mlp, layer.mlp_constant, n_ff, like)
        if ffn_norm:
            _norm(block.tensors, "attn_norm", layer.attention, like)
            _norm(block.tensors, "ffn_norm", layer.mlp, like)
        else:
            _norm(block.tensors, "attn_norm", layer.attention or layer.mlp, like)
        blocks.append(block)
    return blocks


def zero_filled(layers: list[Layer], n_head: int, d_head: int) -> list[str]:
    """What a zero-filled file computes for nothing: one entry per layer that lost heads or blocks."""
    removed = []
    for index, layer in enumerate(layers):
        parts = []
        if layer.attention is None:
            parts.append("attention removed")
        elif (kept := layer.attention.q.shape[0] // d_head) < n_head:
            parts.append(f"{n_head - kept} of {n_head} heads removed")
        if layer.mlp is None:
            parts.append("MLP removed")
        if parts:
            removed.append(f"layer {index}: {', '.join(parts)}")
    return removed
