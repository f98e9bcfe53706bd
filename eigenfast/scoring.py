"""Attribution scores of every rank-one term (docs/MATH.md §2), streamed in two passes.

Pass 1 (forward only, stops after the highest selected layer) reduces, per
token position, the max/min of every U-projection and the sum of each site's
inputs (for the freezing means). Pass 2 (forward + backward of activation
gradients only, stopping below the lowest selected layer) combines each batch's
U-projections with its gradient projections and max-reduces into ``(heads, r)``.
Only O(positions × heads × rank) statistics outlive a batch.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapters import Adapter, Site, get_adapter, head_inputs, head_outputs, projection_matrix
from .attribution import pass1_update, pass2_update
from .data import TaskData, as_task_data
from .forward import eval_mode, last_logits, model_device
from .progress import progress
from .svd import Factors, site_factors

PAIRS = ("all", "shift")
Key = tuple[int, str]


@dataclass
class SiteStats:
    site: Site
    factors: Factors  # float64, exact: freezing uses these
    work: Factors  # float32 on the model's device: the kernels use these
    pmax: torch.Tensor | None
    pmin: torch.Tensor | None
    scores: torch.Tensor  # (heads, r), running max


@dataclass
class Attribution:
    """Everything the two passes learned: scores, SVD factors and per-position mean inputs."""

    stats: dict[Key, SiteStats]
    input_sums: dict[str, torch.Tensor]  # module path -> (calib_len, d_in_total)
    counts: torch.Tensor  # (calib_len,) real tokens seen at each position
    pairs: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def calib_len(self) -> int:
        return int(self.counts.shape[0])

    @property
    def scores(self) -> dict[Key, torch.Tensor]:
        return {key: st.scores.cpu() for key, st in self.stats.items()}

    def mean_input(self, key: Key) -> torch.Tensor:
        """x̄[t]: the mean activation entering the site's module at each position, ``(calib_len, d_in_total)``."""
        total = self.input_sums[self.stats[key].site.path]
        return total.double() / self.counts.to(total.device).double().unsqueeze(1)


def score(
    model: nn.Module,
    data: "TaskData | dict",
    components: Sequence[str] = ("k",),
    pairs: str = "all",
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    backend: str = "auto",
    progress_bar: bool = True,
) -> dict[Key, torch.Tensor]:
    """ΔL of every rank-one term: ``{(layer, component): (heads, rank)}``, singular values descending."""
    # Scores alone need pass 1 only for the all-pairs ranges, never for the means.
    return attribute(model, data, components, pairs, batch_size, layers, backend, progress_bar, need_means=False).scores


def attribute(
    model: nn.Module,
    data: "TaskData | dict",
    components: Sequence[str] = ("k",),
    pairs: str = "all",
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    backend: str = "auto",
    progress_bar: bool = True,
    need_means: bool = True,
) -> Attribution:
    """Run both passes and keep the statistics (``prune`` needs the means as well as the scores)."""
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = as_task_data(data)
    adapter = get_adapter(model)
    sites = select_sites(adapter, components, layers)
    device = model_device(model)
    calib_len = data.max_length
    timings: dict[str, float] = {}

    start = time.perf_counter()
    stats = {site.key: _new_stats(adapter, site, calib_len, pairs, device) for site in sites}
    timings["svd"] = time.perf_counter() - start
    counts = torch.zeros(calib_len, dtype=torch.long, device=device)
    input_sums = {
        site.path: torch.zeros(calib_len, _fan_in(adapter.model.get_submodule(site.path)), device=device)
        for site in sites
    }
    n_batches = -(-len(data) // batch_size)

    with eval_mode(model):
        if pairs == "all" or need_means:
            start = time.perf_counter()
            desc = "pass 1: forward statistics" if progress_bar else None
            for batch in progress(data.batches(batch_size), n_batches, desc):
                _pass1_batch(adapter, batch, stats, input_sums, counts, pairs == "all", backend)
            timings["pass1"] = time.perf_counter() - start
        start = time.perf_counter()
        desc = "pass 2: forward+backward scores" if progress_bar else None
        for batch in progress(data.batches(batch_size), n_batches, desc):
            _pass2_batch(adapter, batch, stats, pairs, backend)
        timings["pass2"] = time.perf_counter() - start
    return Attribution(stats, input_sums, counts, pairs, timings)


def select_sites(adapter: Adapter, components: Sequence[str], layers: Sequence[int] | None) -> list[Site]:
    if isinstance(components, str):
        components = (components,)
    if not components:
        raise ValueError("components is empty; choose from " + ", ".join(adapter.components()))
    if layers is None:  # every layer, less what circuit extraction removed
        pairs = [(layer, c) for layer in range(adapter.n_layers) for c in dict.fromkeys(components)]
        sites = [adapter.site(layer, c) for layer, c in pairs if adapter.has_component(layer, c)]
        if not sites:
            raise ValueError(f"the model has no {'/'.join(components)} matrix left (circuit extraction removed them all)")
        return sites
    return [adapter.site(layer, c) for layer in sorted(set(layers)) for c in dict.fromkeys(components)]


def _fan_in(module: nn.Module) -> int:
    return projection_matrix(module).shape[0]


def _new_stats(adapter: Adapter, site: Site, calib_len: int, pairs: str, device: torch.device) -> SiteStats:
    module = adapter.model.get_submodule(site.path)
    factors = site_factors(module, site)
    heads, rank = factors.s.shape
    need_range = pairs == "all"
    return SiteStats(
        site=site,
        factors=factors,
        work=factors.to(device),
        pmax=torch.full((calib_len, heads, rank), -torch.inf, device=device) if need_range else None,
        pmin=torch.full((calib_len, heads, rank), torch.inf, device=device) if need_range else None,
        scores=torch.full((heads, rank), -torch.inf, device=device),
    )


class _StopForward(Exception):
    """Raised after the highest selected layer: pass 1 needs nothing above it."""


def _sites_by_module(stats: dict[Key, SiteStats]) -> dict[str, list[SiteStats]]:
    grouped: dict[str, list[SiteStats]] = defaultdict(list)
    for st in stats.values():
        grouped[st.site.path].append(st)
    return grouped


@torch.no_grad()
def _pass1_batch(
    adapter: Adapter,
    batch: TaskData,
    stats: dict[Key, SiteStats],
    input_sums: dict[str, torch.Tensor],
    counts: torch.Tensor,
    ranges: bool,
    backend: str,
) -> None:
    device = counts.device
    real = batch.mask.to(device).bool().reshape(-1)
    pos = batch.position_ids.to(device).reshape(-1)[real]
    counts.index_add_(0, pos, torch.ones_like(pos))

    def on_input(sites: list[SiteStats], x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])[real]
        input_sums[sites[0].site.path].index_add_(0, pos, rows.float())
        if ranges:
            for st in sites:
                pass1_update(head_inputs(rows, st.site), st.work.U, pos, st.pmax, st.pmin, backend=backend)

    top = max(st.site.layer for st in stats.values())
    with _input_hooks(adapter, stats, on_input), _stop_after(adapter.layers()[top]):
        try:
            adapter.backbone()(**batch.model_inputs(device), use_cache=False)
        except _StopForward:
            pass


def _pass2_batch(adapter: Adapter, batch: TaskData, stats: dict[Key, SiteStats], pairs: str, backend: str) -> None:
    device = model_device(adapter.model)
    mask = batch.mask.to(device).bool()
    if pairs == "shift":
        # The partner of example b is example b-1 of the same batch (the reference code's roll).
        real = (mask & mask.roll(1, dims=0)).reshape(-1)
    else:
        real = mask.reshape(-1)
    pos = batch.position_ids.to(device).reshape(-1)[real]

    def on_grad(sites: list[SiteStats], x: torch.Tensor, g: torch.Tensor) -> None:
        rows_x = x.reshape(-1, x.shape[-1])[real]
        rows_g = g.reshape(-1, g.shape[-1])[real]
        partner = x.roll(1, dims=0).reshape(-1, x.shape[-1])[real] if pairs == "shift" else None
        for st in sites:
            w = st.work
            pass2_update(
                head_inputs(rows_x, st.site),
                head_outputs(rows_g, st.site),
                w.U,
                w.V,
                w.s,
                pos,
                st.pmax,
                st.pmin,
                st.scores,
                partner=None if partner is None else head_inputs(partner, st.site),
                backend=backend,
            )

    bottom = min(st.site.layer for st in stats.values())
    with _frozen_parameters(adapter.model), _grad_hooks(adapter, stats, on_grad), _grad_from(adapter.layers()[bottom]):
        logits = last_logits(adapter, batch)
        # Summed, not averaged: each example's gradient is its own loss's, whatever the batch.
        loss = nn.functional.cross_entropy(logits, batch.labels.to(device), reduction="sum")
        loss.backward()


@contextlib.contextmanager
def _input_hooks(adapter: Adapter, stats: dict[Key, SiteStats], callback) -> Iterator[None]:
    handles = []
    for path, sites in _sites_by_module(stats).items():
        def hook(module, args, _sites=sites):
            callback(_sites, args[0].detach())

        handles.append(adapter.model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _grad_hooks(adapter: Adapter, stats: dict[Key, SiteStats], callback) -> Iterator[None]:
    handles = []
    for path, sites in _sites_by_module(stats).items():
        def hook(module, args, output, _sites=sites):
            x = args[0].detach()
            output.register_hook(lambda g: callback(_sites, x, g.detach()))

        handles.append(adapter.model.get_submodule(path).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _stop_after(layer: nn.Module) -> Iterator[None]:
    def hook(module, args, output):
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _grad_from(layer: nn.Module) -> Iterator[None]:
    """Make the residual stream entering ``layer`` the leaf of the graph: backward stops there."""

    def hook(module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_()
        return args, kwargs

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter gradients: only activation gradients are needed."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)

