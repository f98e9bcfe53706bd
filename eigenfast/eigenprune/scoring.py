"""Attribution scores of every rank-one term (docs/MATH.md §2), streamed in two passes.

Pass 1 (forward only, stops after the highest selected layer) reduces, per
token position, the max/min of every U-projection and the sum of each site's
inputs (for the freezing means). Pass 2 (forward + backward of activation
gradients only, stopping below the lowest selected layer) combines each batch's
U-projections with its gradient projections and max-reduces (or, for
``reduce="mean"``, sums) into ``(heads, r)``. Only O(positions × heads × rank)
statistics outlive a batch.

The per-batch loop never waits on the device: batches move to it before the loop,
padding rows are processed like real ones but land in a trash position row and
carry weight 0 in pass 2, so no boolean-mask indexing, ``nonzero`` or ``.item()``
happens per batch.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from ..adapters import COMPONENTS, Adapter, Site, get_adapter, head_inputs, head_outputs, projection_matrix
from ..data.task_data import TaskData, model_data
from ..errors import ArgumentError
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.forward import eval_mode, frozen_parameters, last_logits, model_device
from ..runtime.hooks import Hooks
from ..runtime.progress import progress as with_progress
from .attribution import REDUCE, pass1_update, pass2_update
from .graph_budget import graph_budget
from .svd import Factors, placed_terms, site_factors

PAIRS = ("all", "shift")
# How a term's effect on the loss is estimated (docs/MATH.md §2, "Estimates"): the first-order
# estimate at the model, integrated gradients along the path to the frozen values, or the first-order
# ranking with its lowest candidates checked by exact forwards (eigenfast/eigenprune/verification.py).
ESTIMATES = ("linear", "ig", "verified")
Key = tuple[int, str]


@dataclass
class SiteStats:
    site: Site
    factors: Factors  # float64, exact: freezing uses these
    work: Factors  # float32 on the site's device (its weight's): the kernels use these
    heads: Site  # ``site`` with its head indices on the site's device (no host copy per batch)
    pmax: torch.Tensor | None  # (calib_len + 1, heads, r): the last row collects padding
    pmin: torch.Tensor | None
    scores: torch.Tensor  # (heads, r): running max, or running weighted sum for reduce="mean"
    pmean: torch.Tensor | None = None  # (calib_len + 1, heads, r): u_i · x̄[t], all-pairs mean only


@dataclass
class Attribution:
    """Everything the two passes learned: scores, SVD factors and per-position mean inputs."""

    stats: dict[Key, SiteStats]
    input_sums: dict[str, torch.Tensor]  # module path -> (calib_len, d_in_total)
    counts: torch.Tensor  # (calib_len,) real tokens seen at each position
    pairs: str
    reduce: str = "max"
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


# The share of each component type's terms, lowest by the linear estimate, that the verified estimate checks and
# the integrated-gradients path moves when no p says how many could be frozen.
DEFAULT_FRACTION = 0.3


@renamed_keywords(progress_bar="progress", verify="fraction")
def score(
    model: nn.Module,
    data: "TaskData | dict",
    components: Sequence[str] = ("k",),
    pairs: str = "all",
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    backend: str = "auto",
    progress: bool = True,
    reduce: str = "max",
    estimate: str = "linear",
    steps: int = 8,
    fraction: float = DEFAULT_FRACTION,
) -> dict[Key, torch.Tensor]:
    """ΔL of every rank-one term: ``{(layer, component): (heads, rank)}``, singular values descending.

    ``reduce="max"`` (the paper's) takes the max over examples, positions and partners;
    ``reduce="mean"`` the mean over all those (example, position, partner) pairs.
    ``estimate="linear"`` is the first-order estimate at the model; ``"ig"`` integrates the
    gradient over ``steps`` points of the path on which the candidates, the lowest-scored
    ``fraction`` of every component's terms by the linear estimate, move from their values to
    their frozen values together, and scores the other terms ``+inf`` (``reduce="mean"``,
    ``pairs="all"``; costs the linear estimate's pass plus ``steps`` forward+backward passes;
    with ``steps=1`` the candidates' scores are the linear estimate's); ``"verified"`` measures
    the true ΔL (mean loss change per example) of freezing each candidate alone, in exact
    forwards, and scores the terms it did not check ``+inf``.
    """
    check_settings(pairs, reduce, batch_size, estimate, steps)
    if estimate == "verified":
        from .verification import verify_lowest  # it runs on the attribution this module makes

        attribution = attribute(model, data, components, pairs, batch_size, layers, backend, progress, reduce=reduce)
        return verify_lowest(model, attribution, data, fraction, batch_size, progress).scores
    # Scores alone need pass 1 only for the all-pairs statistics, never for the means.
    linear = attribute(
        model, data, components, pairs, batch_size, layers, backend, progress, need_means=False, reduce=reduce,
    )
    if estimate == "linear":
        return linear.scores
    moving = path_candidates(linear.scores, fraction)
    if steps == 1:  # the path's first point is the model itself
        return {key: s.masked_fill(~moving[key], torch.inf) for key, s in linear.scores.items()}
    return attribute(
        model, data, components, pairs, batch_size, layers, backend, progress, reduce=reduce, steps=steps,
        moving=moving,
    ).scores


def path_candidates(linear: dict[Key, torch.Tensor], fraction: float) -> dict[Key, torch.Tensor]:
    """The terms the integrated-gradients path moves: the ``fraction`` of each component type's terms that the
    linear estimate scores lowest, the terms any p up to ``fraction`` could freeze (docs/MATH.md §2)."""
    from .freezing import select_frozen  # freezing builds on this module's Attribution

    return select_frozen(linear, fraction)


@renamed_keywords(progress_bar="progress")
def attribute(
    model: nn.Module,
    data: "TaskData | dict",
    components: Sequence[str] = ("k",),
    pairs: str = "all",
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    backend: str = "auto",
    progress: bool = True,
    need_means: bool = True,
    reduce: str = "max",
    steps: int = 1,
    moving: dict[Key, torch.Tensor] | None = None,
) -> Attribution:
    """Run both passes and keep the statistics (``prune`` needs the means as well as the scores).

    ``steps > 1`` is the integrated-gradients estimate: pass 2 runs at ``steps`` points
    ``alpha = k / steps`` (k = 0..steps-1, a left Riemann sum) of the path on which the terms
    marked in ``moving`` (``{key: bool (heads, rank)}``; None: every selected term) move from
    their values to their frozen values together, and the scores average them. The terms that
    stand still score ``+inf``: the path integral is a moving term's share of the change, and
    a standing term has none, so none is ever frozen on its strength.
    """
    check_settings(pairs, reduce, batch_size, "ig" if steps > 1 else "linear", steps)
    data = model_data(data, model)
    adapter = get_adapter(model)
    sites = select_sites(adapter, components, layers)
    device = model_device(model)
    calib_len = data.max_length
    timings: dict[str, float] = {}

    start = time.perf_counter()
    factors = site_factors(adapter.model, sites)
    stats = {site.key: _new_stats(adapter, site, f, calib_len, pairs, reduce) for site, f in zip(sites, factors)}
    timings["svd"] = time.perf_counter() - start
    # Row calib_len of every per-position buffer is the trash row padding lands in, so no
    # batch ever selects its real rows with a boolean mask (a host synchronisation).
    # Per-site statistics live where the site's weight does (layers may sit on different
    # devices); batches and counts on the device of the model's first parameter.
    counts = torch.zeros(calib_len + 1, dtype=torch.long, device=device)
    input_sums = {
        site.path: torch.zeros(calib_len + 1, _fan_in(module), device=module.weight.device)
        for site in sites
        for module in [adapter.model.get_submodule(site.path)]
    }
    batches = [_DeviceBatch.of(batch, calib_len, device) for batch in distributed.local_batches(data, batch_size, model)]
    total = torch.zeros((), device=device)  # the mean's denominator: the weight of all pairs

    scorer = _Pass2(adapter, stats, pairs, reduce, backend)
    graphs: list[_Graph | None] = [None] * len(batches)
    with eval_mode(model):
        if pairs == "all" or need_means:
            start = time.perf_counter()
            desc = "pass 1: forward statistics" if progress else None
            ranges = pairs == "all" and reduce == "max"
            budget, kept = graph_budget(device), 0
            for i, batch in enumerate(with_progress(batches, len(batches), desc)):
                graphs[i] = _pass1_batch(
                    adapter, batch, stats, input_sums, counts, ranges, backend, scorer if kept < budget else None
                )
                kept += 0 if graphs[i] is None else graphs[i].nbytes
            distributed.all_max_(st.pmax for st in stats.values())
            distributed.all_min_(st.pmin for st in stats.values())
            distributed.all_sum_([counts, *input_sums.values()])
            timings["pass1"] = time.perf_counter() - start
        if pairs == "all" and reduce == "mean":
            _set_mean_projections(stats, input_sums, counts)
        if steps > 1:
            scorer.path = _path_tables(adapter, stats, input_sums, counts, moving)
        start = time.perf_counter()
        desc = "pass 2: forward+backward scores" if progress else None
        points = [(k / steps, i) for k in range(steps) for i in range(len(batches))]
        for alpha, i in with_progress(points, len(points), desc):
            batch = batches[i]
            weight = _pass2_weight(batch, pairs, reduce, counts)
            if reduce == "mean":
                total += weight.sum()  # summed over the steps too: the scores come out averaged over them
            _pass2_batch(scorer, batch, weight, graphs[i], alpha)
            graphs[i] = None  # frees the graph's activations
        if reduce == "max":
            distributed.all_max_(st.scores for st in stats.values())
        else:  # sums of weighted gains and of weights
            distributed.all_sum_([total, *(st.scores for st in stats.values())])
        timings["pass2"] = time.perf_counter() - start
    if reduce == "mean":
        for st in stats.values():
            st.scores /= total.to(st.scores.device)
    if moving is not None:
        for key, st in stats.items():
            st.scores.masked_fill_(~moving[key].to(st.scores.device), torch.inf)
    for st in stats.values():
        st.pmax, st.pmin, st.pmean = (None if t is None else t[:calib_len] for t in (st.pmax, st.pmin, st.pmean))
    input_sums = {path: t[:calib_len] for path, t in input_sums.items()}
    return Attribution(stats, input_sums, counts[:calib_len], pairs, reduce, timings)


def check_settings(pairs: str, reduce: str, batch_size: int, estimate: str = "linear", steps: int = 1) -> None:
    """The scoring settings a caller can get wrong, checked before any work (``PruneOptions`` checks them too)."""
    if estimate not in ESTIMATES:
        raise ArgumentError(
            f"estimate must be one of {ESTIMATES} ('linear': first-order, 'ig': integrated gradients, 'verified': "
            f"the lowest candidates checked by exact forwards), got {estimate!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ArgumentError(f"steps (integrated-gradient points) must be an integer >= 1, got {steps!r}")
    if estimate == "ig" and (pairs != "all" or reduce != "mean"):
        raise ArgumentError(
            f"estimate='ig' integrates the effect of freezing a term to its mean, which is pairs='all' with "
            f"reduce='mean'; got pairs={pairs!r}, reduce={reduce!r}: pass pairs='all', reduce='mean'"
        )
    if pairs not in PAIRS:
        raise ArgumentError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if reduce not in REDUCE:
        raise ArgumentError(f"reduce must be one of {REDUCE} ('max': the paper's score, 'mean': mean over pairs), got {reduce!r}")
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")


def select_sites(adapter: Adapter, components: Sequence[str], layers: Sequence[int] | None) -> list[Site]:
    if isinstance(components, str):
        components = (components,)
    if not components:
        raise ArgumentError("components is empty; choose from " + ", ".join(adapter.components()))
    for component in components:
        if component not in COMPONENTS:
            raise ArgumentError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
        if component not in adapter.components():
            raise ArgumentError(f"{adapter.family} models have no {component!r} matrix; "
                                f"available: {', '.join(adapter.components())}")
    if layers is not None and any(not 0 <= layer < adapter.n_layers for layer in layers):
        raise ArgumentError(f"layers {sorted(layers)} go past the model's {adapter.n_layers} layers (0..{adapter.n_layers - 1})")
    if layers is None:  # every layer, less what circuit extraction removed
        pairs = [(layer, c) for layer in range(adapter.n_layers) for c in dict.fromkeys(components)]
        sites = [adapter.site(layer, c) for layer, c in pairs if adapter.has_component(layer, c)]
        if not sites:
            raise ArgumentError(f"the model has no {'/'.join(components)} matrix left (circuit extraction removed them all)")
        return sites
    return [adapter.site(layer, c) for layer in sorted(set(layers)) for c in dict.fromkeys(components)]


def _fan_in(module: nn.Module) -> int:
    return projection_matrix(module).shape[0]


def _new_stats(
    adapter: Adapter, site: Site, factors: Factors, calib_len: int, pairs: str, reduce: str
) -> SiteStats:
    device = adapter.model.get_submodule(site.path).weight.device
    heads, rank = factors.s.shape
    need_range = pairs == "all" and reduce == "max"
    shape = (calib_len + 1, heads, rank)
    return SiteStats(
        site=site,
        factors=factors,
        work=factors.to(device),
        heads=replace(
            site,
            out_index=None if site.out_index is None else site.out_index.to(device),
            in_index=None if site.in_index is None else site.in_index.to(device),
        ),
        pmax=torch.full(shape, -torch.inf, device=device) if need_range else None,
        pmin=torch.full(shape, torch.inf, device=device) if need_range else None,
        scores=torch.full((heads, rank), -torch.inf if reduce == "max" else 0.0, device=device),
    )


@dataclass
class _DeviceBatch:
    """One batch moved to the model's device before the loop, with its row bookkeeping:
    ``pos`` sends padding to the trash row ``calib_len``, ``real`` is 1.0 on real tokens."""

    data: TaskData
    pos: torch.Tensor  # (B*T,) int64
    real: torch.Tensor  # (B, T) float32
    padded: bool  # known on the host: batches without padding skip the row weights

    @classmethod
    def of(cls, batch: TaskData, calib_len: int, device: torch.device) -> "_DeviceBatch":
        mask = batch.mask.bool()
        pos = batch.position_ids.masked_fill(~mask, calib_len).reshape(-1)
        on_device = TaskData(
            batch.input_ids.to(device),
            batch.labels.to(device),
            None if batch.attention_mask is None else batch.attention_mask.to(device),
        )
        return cls(on_device, pos.to(device), mask.float().to(device), batch.attention_mask is not None)


def _pass2_weight(batch: _DeviceBatch, pairs: str, reduce: str, counts: torch.Tensor) -> torch.Tensor | None:
    """Row weights for pass 2: which rows count (max), or how many pairs each row stands for (mean)."""
    real = batch.real
    if pairs == "shift":
        # The partner of example b is example b-1 of the same batch (the reference code's roll).
        real = real * real.roll(1, dims=0)
    if reduce == "max":
        return real.reshape(-1) if batch.padded else None
    if pairs == "shift":
        return real.reshape(-1)
    # A row at position t stands for its n_t partners there (itself included): the pass-2
    # gain against the mean partner, times n_t, is the sum over those pairs.
    return counts.index_select(0, batch.pos).float() * real.reshape(-1)


@torch.no_grad()
def _set_mean_projections(
    stats: dict[Key, SiteStats], input_sums: dict[str, torch.Tensor], counts: torch.Tensor
) -> None:
    """``pmean[t] = u_i · x̄[t]`` per head, from pass 1's input sums (trash row: 0)."""
    n = counts.clamp_min(1).float().unsqueeze(1)
    n[-1] = torch.inf
    for st in stats.values():
        total = input_sums[st.site.path]
        mean = head_inputs(total / n.to(total.device), st.heads)
        st.pmean = torch.einsum("thk,hki->thi", mean, st.work.U).contiguous()


def _sites_by_module(stats: dict[Key, SiteStats]) -> dict[str, list[SiteStats]]:
    grouped: dict[str, list[SiteStats]] = defaultdict(list)
    for st in stats.values():
        grouped[st.site.path].append(st)
    return grouped


@dataclass
class _Graph:
    """One batch's forward with its autograd graph, waiting for pass 2's backward. The
    gradient hooks read ``weight`` (pass 2's row weights) when the backward reaches them."""

    loss: torch.Tensor | None = None
    nbytes: int = 0  # activations the graph keeps alive
    weight: torch.Tensor | None = None


@dataclass
class _Pass2:
    """Pass 2's setting: what the gradient hooks fold each batch into."""

    adapter: Adapter
    stats: dict[Key, SiteStats]
    pairs: str
    reduce: str
    backend: str
    weights: frozenset[int] = frozenset()  # storages of the model's tensors, not counted as graph memory
    path: dict[str, "_PathTable"] | None = None  # per module: what moving every term to its frozen value adds

    def __post_init__(self) -> None:
        model = self.adapter.model
        # An FSDP2-sharded parameter is a DTensor: its storage is its local shard's.
        tensors = [getattr(t, "_local_tensor", t) for t in (*model.parameters(), *model.buffers())]
        self.weights = frozenset(t.untyped_storage().data_ptr() for t in tensors)

    def forward(self, batch: _DeviceBatch, on_input=None, alpha: float = 0.0) -> _Graph:
        """The loss of ``batch`` with gradient hooks on every site (and ``on_input`` on their inputs),
        at the point ``alpha`` of the integrated-gradients path (0: the model itself)."""
        graph = _Graph()
        pos = batch.pos

        def on_grad(sites: list[SiteStats], x: torch.Tensor, g: torch.Tensor) -> None:
            # The batch's row bookkeeping follows the activation to its layer's device (a no-op on one device).
            at = x.device
            weight = None if graph.weight is None else graph.weight.to(at)
            rows_x = x.reshape(-1, x.shape[-1])
            rows_g = g.reshape(-1, g.shape[-1])
            partner = x.roll(1, dims=0).reshape(-1, x.shape[-1]) if self.pairs == "shift" else None
            for st in sites:
                w = st.work
                pass2_update(
                    head_inputs(rows_x, st.heads),
                    head_outputs(rows_g, st.heads),
                    w.U,
                    w.V,
                    w.s,
                    pos.to(at),
                    st.pmax,
                    st.pmin,
                    st.scores,
                    partner=None if partner is None else head_inputs(partner, st.heads),
                    weight=weight,
                    reduce=self.reduce,
                    pmean=st.pmean,
                    backend=self.backend,
                )

        adapter = self.adapter
        bottom = adapter.layers()[min(st.site.layer for st in self.stats.values())]
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen_parameters(adapter.model))
            saved = _SavedBytes(self.weights)
            stack.enter_context(saved)
            hooks = stack.enter_context(Hooks(adapter.model))
            _on_grads(hooks, self.stats, on_grad, saved)
            _grad_from(hooks, bottom)
            if on_input is not None:
                _on_inputs(hooks, self.stats, on_input)
            if alpha:
                for path, table in self.path.items():
                    hooks.post(path, table.shifter(alpha, batch))
            logits = last_logits(adapter, batch.data)
            # Summed, not averaged: each example's gradient is its own loss's, whatever the batch.
            labels = batch.data.labels.to(logits.device)  # the head may sit on another device than the batch
            graph.loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        graph.nbytes = saved.nbytes
        return graph


def _pass1_batch(
    adapter: Adapter,
    batch: _DeviceBatch,
    stats: dict[Key, SiteStats],
    input_sums: dict[str, torch.Tensor],
    counts: torch.Tensor,
    ranges: bool,
    backend: str,
    keep: _Pass2 | None,
) -> _Graph | None:
    """Fold one batch into the pass-1 statistics. With ``keep``, the forward runs to the
    loss with pass 2's hooks and its graph is returned; otherwise it stops after the
    highest selected layer and keeps nothing."""
    pos = batch.pos
    counts.index_add_(0, pos, torch.ones_like(pos))

    @torch.no_grad()
    def on_input(sites: list[SiteStats], x: torch.Tensor) -> None:
        rows, at = x.reshape(-1, x.shape[-1]), pos.to(x.device)
        input_sums[sites[0].site.path].index_add_(0, at, rows.float())
        if ranges:
            for st in sites:
                pass1_update(head_inputs(rows, st.heads), st.work.U, at, st.pmax, st.pmin, backend=backend)

    if keep is not None:
        return keep.forward(batch, on_input)
    top = max(st.site.layer for st in stats.values())
    with torch.no_grad(), Hooks(adapter.model) as hooks:
        _on_inputs(hooks, stats, on_input)
        hooks.stop_after(adapter.layers()[top])  # pass 1 needs nothing above the highest selected layer
        adapter.backbone()(**batch.data.model_inputs(), use_cache=False)
    return None


def _pass2_batch(
    scorer: _Pass2, batch: _DeviceBatch, weight: torch.Tensor | None, graph: _Graph | None, alpha: float = 0.0
) -> None:
    """Backward of one batch (its forward too, unless pass 1 kept the graph): the hooks fold it into the scores."""
    graph = scorer.forward(batch, alpha=alpha) if graph is None else graph
    graph.weight = weight
    graph.loss.backward()


@dataclass
class _PathTable:
    """One module on the integrated-gradients path: at ``alpha`` its output gains
    ``alpha (x̄[t] - x) D``, ``D`` being the sum of the moving terms in it (blocks of its heads)."""

    mean: torch.Tensor  # (calib_len + 1, d_in): x̄[t]; the trash row is never read (padding carries weight 0)
    D: torch.Tensor  # (d_in, d_out)

    def shifter(self, alpha: float, batch: _DeviceBatch):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            at = x.device
            diff = self.mean.index_select(0, batch.pos.to(at)).view_as(x) - x
            diff = diff * batch.real.to(at).unsqueeze(-1)  # padding stays as it was
            return output + alpha * (diff @ self.D).to(output.dtype)

        return hook


def _path_tables(
    adapter: Adapter, stats: dict[Key, SiteStats], input_sums: dict[str, torch.Tensor], counts: torch.Tensor,
    moving: dict[Key, torch.Tensor] | None = None,
) -> dict[str, _PathTable]:
    tables = {}
    for path, sites in _sites_by_module(stats).items():
        total = input_sums[path]
        mean = total / counts.clamp_min(1).to(total.device).float().unsqueeze(1)
        d_in, d_out = projection_matrix(adapter.model.get_submodule(path)).shape
        D = torch.zeros(d_in, d_out, dtype=torch.float64, device=mean.device)
        for st in sites:
            for head in range(st.factors.s.shape[0]):
                if moving is None:
                    index = torch.arange(st.factors.s.shape[1], device=st.factors.s.device)
                else:
                    index = moving[st.site.key][head].nonzero().flatten().to(st.factors.s.device)
                if not len(index):
                    continue
                u, w = placed_terms(st.site, st.factors, head, index, d_in, d_out)
                D += (u.T @ w).to(D.device)
        tables[path] = _PathTable(mean, D.float())
    return tables


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct storages a forward saves for its backward,
    leaving out ``shared`` ones (the model's weights: they are alive anyway)."""

    def __init__(self, shared: frozenset[int] = frozenset()) -> None:
        self.storages: dict[int, int] = {}
        self.shared = shared

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t)
            # A detached alias, not ``t``: a saved output returned as itself would make a
            # reference cycle through its grad_fn, freed only by the garbage collector.
            return t.detach()

        super().__init__(pack, lambda t: t)

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.shared:
            self.storages[storage.data_ptr()] = storage.nbytes()

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _on_inputs(hooks: Hooks, stats: dict[Key, SiteStats], callback) -> None:
    for path, sites in _sites_by_module(stats).items():
        hooks.on_input(path, lambda x, _sites=sites: callback(_sites, x.detach()))


def _on_grads(hooks: Hooks, stats: dict[Key, SiteStats], callback, saved: _SavedBytes) -> None:
    for path, sites in _sites_by_module(stats).items():
        def at_forward(x: torch.Tensor, _sites=sites):
            saved.add(x)  # kept alive by the hook until the backward reaches it
            return lambda g: callback(_sites, x, g)

        hooks.on_backward(path, at_forward)


def _grad_from(hooks: Hooks, layer: nn.Module) -> None:
    """Make the residual stream entering ``layer`` the leaf of the graph: backward stops there."""

    def hook(module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_()
        return args, kwargs

    hooks.pre(layer, hook, with_kwargs=True)
