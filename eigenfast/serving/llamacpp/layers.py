"""What each decoder layer holds, read off the model through its adapter (any family) as llama.cpp's
graphs need it: the kept heads and their KV slots, the kept MLP, their norms, and the constants
removed components leave. Fused projections (GPT-2's [Q|K|V], NeoX's per-head [q|k|v]) are split
into per-head rows by the adapter's sites.

Extraction (eigenfast/rewrite/removal.py) leaves, per layer: an attention cut down to its kept
heads (query slots, each kept KV head once, and the KV slot each query slot reads,
``eigenfast_kv_slots``, when the groups are uneven) or a ``RemovedAttention`` around its stand-in;
an MLP or its stand-in. A stand-in, and a position table on a projection, is a constant only when
its every row is the same (zero ablation leaves a leftover bias or zeros); a position-indexed one
is something GGUF cannot hold, and :func:`read_layers` refuses it before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...adapters import Adapter, projection_matrix
from ...errors import UnsupportedModelError
from ...rewrite.position_tables import PositionTable
from ...rewrite.positional import KV_SLOTS
from ...rewrite.stand_ins import ConstantOutput, PositionMean, RemovedAttention, RemovedNorm

CONSTANT_TOLERANCE = 1e-6  # relative: rows this close are one constant
REFUSED_TABLE = (
    "{what} adds a different vector at each token position (a position-indexed table: mean ablation or eigenpruning "
    "leaves one), and GGUF has no per-position bias. Extract with ablation='zero' for llama.cpp, or serve this model "
    "with eigenfast.serving.to_onnx / export, which keep the table"
)


@dataclass
class Attention:
    """A kept attention, HF orientation (``(d_out, d_in)`` weights): Q/K/V rows per slot, O's columns per query slot."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    kv_slots: list[int]  # the KV slot each query slot reads
    norm: torch.Tensor
    norm_bias: torch.Tensor | None  # LayerNorm's (GPT-2, NeoX, Phi); RMSNorm has none


@dataclass
class Mlp:
    gate: torch.Tensor | None  # None: an ungated MLP (GPT-2, NeoX, Phi)
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    norm: torch.Tensor
    norm_bias: torch.Tensor | None


@dataclass
class Layer:
    """One decoder layer: each part kept, or the constant its stand-in adds to the residual stream."""

    attention: Attention | None
    attention_constant: torch.Tensor | None  # set when the attention was removed
    mlp: Mlp | None
    mlp_constant: torch.Tensor | None  # set when the MLP was removed


def _constant(module: nn.Module, what: str) -> torch.Tensor | None:
    """A position table's row when every row is the same (to float rounding: a mean of equal rows may
    differ from them in the last bit); a refusal otherwise."""
    if not isinstance(module, PositionTable):
        return None
    table = module.table.detach()
    if (table - table[:1]).abs().max() > CONSTANT_TOLERANCE * table.abs().max():
        raise UnsupportedModelError(REFUSED_TABLE.format(what=what))
    return table.mean(dim=0)


def _stand_in_output(module: nn.Module, what: str) -> torch.Tensor:
    """What a removed part's stand-in adds: a ``ConstantOutput``'s value, or a ``PositionMean``'s one row."""
    return module.value.detach() if isinstance(module, ConstantOutput) else _constant(module, what)


def _bias(module: nn.Module, what: str) -> torch.Tensor | None:
    constant = _constant(module, what)
    if constant is not None:
        return constant
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def _weight(module: nn.Module) -> torch.Tensor:
    return projection_matrix(module).detach().T


def _norm(module: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, RemovedNorm):
        raise UnsupportedModelError(f"{what} was removed although a kept component reads it; the model is inconsistent")
    bias = getattr(module, "bias", None)
    return module.weight.detach(), None if bias is None else bias.detach()


def _head_rows(adapter: Adapter, layer: int, component: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows (``(heads * d_head, d_in)``) and bias of one of Q, K, V, cut out of a fused projection where
    the family fuses them."""
    site = adapter.site(layer, component)
    module = adapter.model.get_submodule(site.path)
    columns = site.out_index.flatten()
    bias = _bias(module, f"layer {layer}'s {site.path.rsplit('.', 1)[-1]}")
    return _weight(module)[columns], None if bias is None else bias[columns]


def _attention(adapter: Adapter, layer: int) -> Attention:
    attention = adapter.attention(layer)
    (q, q_bias), (k, k_bias), (v, v_bias) = (_head_rows(adapter, layer, c) for c in ("q", "k", "v"))
    o = adapter.model.get_submodule(adapter.site(layer, "o").path)
    n_q, n_kv = q.shape[0] // adapter.d_head, k.shape[0] // adapter.d_head
    slots = getattr(attention, KV_SLOTS, None)
    kv_slots = list(slots) if slots is not None else [slot // (n_q // n_kv) for slot in range(n_q)]
    norm, norm_bias = _norm(adapter.attn_norm(layer), f"layer {layer}'s {adapter.attn_norm_path}")
    return Attention(q=q, k=k, v=v, o=_weight(o), q_bias=q_bias, k_bias=k_bias, v_bias=v_bias,
                     o_bias=_bias(o, f"layer {layer}'s attention {adapter.output_projection()}"),
                     kv_slots=kv_slots, norm=norm, norm_bias=norm_bias)


def _mlp(adapter: Adapter, layer: int) -> Mlp:
    mlp = adapter.mlp(layer)
    names = adapter.mlp_parts()  # (in, gate or None, out)
    parts = [None if name is None else mlp.get_submodule(name) for name in names]
    (up, gate, down) = (None if part is None else _weight(part) for part in parts)
    (up_bias, gate_bias, down_bias) = (None if part is None else _bias(part, f"layer {layer}'s {name}")
                                       for part, name in zip(parts, names))
    norm, norm_bias = _norm(adapter.mlp_norm(layer), f"layer {layer}'s {adapter.mlp_norm_path or adapter.attn_norm_path}")
    return Mlp(gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias,
               norm=norm, norm_bias=norm_bias)


def read_layers(adapter: Adapter) -> list[Layer]:
    """Every decoder layer of ``adapter.model``, checked: raises before any file is written."""
    layers = []
    for layer in range(adapter.n_layers):
        attention = adapter.attention(layer)
        removed = isinstance(attention, RemovedAttention)
        mlp = adapter.mlp(layer)
        mlp_removed = isinstance(mlp, (ConstantOutput, PositionMean))
        layers.append(Layer(
            attention=None if removed else _attention(adapter, layer),
            attention_constant=_stand_in_output(attention.output, f"layer {layer}'s removed attention") if removed else None,
            mlp=None if mlp_removed else _mlp(adapter, layer),
            mlp_constant=_stand_in_output(mlp, f"layer {layer}'s removed MLP") if mlp_removed else None,
        ))
    return layers
