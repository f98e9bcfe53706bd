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
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..forward import model_device
from ..positions import PositionTracker
from .means import ComponentMeans, clamp_positions, extend_rows

ABLATIONS = ("mean", "zero")


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


@dataclass
class _LayerPlan:
    """What one layer's hooks do to each group (a leading dim of 1 means: the same for all)."""

    keep: torch.Tensor | None  # (G, d_o) 1/0 mask on the o-projection input
    head_rows: torch.Tensor | None  # (G, calib_len + 1, d_model) summed mean contributions
    mlp_off: torch.Tensor | None  # (G,) bool


class Patcher:
    """Ablation hooks on every layer; :meth:`set` chooses what each row group ablates."""

    def __init__(
        self,
        adapter: Adapter,
        means: ComponentMeans | None,
        ablation: str,
        extrapolate: str,
        positions: Callable[[], torch.Tensor],
    ) -> None:
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        if ablation == "mean" and means is None:
            raise ValueError("mean ablation needs the component means: pass means=component_means(model, patch_data)")
        self.adapter = adapter
        self.ablation = ablation
        self.extrapolate = extrapolate
        self.positions = positions
        self.device = model_device(adapter.model)
        self.dtype = next(adapter.model.parameters()).dtype
        self.sites = [adapter.site(layer, "o") for layer in range(adapter.n_layers)]
        self.calib_len = 0
        if ablation == "mean":
            _check_shapes(adapter, means)
            self.calib_len = means.calib_len
            self.head_rows = extend_rows(means.heads, extrapolate)
            self.mlp_rows = extend_rows(means.mlps, extrapolate)
        self.groups = 1
        self.plans: dict[int, _LayerPlan] = {}

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
        if any(heads for heads, _ in per_group):
            index = self.sites[layer].in_index
            keep = torch.ones(len(per_group), index.numel())
            for g, (heads, _) in enumerate(per_group):
                keep[g, index[list(heads)].flatten()] = 0.0
            keep = keep.to(self.device, self.dtype)
            if self.ablation == "mean":
                rows = self.head_rows[layer]
                head_rows = torch.stack([rows[list(heads)].sum(dim=0) for heads, _ in per_group])
        if any(mlp for _, mlp in per_group):
            mlp_off = torch.tensor([mlp for _, mlp in per_group], device=self.device)
        return _LayerPlan(keep, head_rows, mlp_off)

    def _rows(self, table: torch.Tensor) -> torch.Tensor:
        """``(G, calib_len + 1, d)`` → ``(G, B/G or 1, T, d)`` at the current true positions."""
        return table[:, clamp_positions(self.positions(), self.calib_len, self.extrapolate)]

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Install the hooks for the block (they do nothing in layers without a plan)."""
        handles = []
        for layer, site in enumerate(self.sites):
            o_proj = self.adapter.model.get_submodule(site.path)
            handles.append(o_proj.register_forward_pre_hook(self._o_input_hook(layer)))
            handles.append(o_proj.register_forward_hook(self._o_output_hook(layer)))
            handles.append(self.adapter.mlp(layer).register_forward_hook(self._mlp_hook(layer)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (self.groups, -1))

    def _o_input_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            plan = self.plans.get(layer)
            if plan is None or plan.keep is None:
                return None
            return ((self._grouped(args[0]) * plan.keep[:, None, None, :]).flatten(0, 1), *args[1:])

        return hook

    def _o_output_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans.get(layer)
            if plan is None or plan.head_rows is None:
                return None
            return (self._grouped(output) + self._rows(plan.head_rows).to(output.dtype)).flatten(0, 1)

        return hook

    def _mlp_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = self.plans.get(layer)
            if plan is None or plan.mlp_off is None:
                return None
            off = plan.mlp_off[:, None, None, None]
            out = self._grouped(output)
            if self.ablation == "zero":
                return out.masked_fill(off, 0.0).flatten(0, 1)
            mean = self._rows(self.mlp_rows[layer].unsqueeze(0)).to(output.dtype)
            return torch.where(off, mean, out).flatten(0, 1)

        return hook


def _check_shapes(adapter: Adapter, means: ComponentMeans) -> None:
    expected = (adapter.n_layers, adapter.n_heads)
    if tuple(means.heads.shape[:2]) != expected or means.heads.shape[-1] != adapter.d_model:
        raise ValueError(
            f"the means are for a model with (layers, heads, d_model) = "
            f"{tuple(means.heads.shape[:2]) + (means.heads.shape[-1],)}, this one has {expected + (adapter.d_model,)}"
        )


def check_components(adapter: Adapter, heads: Iterable[tuple[int, int]], mlps: Iterable[int]) -> Ablation:
    """An :class:`Ablation`, after checking every layer and head index exists."""
    heads, mlps = frozenset((int(l), int(h)) for l, h in heads), frozenset(int(l) for l in mlps)
    bad = [(l, h) for l, h in heads if not (0 <= l < adapter.n_layers and 0 <= h < adapter.n_heads)]
    bad += [l for l in mlps if not 0 <= l < adapter.n_layers]
    if bad:
        raise ValueError(
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
    patcher = Patcher(adapter, means, ablation, extrapolate, tracker.current)
    patcher.set([components])
    with contextlib.ExitStack() as stack:
        if ablation == "mean" and components:
            handle = adapter.backbone().register_forward_pre_hook(tracker, with_kwargs=True)
            stack.callback(handle.remove)
        stack.enter_context(patcher.hooks())
        yield model
