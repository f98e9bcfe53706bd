"""Hook ablation of heads and MLPs: the model a physically extracted circuit must reproduce.

A head is ablated by zeroing its slice of the attention output projection's
input (removing ``z_h W_O^h``) and, under mean ablation, adding its mean
contribution at the output; an MLP by replacing its output with its mean (or
zero). Means are read at true token positions, as position tables are.

:class:`Patcher` does the work and can ablate a different set of components in
each of ``G`` equal groups of batch rows; that is how discovery evaluates
several candidate circuits in one forward. :func:`ablated` is the one-group case.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..adapters.projection import PositionalModule
from ..errors import ArgumentError
from ..rewrite.position_tables import extend_rows, table_positions
from ..rewrite.removal import ComponentMeans, check_ablation
from ..runtime.forward import model_device
from ..runtime.hooks import Hooks, hidden_states
from ..runtime.position_tracker import PositionTracker


@dataclass(frozen=True)
class Ablation:
    """A set of ablated components: heads as ``(layer, head)``, MLPs by layer."""

    heads: frozenset[tuple[int, int]] = frozenset()
    mlps: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.heads or self.mlps)

    def at(self, layer: int) -> tuple[tuple[int, ...], bool]:
        """The ablated heads of ``layer`` (sorted) and whether its MLP is ablated."""
        return tuple(sorted(h for l, h in self.heads if l == layer)), layer in self.mlps


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-built tensor on ``device`` without a stream sync (pinned, asynchronous copy on CUDA).

    A plain ``.to("cuda")`` of pageable memory waits for the copy; the caching
    host allocator keeps a pinned buffer alive until its copy has run.
    """
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class _LayerPlan:
    """What one layer's hooks do to each group (a leading dim of 1 means: the same for all).

    The two flags come from the host-side component sets, so deciding to skip
    work never reads a device tensor.
    """

    keep: torch.Tensor | None  # (G, d_o) 1/0 mask on the o-projection input
    head_rows: torch.Tensor | None  # (G, calib_len + 1, d_model) summed mean contributions
    mlp_off: torch.Tensor | None  # (G,) bool
    attention_off: bool  # every group ablates every head of the layer
    mlp_all_off: bool  # every group ablates the layer's MLP


class Patcher:
    """Ablation hooks on every layer; :meth:`set` chooses what each row group ablates.

    ``rows`` gives, for the batch in flight, each token's row in the mean
    tables (see :func:`~eigenfast.circuit.modules.table_positions`). With
    ``skip``, attention blocks with no head left and MLPs every group ablates
    run on one row of the batch (zero rows would break the models' reshapes)
    and their hooks supply the output. That is exact: such a block's output is
    a function of the plan alone (the o-projection's bias plus the heads'
    means; the MLP's mean or zero). Hooks only: no module of the model is
    modified.
    """

    def __init__(
        self,
        adapter: Adapter,
        means: ComponentMeans | None,
        ablation: str,
        extrapolate: str,
        rows: Callable[[], torch.Tensor],
        skip: bool = False,
    ) -> None:
        check_ablation(ablation, extrapolate)
        if ablation == "mean" and means is None:
            raise ArgumentError("mean ablation needs the component means: pass means=component_means(model, patch_data)")
        self.adapter = adapter
        self.ablation = ablation
        self.rows = rows
        self.skip = skip
        self.device = model_device(adapter.model)
        self.dtype = next(adapter.model.parameters()).dtype
        self.sites = [adapter.site(layer, "o") for layer in range(adapter.n_layers)]
        # A pruned o-projection's bias depends on the position, so a block with no head left cannot be
        # stood in for by one row's output: such blocks run in full.
        self.skippable_attention = [
            not isinstance(adapter.model.get_submodule(site.path), PositionalModule) for site in self.sites
        ]
        # (heads, d_o) 1/0: which o-projection inputs each head owns; a plan's
        # masks are then one small product with the host-built (G, heads) choice.
        self.head_columns = []
        for site in self.sites:
            columns = torch.zeros(adapter.n_heads, site.in_index.numel())
            for head in range(adapter.n_heads):
                columns[head, site.in_index[head]] = 1.0
            self.head_columns.append(columns.to(self.device, self.dtype))
        if ablation == "mean":
            _check_shapes(adapter, means)
            self.head_rows = extend_rows(means.heads, extrapolate).to(self.device)
            self.mlp_rows = extend_rows(means.mlps, extrapolate).to(self.device)
        self.groups = 1
        self.plans: dict[int, _LayerPlan] = {}
        self._skipped_rows = 0  # rows of the batch a skipped block would have seen

    def set(self, groups: Sequence[Ablation]) -> None:
        """Ablate ``groups[g]`` in the ``g``-th of ``len(groups)`` equal blocks of batch rows."""
        self.groups = len(groups)
        self.plans = {}
        for layer in range(self.adapter.n_layers):
            per_group = [g.at(layer) for g in groups]
            if any(heads or mlp for heads, mlp in per_group):
                if all(p == per_group[0] for p in per_group):
                    per_group = per_group[:1]  # broadcast one plan over every group
                self.plans[layer] = self._plan(layer, per_group)

    def _plan(self, layer: int, per_group: list[tuple[tuple[int, ...], bool]]) -> _LayerPlan:
        keep = head_rows = mlp_off = None
        n_heads = self.adapter.n_heads
        if any(heads for heads, _ in per_group):
            chosen = torch.zeros(len(per_group), n_heads)
            for g, (heads, _) in enumerate(per_group):
                chosen[g, list(heads)] = 1.0
            chosen = to_device(chosen, self.device)
            keep = 1.0 - chosen.to(self.dtype) @ self.head_columns[layer]
            if self.ablation == "mean":
                head_rows = torch.einsum("gh,hpd->gpd", chosen.to(self.head_rows.dtype), self.head_rows[layer])
        if any(mlp for _, mlp in per_group):
            mlp_off = to_device(torch.tensor([mlp for _, mlp in per_group]), self.device)
        return _LayerPlan(
            keep, head_rows, mlp_off,
            attention_off=all(len(heads) == n_heads for heads, _ in per_group),
            mlp_all_off=all(mlp for _, mlp in per_group),
        )

    def _means_at_rows(self, table: torch.Tensor) -> torch.Tensor:
        """``(G, calib_len + 1, d)`` → ``(G, B/G, T, d)`` at the current rows."""
        return table[:, self.rows()]

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Install the hooks for the block (they do nothing in layers without a plan); removed on exit."""
        with Hooks(self.adapter.model) as hooks:
            for layer, site in enumerate(self.sites):
                o_proj = hooks.module(site)
                hooks.replace_input(o_proj, self._o_input(layer))
                hooks.replace_output(o_proj, self._o_output(layer))
                mlp = self.adapter.mlp(layer)
                hooks.replace_output(mlp, self._mlp_output(layer))
                if self.skip and self.skippable_attention[layer]:
                    attention = self.adapter.attention(layer)
                    # What a block with no head left outputs before the means: the o-projection of
                    # zeros (its bias), computed once; .forward bypasses the hooks.
                    with torch.no_grad():
                        d_o = self.head_columns[layer].shape[1]
                        bias = o_proj.forward(torch.zeros(1, 1, d_o, device=self.device, dtype=self.dtype))
                    off = lambda plan: plan.attention_off  # noqa: E731
                    hooks.pre(attention, self._one_row_hook(layer, off), with_kwargs=True)
                    hooks.replace_output(attention, self._skipped_attention_output(layer, bias))
                if self.skip:
                    off = lambda plan: plan.mlp_all_off  # noqa: E731
                    hooks.pre(mlp, self._one_row_hook(layer, off), with_kwargs=True)
            yield

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (self.groups, -1))

    def _skipping(self, layer: int, attention: bool) -> bool:
        plan = self.plans.get(layer)
        if plan is None or not self.skip:
            return False
        return plan.attention_off and self.skippable_attention[layer] if attention else plan.mlp_all_off

    def _one_row_hook(self, layer: int, off: Callable[[_LayerPlan], bool]):
        """Feed a block that is ablated for every group one row (every batch-leading argument sliced)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            plan = self.plans.get(layer)
            if plan is None or not off(plan):
                return None
            hidden = hidden_states(args, kwargs)
            self._skipped_rows = len(hidden)
            return _one_row(args, len(hidden)), _one_row(kwargs, len(hidden))

        return hook

    def _skipped_attention_output(self, layer: int, bias: torch.Tensor):
        def replace(output: Any) -> Any:
            if not self._skipping(layer, attention=True):
                return None
            value = bias.expand(self._skipped_rows, 1, -1)
            plan = self.plans[layer]
            if plan.head_rows is not None:
                means = self._means_at_rows(plan.head_rows).to(value.dtype)
                value = value + means.expand(self.groups, *means.shape[1:]).flatten(0, 1)
            return (value, *output[1:]) if isinstance(output, tuple) else value

        return replace

    def _o_input(self, layer: int):
        def replace(args: tuple) -> tuple | None:
            plan = self.plans.get(layer)
            if plan is None or plan.keep is None or self._skipping(layer, attention=True):
                return None
            return ((self._grouped(args[0]) * plan.keep[:, None, None, :]).flatten(0, 1), *args[1:])

        return replace

    def _o_output(self, layer: int):
        def replace(output: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans.get(layer)
            if plan is None or plan.head_rows is None or self._skipping(layer, attention=True):
                return None
            return (self._grouped(output) + self._means_at_rows(plan.head_rows).to(output.dtype)).flatten(0, 1)

        return replace

    def _mlp_output(self, layer: int):
        def replace(output: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans.get(layer)
            if plan is None or plan.mlp_off is None:
                return None
            if self._skipping(layer, attention=False):
                if self.ablation == "zero":
                    return output.new_zeros(self._skipped_rows, 1, output.shape[-1])
                mean = self._means_at_rows(self.mlp_rows[layer].unsqueeze(0)).to(output.dtype)
                return mean.expand(self.groups, *mean.shape[1:]).flatten(0, 1)
            off = plan.mlp_off[:, None, None, None]
            out = self._grouped(output)
            if self.ablation == "zero":
                return out.masked_fill(off, 0.0).flatten(0, 1)
            mean = self._means_at_rows(self.mlp_rows[layer].unsqueeze(0)).to(output.dtype)
            return torch.where(off, mean, out).flatten(0, 1)

        return replace


def _one_row(value: Any, rows: int) -> Any:
    """Slice every batch-leading tensor (leading dim ``rows``, at least 2-D) to its first row; others stay."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows:
        return value[:1]
    if isinstance(value, (tuple, list)):
        return type(value)(_one_row(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _one_row(v, rows) for k, v in value.items()}
    return value


def _check_shapes(adapter: Adapter, means: ComponentMeans) -> None:
    expected = (adapter.n_layers, adapter.n_heads)
    if tuple(means.heads.shape[:2]) != expected or means.heads.shape[-1] != adapter.d_model:
        raise ArgumentError(
            f"the means are for a model with (layers, heads, d_model) = "
            f"{tuple(means.heads.shape[:2]) + (means.heads.shape[-1],)}, this one has {expected + (adapter.d_model,)}"
        )


def check_components(adapter: Adapter, heads: Iterable[tuple[int, int]], mlps: Iterable[int]) -> Ablation:
    """An :class:`Ablation`, after checking every layer and head index exists."""
    heads, mlps = frozenset((int(l), int(h)) for l, h in heads), frozenset(int(l) for l in mlps)
    bad = [(l, h) for l, h in heads if not (0 <= l < adapter.n_layers and 0 <= h < adapter.n_heads)]
    bad += [l for l in mlps if not 0 <= l < adapter.n_layers]
    if bad:
        raise ArgumentError(
            f"no such component(s) {sorted(bad, key=str)}: the model has {adapter.n_layers} layers "
            f"of {adapter.n_heads} heads"
        )
    return Ablation(heads, mlps)


@contextlib.contextmanager
def ablated(
    model: nn.Module,
    heads: Iterable[tuple[int, int]] = (),
    mlps: Iterable[int] = (),
    means: ComponentMeans | None = None,
    ablation: str = "mean",
    extrapolate: str = "mean",
) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs with the given heads and MLPs ablated (hooks; removed on exit).

    Under mean ablation the means are read at true positions, worked out from
    ``position_ids`` (or, when absent, the attention mask, which then also sets
    the model's own position ids), exactly as an extracted model's position
    tables read them.
    """
    adapter = get_adapter(model)
    components = check_components(adapter, heads, mlps)
    tracker = PositionTracker()
    calib_len = means.calib_len if means is not None else 0
    patcher = Patcher(
        adapter, means, ablation, extrapolate, lambda: table_positions(tracker.current(), calib_len, extrapolate)
    )
    patcher.set([components])
    with Hooks(model) as hooks, patcher.hooks():
        if ablation == "mean" and components:
            hooks.pre(adapter.backbone(), tracker, with_kwargs=True)
        yield model
