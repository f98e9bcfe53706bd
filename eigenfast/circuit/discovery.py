"""Greedy circuit discovery (docs/MATH.md §4, Algorithm 1 of the circuit-extraction paper), fast and exact.

Algorithm 1 visits components from the last layer down; each is ablated on top
of everything pruned so far and stays pruned if KL(f‖g) grows by less than α.
Run literally, that is one full forward over D_v per component. Two facts make
it cheaper without changing a single decision:

* When layer L is visited, nothing below it has been touched, so the residual
  stream entering L is the unpruned model's. One forward caches it (and each
  layer's call arguments: masks, rotary tables, position ids) and every
  candidate runs layers L..end only. There, nothing is computed only to be
  ablated (attention blocks with no head left, pruned MLPs), and the top
  layer's output projection and MLP, the final norm and the LM head run at
  the last position only.
* Several candidates share one forward, stacked along the batch. Candidate k
  of a group is evaluated on top of the decisions *predicted* for candidates
  0..k-1; the decisions are then replayed in order and, at the first wrong
  prediction, the rest of the group is evaluated again under the true state.
  Every recorded KL is therefore that of exactly the model the sequential
  algorithm would have built. Predictions come from a candidate's stale
  evaluation when it has one, else from the last decision.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..data import TaskData, as_task_data
from ..forward import eval_mode, last_logits, model_device
from ..progress import progress as progress_bar
from ..projection import PositionalModule
from .ablation import ABLATIONS, Ablation, Patcher
from .means import ComponentMeans, component_means


class Component(NamedTuple):
    """A head ``(layer, head)`` or, with ``head=None``, the layer's MLP."""

    layer: int
    head: int | None

    @property
    def is_mlp(self) -> bool:
        return self.head is None

    def __str__(self) -> str:
        return f"L{self.layer}.MLP" if self.is_mlp else f"L{self.layer}.H{self.head}"


class Step(NamedTuple):
    """One decision of Algorithm 1: ablating ``component`` moved KL(f‖g) from ``kl_before`` to ``kl_after``."""

    component: Component
    kl_before: float
    kl_after: float
    delta: float
    pruned: bool


@dataclass
class Discovery:
    """The circuit (kept heads and MLPs), what was pruned, and how each decision was made."""

    heads: list[tuple[int, int]]
    mlps: list[int]
    pruned_heads: set[tuple[int, int]]
    pruned_mlps: set[int]
    kl_trace: list[Step]
    kl: float  # KL(f‖g) of the final pruned model
    threshold: float
    ablation: str
    means: ComponentMeans | None  # what mean ablation used: extraction needs the same tables
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0  # candidate evaluations, speculative re-evaluations included

    @property
    def pruned(self) -> Ablation:
        return Ablation(frozenset(self.pruned_heads), frozenset(self.pruned_mlps))


def kl_divergence(logp_f: torch.Tensor, logits_g: torch.Tensor) -> torch.Tensor:
    """Per-example KL(f‖g) from f's log-probabilities ``(B, V)`` and g's logits ``(..., B, V)``."""
    logp_g = torch.log_softmax(logits_g.float(), dim=-1)
    return (logp_f.exp() * (logp_f - logp_g)).sum(dim=-1)


@dataclass
class _Chunk:
    """A slice of D_v with what the unpruned forward left behind: each layer's input and call arguments."""

    size: int
    positions: torch.Tensor  # (N, T) true positions
    logp_f: torch.Tensor  # (N, vocab) the unpruned model's last-token log-probabilities
    inputs: list[torch.Tensor]  # per layer: residual stream entering it (N, T, d)
    calls: list[tuple[tuple, dict[str, Any]]]  # per layer: its other positional and keyword arguments


class _Runner:
    """Runs layers ``L..end`` for a stack of candidate ablations over cached inputs; returns their KL."""

    def __init__(
        self,
        adapter: Adapter,
        means: ComponentMeans | None,
        ablation: str,
        extrapolate: str,
        chunks: list[_Chunk],
        tail: list[nn.Module],
    ) -> None:
        self.adapter = adapter
        self.chunks = chunks
        self.chunk = chunks[0]  # the chunk in flight: its positions index the mean tables
        self.patcher = Patcher(adapter, means, ablation, extrapolate, positions=lambda: self.chunk.positions)
        self.tail = tail
        self.n_examples = sum(c.size for c in chunks)

    @torch.inference_mode()
    def kl(self, layer: int, states: list[Ablation]) -> list[float]:
        self.patcher.set(states)
        groups = len(states)
        total = torch.zeros(groups, dtype=torch.float64)
        layers = self.adapter.layers()
        for chunk in self.chunks:
            self.chunk = chunk
            hidden = chunk.inputs[layer].repeat(groups, 1, 1)
            with self._skipping_ablated(len(hidden)):
                for index in range(layer, len(layers)):
                    args, kwargs = chunk.calls[index]
                    hidden = layers[index](
                        hidden, *_repeat(args, chunk.size, groups), **_repeat(kwargs, chunk.size, groups)
                    )
            last = hidden[:, -1]
            for module in self.tail:
                last = module(last)
            logits = self.adapter.lm_head()(last).unflatten(0, (groups, chunk.size))
            total += kl_divergence(chunk.logp_f, logits).sum(dim=1).double().cpu()
        return (total / self.n_examples).tolist()

    @contextlib.contextmanager
    def _skipping_ablated(self, rows: int) -> Iterator[None]:
        """Skip what every group ablates anyway: attention blocks with no head left, and MLPs.

        Such an attention block's output is its output projection applied to
        zeros, which the ablation hooks turn into the bias plus the heads' means;
        one zero position per row is enough, the means broadcast over positions.
        An ablated MLP's output is replaced by its hook whatever it computed, so
        it computes nothing. (HF attention modules return ``(output, weights)``.)
        """
        skipped = []
        for layer, plan in self.patcher.plans.items():
            o_proj = self.adapter.model.get_submodule(self.adapter.site(layer, "o").path)
            # A pruned output projection's bias depends on the position: one zero position can't stand for all.
            if plan.keep is not None and len(plan.keep) == 1 and not plan.keep.any() and not isinstance(o_proj, PositionalModule):
                zeros = plan.keep.new_zeros(rows, 1, plan.keep.shape[1])
                skipped.append(self.adapter.attention(layer))
                skipped[-1].forward = lambda *args, _o=o_proj, _z=zeros, **kwargs: (_o(_z), None)
            if plan.mlp_off is not None and len(plan.mlp_off) == 1 and bool(plan.mlp_off):
                skipped.append(self.adapter.mlp(layer))
                skipped[-1].forward = lambda x, *args, **kwargs: torch.zeros_like(x)
        try:
            yield
        finally:
            for module in skipped:
                del module.forward  # back to the class's forward

    @contextlib.contextmanager
    def last_position_only(self) -> Iterator[None]:
        """Feed the top layer's output projection and MLP the last position alone.

        Both act on each position separately and only the last position's
        output is read, so this is exact; the residual additions broadcast it
        over the (then meaningless) earlier positions.
        """
        top = self.adapter.n_layers - 1
        modules = [self.adapter.model.get_submodule(self.adapter.site(top, "o").path), self.adapter.mlp(top)]
        # prepend: run before the ablation hooks, so they see what the module will.
        handles = [
            m.register_forward_pre_hook(_last_position, prepend=True)
            for m in modules
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _last_position(module: nn.Module, args: tuple) -> tuple:
    """The input at the last position only (and the positions, which eigenfast's modules also take)."""
    x, *rest = args
    if rest:
        rest[0] = rest[0][:, -1:]
    return (x[:, -1:], *rest)


def _repeat(value: Any, n: int, groups: int) -> Any:
    """Tile every batch-leading tensor (leading dim ``n``) ``groups`` times; broadcast ones stay."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == n and groups > 1:
        return value.repeat(groups, *(1,) * (value.dim() - 1))
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, n, groups) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, n, groups) for k, v in value.items()}
    return value


@torch.inference_mode()
def _cache(adapter: Adapter, data: TaskData, batch_size: int) -> tuple[list[_Chunk], list[nn.Module]]:
    """One unpruned forward per chunk of D_v: f's log-probs, each layer's input and call arguments.

    It also finds the backbone's *tail*: the modules it applies after its last
    layer (the final norm), which the candidates' forwards apply themselves.
    """
    device = model_device(adapter.model)
    layers = adapter.layers()
    chunks: list[_Chunk] = []
    tail: list[nn.Module] = []
    for batch in data.batches(batch_size):
        inputs: list[torch.Tensor] = []
        calls: list[tuple[tuple, dict[str, Any]]] = []
        order: list[nn.Module | None] = []  # None marks the end of the last layer

        def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), args)
            inputs.append(hidden)
            calls.append((rest, kwargs))

        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.callback(layer.register_forward_pre_hook(capture, with_kwargs=True).remove)
            stack.callback(layers[-1].register_forward_hook(lambda *_: order.append(None)).remove)
            for child in adapter.backbone().children():
                if child is not layers:
                    stack.callback(child.register_forward_hook(lambda m, *_: order.append(m)).remove)
            logp_f = torch.log_softmax(last_logits(adapter, batch), dim=-1)
        chunks.append(_Chunk(len(batch), batch.position_ids.to(device), logp_f, inputs, calls))
        tail = order[order.index(None) + 1:]
    return chunks, tail


class _Predictor:
    """Guesses a candidate's decision: its stale evaluation if it has one, else the last decision
    on a component of its kind (head or MLP).

    Decisions come in runs (upper layers mostly pruned, lower ones, which the
    pruned model leans on more, mostly kept), so the last one is a good guess;
    heads and MLPs run separately.
    """

    def __init__(self) -> None:
        self.stale: dict[Component, bool] = {}
        self.last = {False: True, True: True}  # by Component.is_mlp

    def __call__(self, c: Component) -> bool:
        return self.stale.get(c, self.last[c.is_mlp])

    def record(self, c: Component, pruned: bool) -> None:
        self.last[c.is_mlp] = pruned


def _with(state: Ablation, c: Component) -> Ablation:
    if c.is_mlp:
        return Ablation(state.heads, state.mlps | {c.layer})
    return Ablation(state.heads | {(c.layer, c.head)}, state.mlps)


def discover(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    threshold: float,
    ablation: str = "mean",
    include_mlps: bool = False,
    batch_size: int = 64,
    progress: bool = True,
    extrapolate: str = "mean",
) -> Discovery:
    """Algorithm 1: the heads (and, with ``include_mlps``, MLPs) whose ablation raises KL(f‖g) by ≥ ``threshold``.

    ``patch_data`` (D_a) gives the mean activations (unused, may be None, for
    zero ablation); ``val_data`` (D_v) the KL. ``batch_size`` bounds the rows of
    one forward: candidates are stacked ``batch_size // len(D_v)`` at a time
    (one at a time, over chunks of D_v, when D_v is larger). A CPU gains
    little past a few candidates per forward; a GPU gains from many. The residual
    stream entering every layer is kept for D_v: O(layers · |D_v| · T · d_model).
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ablation == "mean" and patch_data is None:
        raise ValueError("mean ablation needs patch_data (D_a) for the mean activations")
    threshold = float(threshold)
    adapter = get_adapter(model)
    val = as_task_data(val_data)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    with eval_mode(model):
        means = component_means(model, patch_data, batch_size) if ablation == "mean" else None
        timings["means"] = time.perf_counter() - start
        mark = time.perf_counter()
        chunks, tail = _cache(adapter, val, batch_size)
        timings["cache"] = time.perf_counter() - mark
        mark = time.perf_counter()
        runner = _Runner(adapter, means, ablation, extrapolate, chunks, tail)
        group_size = max(1, batch_size // max(c.size for c in chunks))
        with runner.patcher.hooks(), runner.last_position_only():
            trace, evaluations = _search(adapter, runner, threshold, include_mlps, group_size, progress)
        timings["search"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start

    pruned = [s.component for s in trace if s.pruned]
    pruned_heads = {(c.layer, c.head) for c in pruned if not c.is_mlp}
    pruned_mlps = {c.layer for c in pruned if c.is_mlp}
    all_heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
    return Discovery(
        heads=[lh for lh in all_heads if lh not in pruned_heads],
        mlps=[l for l in range(adapter.n_layers) if l not in pruned_mlps],
        pruned_heads=pruned_heads,
        pruned_mlps=pruned_mlps,
        kl_trace=trace,
        kl=next((s.kl_after for s in reversed(trace) if s.pruned), 0.0),
        threshold=threshold,
        ablation=ablation,
        means=means,
        timings=timings,
        evaluations=evaluations,
    )


def _search(
    adapter: Adapter, runner: _Runner, threshold: float, include_mlps: bool, group_size: int, progress: bool
) -> tuple[list[Step], int]:
    state, kl = Ablation(), 0.0  # g = f: KL(f‖f) = 0
    trace: list[Step] = []
    predict = _Predictor()
    evaluations = 0
    layers = range(adapter.n_layers - 1, -1, -1)
    for layer in progress_bar(layers, adapter.n_layers, "circuit discovery: layers" if progress else None):
        pending = [Component(layer, h) for h in range(adapter.n_heads)]
        if include_mlps:
            pending.append(Component(layer, None))
        while pending:
            group = pending[:group_size]
            # Candidate k runs on top of the decisions predicted for 0..k-1.
            states, guesses, assumed = [], [], state
            for c in group:
                states.append(_with(assumed, c))
                guesses.append(predict(c))
                if guesses[-1]:
                    assumed = states[-1]
            kls = runner.kl(layer, states)
            evaluations += len(group)
            valid = True  # every earlier guess in the group was right
            assumed_kl = kl  # KL of the state the next candidate was stacked on top of
            for c, kl_after, guess in zip(group, kls, guesses):
                if valid:
                    delta = kl_after - kl
                    pruned = delta < threshold
                    trace.append(Step(c, kl, kl_after, delta, pruned))
                    predict.record(c, pruned)
                    pending.pop(0)
                    if pruned:
                        state, kl = _with(state, c), kl_after
                    valid = pruned == guess
                else:
                    # Evaluated on a wrongly assumed state: its verdict is only a guess for the re-run.
                    predict.stale[c] = kl_after - assumed_kl < threshold
                if guess:
                    assumed_kl = kl_after
    return trace, evaluations
