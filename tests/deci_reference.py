"""A slow, obvious forward of a ``deci`` GGUF file read back with gguf's reader, written from llama.cpp's
graph (src/models/deci.cpp) step by step: the reference the GGUF export is checked against where
llama.cpp itself is not installed, and a second opinion where it is.

Per layer: no attention where ``head_count`` is 0; where ``feed_forward_length`` is 0 the layer ends
before its FFN *and before the attention's residual add* (as the graph's ``continue`` does); RMSNorm;
RoPE on pairs (2i, 2i+1); query head ``h`` reads KV head ``h // (n_head / n_head_kv)``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape([int(n) for n in reversed(t.shape)])
    return fields, tensors


def _per_layer(value, n_layers: int) -> list[int]:
    return list(value) if isinstance(value, list) else [value] * n_layers


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x: (T, heads, d) rotated on pairs (2i, 2i+1) by position t * base^(-2i/d)."""
    T, _, d = x.shape
    angle = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def linear(x: torch.Tensor, tensors: dict, name: str) -> torch.Tensor:
    y = x @ tensors[f"{name}.weight"].T
    return y + tensors[f"{name}.bias"] if f"{name}.bias" in tensors else y


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of ``q (T, heads, d)`` over ``k, v (T, kv_heads, d)``, query head ``h`` reading KV head
    ``h // (heads / kv_heads)``, scaled by 1/sqrt(d): ``(T, heads * d)``."""
    T, heads, d = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v).reshape(T, heads * d)


def logits(path: str | Path, ids: list[int]) -> torch.Tensor:
    """``(len(ids), vocab)`` logits of one prompt."""
    fields, t = read(path)
    n_layers = fields["deci.block_count"]
    heads = _per_layer(fields["deci.attention.head_count"], n_layers)
    kv_heads = _per_layer(fields["deci.attention.head_count_kv"], n_layers)
    widths = _per_layer(fields["deci.feed_forward_length"], n_layers)
    eps, base, d = fields["deci.attention.layer_norm_rms_epsilon"], fields["deci.rope.freq_base"], fields["deci.attention.key_length"]
    x = t["token_embd.weight"][ids]
    T = len(ids)
    for i in range(n_layers):
        blk = {name[len(f"blk.{i}."):]: value for name, value in t.items() if name.startswith(f"blk.{i}.")}
        residual = x
        if heads[i] == 0:
            cur = x
        else:
            h = _rms(x, blk["attn_norm.weight"], eps)
            q = _rope(linear(h, blk, "attn_q").view(T, heads[i], d), base)
            k = _rope(linear(h, blk, "attn_k").view(T, kv_heads[i], d), base)
            v = linear(h, blk, "attn_v").view(T, kv_heads[i], d)
            cur = linear(attend(q, k, v), blk, "attn_output")
        if widths[i] == 0:
            continue  # deci.cpp: the layer's output is dropped, x stays its input
        ffn_in = cur + residual if heads[i] > 0 else cur
        h = _rms(ffn_in, blk["ffn_norm.weight"], eps)
        x = linear(F.silu(linear(h, blk, "ffn_gate")) * linear(h, blk, "ffn_up"), blk, "ffn_down") + ffn_in
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T
