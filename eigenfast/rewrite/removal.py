"""Physical removal of pruned heads and MLPs: "truly pruning" (docs/MATH.md §4, paper appendix C).

A head's contribution to the residual stream is ``z_h W_O^h``, so removing it means
dropping its Q/K/V output columns and its rows of O. Under mean ablation its mean
contribution at each true position joins the output projection's bias, which becomes
a position-indexed table (:class:`~eigenfast.rewrite.position_tables.TokenBiasLinear`), or with
``positions="mean"`` its mean over every calibration token, added to the ordinary bias
(eigenfast/rewrite/plain_bias.py); under zero ablation the original bias is all that is left. A layer with no head left, or a
pruned MLP, becomes a stand-in that returns the mean (or constant) output and never
reads its input, so the norm feeding it goes as well unless another reader shares it
(with ``positions="mean"``, a constant).

GQA: a KV head leaves with the last query head that reads it, and each kept KV head is
kept once, in its weights and in the KV cache. HF attention repeats each KV head
``num_key_value_groups`` times, so when every kept KV head serves the same number of
kept query heads that repeat still works. When the kept groups are uneven (say 2 and
1), the attention records which KV slot each query slot reads (``eigenfast_kv_slots``,
saved with the model's attributes) and its forward pads Q to the largest group with
copies of query heads, dropping their outputs afterwards (eigenfast/rewrite/positional.py).
The alternative, gathering K/V out to one head per query head, copies the whole cache
at every decode step, which transformers' SDPA avoids for even groups.

A cut projection keeps its source's memory layout: GPT-2's ``Conv1D`` stores ``A``
(d_in, d_out), ``nn.Linear`` stores ``A^T``. At batch 1 a decode step is a
matrix-vector product per projection, and on the CPU torch's BLAS streams the
(d_in, d_out) layout faster than the transposed one (docs/BENCHMARKS.md, "Measured design
choices"), so a GPT-2 projection that became an ``nn.Linear`` would read its fewer bytes
more slowly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..adapters import Adapter, get_adapter, projection_matrix
from ..errors import ArgumentError
from .plain_bias import add_to_bias, check_bias_possible, mean_over_positions, validate_positions
from .position_limit import guard_positions
from .position_tables import (
    PositionTable,
    TokenBiasLinear,
    bias_table,
    extend_rows,
    resample_table,
    stores_linear_layout,
    validate_extrapolate,
)
from .positional import KV_SLOTS, install
from .stand_ins import ConstantOutput, PlainConv1D, PlainLinear, PositionMean, RemovedAttention, RemovedNorm
from .surgery import ATTRIBUTES, replace_module, set_attributes

ABLATIONS = ("mean", "zero")


def check_ablation(ablation: str, extrapolate: str, positions: str = "indexed") -> None:
    """The one check of the ablation kind, of the rule for positions past the means' calibration length and of
    whether the means stay per position."""
    if ablation not in ABLATIONS:
        raise ArgumentError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    validate_extrapolate(extrapolate)
    validate_positions(positions)


def check_plain_removal(model: nn.Module, ablation: str, positions: str) -> None:
    """Refuse, before any work, a model whose output projections cannot hold the heads' means as a plain bias."""
    if ablation == "mean" and positions == "mean":
        adapter = get_adapter(model)
        check_bias_possible(adapter, [(layer, "o") for layer in range(adapter.n_layers)])


@dataclass
class ComponentMeans:
    """Per-position mean outputs over D_a: ``heads (layers, heads, calib_len, d_model)``, ``mlps (layers, calib_len, d_model)``,
    and the real tokens seen at each position, ``counts (calib_len,)``."""

    heads: torch.Tensor
    mlps: torch.Tensor
    counts: torch.Tensor

    @property
    def calib_len(self) -> int:
        return int(self.heads.shape[2])


@dataclass(frozen=True)
class HeadLayout:
    """The heads a shrunk attention keeps, in slot order: query heads, each kept KV head once, and the
    KV slot each query slot reads."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    kv_slots: tuple[int, ...]

    @property
    def group(self) -> int | None:
        """Query heads per KV head when every kept KV head serves as many; None for uneven groups."""
        group = len(self.q_heads) // len(self.kv_heads)
        return group if self.kv_slots == tuple(slot // group for slot in range(len(self.q_heads))) else None


def head_layout(adapter: Adapter, kept: Sequence[int]) -> HeadLayout:
    """Kept query heads in index order, the KV heads they read in index order, and which one each reads."""
    q_heads = tuple(sorted(kept))
    kv_heads = tuple(sorted({adapter.kv_head(head) for head in q_heads}))
    return HeadLayout(q_heads, kv_heads, tuple(kv_heads.index(adapter.kv_head(head)) for head in q_heads))


def remove_components(
    model: nn.Module,
    heads_removed: Mapping[int, Sequence[int]],
    mlps_removed: Sequence[int],
    means: ComponentMeans | None,
    ablation: str = "mean",
    extrapolate: str = "mean",
    positions: str = "indexed",
) -> None:
    """Remove heads (per layer) and MLPs from an unpruned ``model`` in place (docs/MATH.md §4).

    ``means`` (from :func:`eigenfast.runtime.means.component_means`) is needed for mean
    ablation only; positions past its calibration length follow ``extrapolate``. The
    result's logits equal the hook-ablated model's (:func:`eigenfast.circuit.ablated`).
    The parameter count drops by the removed weights; under mean ablation a shrunk
    output projection's bias also leaves the parameters, for its position table (a buffer).
    With ``positions="mean"`` each mean is taken over every token instead of per position:
    removed heads' means join the output projection's ordinary bias, a removed MLP or
    attention becomes a constant, and the result equals hook ablation with those means.
    """
    check_ablation(ablation, extrapolate, positions)
    if ablation == "mean" and means is None:
        raise ArgumentError("mean ablation needs the components' means: pass means=component_means(model, patch_data)")
    check_plain_removal(model, ablation, positions)
    adapter = get_adapter(model)
    heads = _validated_heads(adapter, heads_removed)
    mlps = _validated_layers(adapter, mlps_removed)
    _refuse_pruned(adapter, set(heads) | set(mlps))
    stand_in = _StandIns(adapter, means if ablation == "mean" else None, extrapolate, positions)

    attention_gone = set()
    for layer, removed in heads.items():
        kept = [h for h in range(adapter.n_heads) if h not in removed]
        if kept:
            bias_rows = stand_in.attention_bias(layer, removed)
            _shrink_attention(adapter, layer, head_layout(adapter, kept), bias_rows, extrapolate)
            if stand_in.constants is not None:
                add_to_bias(adapter, layer, "o", stand_in.constants.heads[layer, removed].sum(dim=0))
        else:
            output = stand_in.attention(layer)
            module = RemovedAttention(output, layer)
            replace_module(model, _attention_path(adapter, layer), module)
            attention_gone.add(layer)
    for layer in mlps:
        replace_module(model, _mlp_path(adapter, layer), stand_in.mlp(layer))
    _remove_unread_norms(adapter, attention_gone, set(mlps))
    install(model)
    guard_positions(model)


class _StandIns:
    """Builds what replaces removed components: mean tables (mean ablation) or constants (zero ablation).

    Tables are extended ones (``calib_len + 1`` rows, the last serving every later position), so an
    output projection that already has a position table (a pruned model) adds to it exactly. With
    ``positions="mean"`` the means are taken over all positions (``constants``) and no table is made
    from them.
    """

    def __init__(self, adapter: Adapter, means: ComponentMeans | None, extrapolate: str, positions: str) -> None:
        self.adapter = adapter
        self.constants = None if means is None or positions == "indexed" else _over_positions(means)
        self.means = None if self.constants is not None else means
        self.extrapolate = extrapolate
        weight = next(adapter.model.parameters())
        self.like = {"dtype": weight.dtype, "device": weight.device}

    def _o(self, layer: int) -> nn.Module:
        return self.adapter.model.get_submodule(self.adapter.site(layer, "o").path)

    def _mean_table(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        return resample_table(extend_rows(rows.to(**self.like), self.extrapolate), length)

    def attention_bias(self, layer: int, removed: Sequence[int]) -> torch.Tensor | None:
        """The shrunk output projection's extended bias table, or None to keep its plain bias."""
        o = self._o(layer)
        if self.means is None:
            return bias_table(o, o.calib_len) if isinstance(o, PositionTable) else None
        length = max(self.means.calib_len, getattr(o, "calib_len", 0))
        return bias_table(o, length) + self._mean_table(self.means.heads[layer, list(removed)].sum(dim=0), length)

    def attention(self, layer: int) -> nn.Module:
        shift = 0.0 if self.constants is None else self.constants.heads[layer].sum(dim=0).to(**self.like)
        table = self.attention_bias(layer, range(self.adapter.n_heads))
        if table is None:
            return self._constant(bias_table(self._o(layer), 0)[0] + shift)
        return self._table(table + shift)

    def mlp(self, layer: int) -> nn.Module:
        if self.constants is not None:
            return self._constant(self.constants.mlps[layer].to(**self.like))
        if self.means is None:
            return self._constant(torch.zeros(self.adapter.d_model, **self.like))
        return self._table(self._mean_table(self.means.mlps[layer], self.means.calib_len))

    def _table(self, table: torch.Tensor) -> PositionMean:
        module = PositionMean(table.shape[0] - 1, table.shape[1], self.extrapolate).to(**self.like)
        module.set_table(table)
        return module

    def _constant(self, value: torch.Tensor) -> ConstantOutput:
        module = ConstantOutput(value.shape[0]).to(**self.like)
        module.value.copy_(value)
        return module


@dataclass
class _Constants:
    """Each component's mean output over every token: ``heads (layers, heads, d_model)``, ``mlps (layers, d_model)``."""

    heads: torch.Tensor
    mlps: torch.Tensor


def _over_positions(means: ComponentMeans) -> _Constants:
    return _Constants(mean_over_positions(means.heads, means.counts), mean_over_positions(means.mlps, means.counts))


def _shrink_attention(
    adapter: Adapter, layer: int, layout: HeadLayout, bias_rows: torch.Tensor | None, extrapolate: str
) -> None:
    """Cut Q/K/V/O down to ``layout``; ``bias_rows`` (mean ablation) becomes O's position-indexed bias."""
    model = adapter.model
    heads = {"q": layout.q_heads, "k": layout.kv_heads, "v": layout.kv_heads}
    o = adapter.site(layer, "o")  # before Q is cut: the site reads the head count off Q's width
    blocks: dict[str, list[torch.Tensor]] = {}
    for component, kept in heads.items():
        site = adapter.site(layer, component)
        blocks.setdefault(site.path, []).extend(site.out_index[h] for h in kept)
    for path, columns in blocks.items():
        # Fused projections (GPT-2 [Q|K|V], NeoX per-head [q|k|v]) keep their layout: head blocks stay in
        # their original column order.
        columns = sorted(columns, key=lambda block: int(block[0]))
        replace_module(model, path, _cut(model.get_submodule(path), columns=torch.cat(columns)))
    rows = torch.cat([o.in_index[h] for h in layout.q_heads])
    replace_module(model, o.path, _cut(model.get_submodule(o.path), rows=rows, table=bias_rows, extrapolate=extrapolate))
    attention = adapter.attention(layer)
    if layout.group is not None:
        set_attributes(attention, adapter.head_count_attributes(len(layout.q_heads), len(layout.kv_heads)))
    else:  # the forward pads Q out to the largest group for every KV head (eigenfast/rewrite/positional.py)
        widest = max(layout.kv_slots.count(slot) for slot in range(len(layout.kv_heads)))
        attributes = adapter.head_count_attributes(widest * len(layout.kv_heads), len(layout.kv_heads))
        set_attributes(attention, {**attributes, KV_SLOTS: list(layout.kv_slots)})


def _cut(
    module: nn.Module,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    extrapolate: str = "mean",
) -> nn.Module:
    """The projection restricted to input ``rows`` / output ``columns`` (math orientation), in the source's layout.

    With an extended bias ``table`` (calib_len + 1, d_out), or when the module already has
    a position table, it becomes a token-bias projection reading it at true positions;
    otherwise a plain one keeping the original bias.
    """
    A = projection_matrix(module).detach()
    A = A if rows is None else A[rows]
    A = A if columns is None else A[:, columns]
    if table is None and isinstance(module, PositionTable):
        table, extrapolate = module.table.detach(), module.extrapolate
        table = table if columns is None else table[:, columns]
    linear_layout = stores_linear_layout(module)
    if table is None:
        if linear_layout:
            new = PlainLinear(A.shape[0], A.shape[1], bias=module.bias is not None, dtype=A.dtype, device=A.device)
        else:
            new = PlainConv1D(A.shape[1], A.shape[0]).to(dtype=A.dtype, device=A.device)
        if module.bias is not None:
            with torch.no_grad():
                new.bias.copy_(module.bias if columns is None else module.bias[columns])
        with torch.no_grad():
            new.weight.copy_(A.T if linear_layout else A)
    else:
        new = TokenBiasLinear(A.shape[0], A.shape[1], table.shape[0] - 1, extrapolate, linear_layout=linear_layout)
        new = new.to(dtype=A.dtype, device=A.device)
        new.set_table(table)
        new.set_matrix(A)
    return new


def _remove_unread_norms(adapter: Adapter, attention_gone: set[int], mlps_gone: set[int]) -> None:
    """Drop each norm whose every reader left; a parallel block's shared norm (Phi) stays while the MLP does."""
    shared = adapter.mlp_norm_path is None
    for layer in attention_gone | mlps_gone:
        unread = []
        if layer in attention_gone and (not shared or layer in mlps_gone):
            unread.append(adapter.attn_norm_path)
        if layer in mlps_gone and not shared:
            unread.append(adapter.mlp_norm_path)
        for name in unread:
            replace_module(adapter.model, f"{adapter.layer_path(layer)}.{name}", RemovedNorm())


def _attention_path(adapter: Adapter, layer: int) -> str:
    return f"{adapter.layer_path(layer)}.{adapter.attn_path}"


def _mlp_path(adapter: Adapter, layer: int) -> str:
    return f"{adapter.layer_path(layer)}.{adapter.mlp_path}"


def _validated_layers(adapter: Adapter, layers: Sequence[int]) -> list[int]:
    bad = [layer for layer in layers if not 0 <= layer < adapter.n_layers]
    if bad:
        raise ArgumentError(f"layer(s) {bad} out of range: the model has {adapter.n_layers} layers")
    return sorted(set(layers))


def _validated_heads(adapter: Adapter, heads: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    out = {}
    for layer in _validated_layers(adapter, list(heads)):
        bad = [h for h in heads[layer] if not 0 <= h < adapter.n_heads]
        if bad:
            raise ArgumentError(f"head(s) {bad} of layer {layer} out of range: layers have {adapter.n_heads} heads")
        if heads[layer]:
            out[layer] = sorted(set(heads[layer]))
    return out


def _refuse_pruned(adapter: Adapter, layers: set[int]) -> None:
    """Head indices refer to the original model: refuse layers that a previous removal already changed."""
    for layer in layers:
        attention, mlp = adapter.attention(layer), adapter.mlp(layer)
        changed = isinstance(attention, RemovedAttention) or hasattr(attention, ATTRIBUTES)
        if changed or isinstance(mlp, (PositionMean, ConstantOutput)):
            raise ArgumentError(
                f"layer {layer} already had components removed; remove_components works on the unpruned model, "
                "so pass every component to remove in one call"
            )


def remove_pruned(
    model: nn.Module,
    pruned_heads: Iterable[tuple[int, int]],
    pruned_mlps: Iterable[int],
    means: "ComponentMeans | None",
    ablation: str = "mean",
    extrapolate: str = "mean",
    inplace: bool = False,
    positions: str = "indexed",
) -> nn.Module:
    """``model`` (or a copy, unless ``inplace``) with the pruned heads and MLPs physically removed."""
    check_ablation(ablation, extrapolate, positions)
    check_plain_removal(model, ablation, positions)  # before the copy
    target = model if inplace else copy.deepcopy(model)
    heads_removed: dict[int, list[int]] = {}
    for layer, head in sorted(pruned_heads):
        heads_removed.setdefault(layer, []).append(head)
    remove_components(target, heads_removed, sorted(pruned_mlps), means, ablation, extrapolate, positions)
    return target
