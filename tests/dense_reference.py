"""A slow, obvious forward of a GGUF file in llama.cpp's ``gpt2``, ``gptneox`` or ``phi2`` architecture read
back with gguf's reader, written from llama.cpp's graphs (src/models/gpt2.cpp, gptneox.cpp, phi2.cpp) step by
step: the reference the zero-filled export is checked against where llama.cpp itself is not installed.

Per layer: LayerNorm with bias; the fused ``attn_qkv`` split into [Q | K | V]; the rotary embedding on each
head's first ``rope.dimension_count`` dimensions, rotated in halves (NeoX, Phi; GPT-2 adds learned
positions instead); GELU as llama.cpp computes it (:func:`ggml_gelu`). GPT-2 and sequential NeoX add
attention then FFN; parallel NeoX adds both, the FFN reading its own norm of the layer input; Phi adds
both, the FFN reading the attention's norm; Phi's LM head adds a bias.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from deci_reference import attend, linear, read

SQRT_2_OVER_PI = 0.7978845608028654


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's CPU GELU (ggml-cpu/vec.h): the tanh approximation, read from a table of f16 values at the
    input rounded to f16; 0 below -10 and the input above 10."""
    x16 = x.to(torch.float16).to(torch.float32)
    table = (0.5 * x16 * (1 + torch.tanh(SQRT_2_OVER_PI * x16 * (1 + 0.044715 * x16 * x16)))).to(torch.float16)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table.to(torch.float32)))


def _norm(x: torch.Tensor, blk: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), blk[f"{name}.weight"], blk[f"{name}.bias"], eps)


def _rope(x: torch.Tensor, n_rot: int, base: float) -> torch.Tensor:
    """x: (T, heads, d); dimensions i and i + n_rot/2 (i < n_rot/2) rotated by position t * base^(-2i/n_rot)."""
    T = x.shape[0]
    angle = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
    first, second, rest = x[..., : n_rot // 2], x[..., n_rot // 2: n_rot], x[..., n_rot:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def logits(path: str | Path, ids: list[int]) -> torch.Tensor:
    """``(len(ids), vocab)`` logits of one prompt."""
    fields, t = read(path)
    arch = fields["general.architecture"]
    key = lambda name: fields[f"{arch}.{name}"]  # noqa: E731
    heads, kv_heads, eps = key("attention.head_count"), key("attention.head_count_kv"), key("attention.layer_norm_epsilon")
    d = key("embedding_length") // heads
    T = len(ids)
    x = t["token_embd.weight"][ids]
    if arch == "gpt2":
        x = x + t["position_embd.weight"][:T]
    parallel = arch == "phi2" or (arch == "gptneox" and key("use_parallel_residual"))
    for i in range(key("block_count")):
        blk = {name[len(f"blk.{i}."):]: value for name, value in t.items() if name.startswith(f"blk.{i}.")}
        h = _norm(x, blk, "attn_norm", eps)
        q, k, v = linear(h, blk, "attn_qkv").split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k, v = q.view(T, heads, d), k.view(T, kv_heads, d), v.view(T, kv_heads, d)
        if arch != "gpt2":
            q, k = (_rope(y, key("rope.dimension_count"), key("rope.freq_base")) for y in (q, k))
        attention = linear(attend(q, k, v), blk, "attn_output")
        ffn = lambda y: linear(ggml_gelu(linear(y, blk, "ffn_up")), blk, "ffn_down")  # noqa: E731
        if not parallel:
            x = x + attention
            x = x + ffn(_norm(x, blk, "ffn_norm", eps))
        else:
            x = x + attention + ffn(h if arch == "phi2" else _norm(x, blk, "ffn_norm", eps))
    x = _norm(x, t, "output_norm", eps)
    return _head(x, t)


def _head(x: torch.Tensor, t: dict) -> torch.Tensor:
    y = x @ t.get("output.weight", t["token_embd.weight"]).T
    return y + t["output.bias"] if "output.bias" in t else y


class GgmlGelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_gelu(x)


def with_ggml_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose MLPs apply llama.cpp's GELU: what llama.cpp computes for a model trained with
    another GELU (the exact one, say), so its remaining difference is the file's, not the activation's."""
    from eigenfast.adapters import get_adapter
    from eigenfast.rewrite.stand_ins import ConstantOutput, PositionMean

    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    for layer in range(adapter.n_layers):
        mlp = adapter.mlp(layer)
        if not isinstance(mlp, (ConstantOutput, PositionMean)):
            setattr(mlp, adapter.mlp_activation, GgmlGelu())
    return model
