"""Greedy circuit discovery (docs/MATH.md §4, Algorithm 1 of the circuit-extraction paper), fast and exact.

Algorithm 1 visits components from the last layer down; each is ablated on top
of everything pruned so far and stays pruned if KL(f‖g) grows by less than α.
Run literally, that is one full forward over D_v per component. Two facts make
it cheaper without changing a single decision:

* When layer L is visited, nothing below it has been touched, so the residual
  stream entering L is the unpruned model's. One forward caches it (and each
  layer's call arguments: masks, rotary tables, position ids) and every
  candidate runs layers L..end only. There, nothing is computed only to be
  ablated (attention blocks with no head left, pruned MLPs), and above the
  highest layer whose attention still has a head (its *horizon*) only the
  last position is computed: the output projections and MLPs from the horizon
  up, the final norm and the LM head run there alone.
* Several candidates share one forward, stacked along the batch. Candidate k
  of a group is evaluated on top of the decisions *predicted* for candidates
  0..k-1; the decisions are then replayed in order and, at the first wrong
  prediction, the rest of the group is evaluated again under the true state.
  Every recorded KL is therefore that of exactly the model the sequential
  algorithm would have built. Predictions come from a candidate's stale
  evaluation when it has one, else from the last decision.

The host never waits on the device inside the search but once per group:
KLs are summed and compared with α on the device, the group's verdicts reach
the host as one integer, and the KL values for the trace come back in one copy
at the end. Nothing in between has a data-dependent shape, and what to skip
is decided from the host-side component sets.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..data.task_data import TaskData, model_data
from ..rewrite.position_tables import table_positions
from ..rewrite.removal import ComponentMeans
from ..runtime import distributed
from ..runtime.forward import eval_mode, last_logits, model_device
from ..runtime.hooks import Hooks
from ..runtime.means import component_means
from ..runtime.metrics import kl_divergence
from ..runtime.progress import progress as progress_bar
from .ablation import Ablation, Patcher
from .options import CircuitOptions


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
    rounds: int = 0  # stacked evaluations; each is one host read of its decisions

    @property
    def pruned(self) -> Ablation:
        return Ablation(frozenset(self.pruned_heads), frozenset(self.pruned_mlps))


@dataclass
class _Chunk:
    """A slice of D_v with what the unpruned forward left behind: each layer's input and call arguments."""

    size: int
    rows: torch.Tensor  # (N, T) each token's row in the mean tables (its clamped true position)
    logp_f: torch.Tensor  # (N, vocab) the unpruned model's last-token log-probabilities
    p_f: torch.Tensor  # (N, vocab) their exponentials
    inputs: list[torch.Tensor]  # per layer: residual stream entering it (N, T, d)
    calls: list[tuple[tuple, dict[str, Any]]]  # per layer: its other positional and keyword arguments


class _Runner:
    """Runs layers ``L..end`` for a stack of candidate ablations over cached inputs; their KL stays on the device."""

    def __init__(
        self, adapter: Adapter, means: ComponentMeans | None, options: CircuitOptions, chunks: list[_Chunk],
        tail: list[nn.Module],
    ) -> None:
        self.adapter = adapter
        self.chunks = chunks
        self.chunk = chunks[0]  # the chunk in flight: its rows index the mean tables
        self.patcher = Patcher(
            adapter, means, options.ablation, options.extrapolate, rows=lambda: self.chunk.rows, skip=True
        )
        self.tail = tail
        self.n_examples = distributed.sum_number(sum(c.size for c in chunks))  # D_v is sharded over ranks
        self.horizon = adapter.n_layers - 1  # see _last_position_only

    @torch.inference_mode()
    def kl(self, layer: int, states: list[Ablation]) -> torch.Tensor:
        """Mean KL(f‖g) over D_v of each state, ``(len(states),)`` float64 on the model's device."""
        self.patcher.set(states)
        self.horizon = _horizon(self.adapter, layer, states)
        groups = len(states)
        total = self.chunks[0].logp_f.new_zeros(groups, dtype=torch.float64)
        layers = self.adapter.layers()
        for chunk in self.chunks:
            self.chunk = chunk
            hidden = _repeat(chunk.inputs[layer], chunk.size, groups)
            for index in range(layer, len(layers)):
                args, kwargs = chunk.calls[index]
                args, kwargs = _repeat(args, chunk.size, groups), _repeat(kwargs, chunk.size, groups)
                hidden = layers[index](hidden, *args, **kwargs)
            last = hidden[:, -1]
            for module in self.tail:
                last = module(last)
            logits = self.adapter.lm_head()(last).unflatten(0, (groups, chunk.size))
            total += kl_divergence(chunk.logp_f, logits, chunk.p_f).sum(dim=1).double()
        distributed.all_sum_(total)
        return total / self.n_examples

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Every hook the search needs, installed for the block and removed on exit."""
        with self.patcher.hooks(), self._last_position_only():
            yield

    @contextlib.contextmanager
    def _last_position_only(self) -> Iterator[None]:
        """Feed the output projections and MLPs of the layers from the horizon up the last position alone.

        Only the last position of the top layer's output is read. Above the
        horizon no attention mixes positions (every head is ablated), so the
        last position depends on the last position alone, down to the
        horizon's attention, which reads all positions of its input (computed
        in full below it). Output projections and MLPs act on each position
        separately, so this is exact; the residual additions broadcast the
        result over the (then meaningless) earlier positions.
        """
        with Hooks(self.adapter.model) as hooks:
            for layer in range(self.adapter.n_layers):
                for where in (self.adapter.site(layer, "o"), self.adapter.mlp(layer)):
                    # prepend: run before the ablation hooks, so they see what the module will.
                    hooks.replace_input(where, self._last_position_input(layer), prepend=True)
            yield

    def _last_position_input(self, layer: int):
        def replace(args: tuple) -> tuple | None:
            if layer < self.horizon:
                return None
            # eigenfast's modules (a pruned model) also take the positions (B or 1, T): cut them alike.
            return tuple(a[:, -1:] if i < 2 and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))

        return replace


def _horizon(adapter: Adapter, layer: int, states: list[Ablation]) -> int:
    """The highest layer from ``layer`` up whose attention keeps a head in some state (``layer`` if none)."""
    for top in range(adapter.n_layers - 1, layer, -1):
        if any(len(state.at(top)[0]) < adapter.n_heads for state in states):
            return top
    return layer


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
def _cache(
    adapter: Adapter, data: TaskData, batch_size: int, means: ComponentMeans | None, extrapolate: str
) -> tuple[list[_Chunk], list[nn.Module]]:
    """One unpruned forward per chunk of D_v: f's log-probs, each layer's input and call arguments.

    It also finds the backbone's *tail*: the modules it applies after its last
    layer (the final norm), which the candidates' forwards apply themselves.
    Positions are turned into mean-table rows here, once: under
    ``extrapolate="error"`` that check reads the device, and it must not in the search.
    """
    device = model_device(adapter.model)
    layers = adapter.layers()
    calib_len = means.calib_len if means is not None else 0
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

        with Hooks(adapter.model) as hooks:
            for layer in layers:
                hooks.pre(layer, capture, with_kwargs=True)
            # The tail is what runs after the last layer: record the order the backbone's children run in.
            hooks.on_output(layers[-1], lambda _: order.append(None))
            for child in adapter.backbone().children():
                if child is not layers:
                    hooks.post(child, lambda m, *_: order.append(m))
            logp_f = torch.log_softmax(last_logits(adapter, batch), dim=-1)
        positions = batch.position_ids.to(device)
        rows = table_positions(positions, calib_len, extrapolate) if means is not None else positions
        chunks.append(_Chunk(len(batch), rows, logp_f, logp_f.exp(), inputs, calls))
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


# One int64 carries a group's decisions to the host, so a group has at most 63 candidates.
MAX_GROUP = 63


def _read_decisions(decisions: torch.Tensor) -> list[bool]:
    """A ``(G,)`` bool device tensor on the host, with a single scalar read (the search's one sync per group)."""
    weights = torch.pow(2, torch.arange(len(decisions), device=decisions.device))
    packed = int((decisions.long() * weights).sum())
    return [bool(packed >> k & 1) for k in range(len(decisions))]


def _default_batch_size(adapter: Adapter, data: TaskData) -> int:
    """Rows per forward when the caller gives none: 64 on a CPU, which gains little from more;
    on a GPU as many as a quarter of its free memory holds (at most 4 GiB), one stacked forward's
    activations and logits per row estimated from the model's shape."""
    device = model_device(adapter.model)
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    config = adapter.config
    d_ff = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * adapter.d_model)
    T = data.input_ids.shape[1]
    itemsize = next(adapter.model.parameters()).element_size()
    per_row = 3 * adapter.config.vocab_size * 4 + 4 * T * (2 * d_ff + 4 * adapter.d_model + adapter.n_heads * T) * itemsize
    return max(64, min(free // 4, 4 << 30) // per_row)


def discover(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    threshold: float,
    *,
    ablation: str = "mean",
    include_mlps: bool = False,
    extrapolate: str = "mean",
    batch_size: int | None = None,
    progress: bool = True,
) -> Discovery:
    """Algorithm 1: the heads (and, with ``include_mlps``, MLPs) whose ablation raises KL(f‖g) by ≥ ``threshold``.

    ``patch_data`` (D_a) gives the mean activations (unused, may be None, for
    zero ablation); ``val_data`` (D_v) the KL. ``batch_size`` bounds the rows of
    one forward: candidates are stacked ``batch_size // len(D_v)`` at a time
    (one at a time, over chunks of D_v, when D_v is larger); ``None`` picks it
    from the device (see :class:`CircuitOptions`). The residual stream entering
    every layer is kept for D_v: O(layers · |D_v| · T · d_model).
    """
    options = CircuitOptions(threshold, ablation, include_mlps, extrapolate, batch_size)
    return discover_with(model, patch_data, val_data, options, progress=progress)


def discover_with(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    options: CircuitOptions,
    *,
    progress: bool = True,
) -> Discovery:
    """:func:`discover` with checked options (what :func:`~eigenfast.circuit.extract_circuit` calls)."""
    options.check_patch_data(patch_data)
    adapter = get_adapter(model)
    val = model_data(val_data, model)
    batch_size = options.batch_size or _default_batch_size(adapter, val)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    with eval_mode(model):
        means = component_means(model, patch_data, batch_size) if options.ablation == "mean" else None
        timings["means"] = time.perf_counter() - start
        mark = time.perf_counter()
        chunks, tail = _cache(adapter, distributed.local_examples(val, "D_v (val_data)"), batch_size, means, options.extrapolate)
        timings["cache"] = time.perf_counter() - mark
        mark = time.perf_counter()
        runner = _Runner(adapter, means, options, chunks, tail)
        # alike on every rank: each group is one collective
        group_size = min(MAX_GROUP, max(1, batch_size // int(distributed.max_number(max(c.size for c in chunks)))))
        with runner.hooks():
            search = _search(adapter, runner, options, group_size, progress)
        timings["search"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start

    trace = search.trace
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
        threshold=options.threshold,
        ablation=options.ablation,
        means=means,
        timings=timings,
        evaluations=search.evaluations,
        rounds=search.rounds,
    )


class _Search(NamedTuple):
    trace: list[Step]
    evaluations: int
    rounds: int


def _search(adapter: Adapter, runner: _Runner, options: CircuitOptions, group_size: int, progress: bool) -> _Search:
    """The greedy walk. KL values stay on the device (``log``) and reach the host once, at the end;
    each group costs one read of its decisions."""
    threshold = options.threshold
    state = Ablation()
    kl = runner.chunks[0].logp_f.new_zeros((), dtype=torch.float64)  # g = f: KL(f‖f) = 0
    kl_at: int | None = None  # where the current state's KL is in the log (None: the 0 above)
    log: list[torch.Tensor] = []
    logged = 0
    records: list[tuple[Component, int | None, int, bool]] = []  # component, kl_before at, kl_after at, pruned
    predict = _Predictor()
    evaluations = rounds = 0
    layers = range(adapter.n_layers - 1, -1, -1)
    for layer in progress_bar(layers, adapter.n_layers, "circuit discovery: layers" if progress else None):
        pending = [Component(layer, h) for h in range(adapter.n_heads)]
        if options.include_mlps:
            pending.append(Component(layer, None))
        while pending:
            group = pending[:group_size]
            # Candidate k runs on top of the decisions predicted for 0..k-1; its
            # verdict is taken against the KL of that assumed state: the state's
            # own, or that of the last candidate before k guessed pruned.
            states, guesses, bases, assumed, assumed_at = [], [], [], state, None
            for k, c in enumerate(group):
                states.append(_with(assumed, c))
                bases.append(assumed_at)
                guesses.append(predict(c))
                if guesses[-1]:
                    assumed, assumed_at = states[-1], k
            kls = runner.kl(layer, states)
            before = torch.stack([kl if j is None else kls[j] for j in bases])
            verdicts = _read_decisions(kls - before < threshold)
            log.append(kls)
            offset, logged = logged, logged + len(group)
            evaluations += len(group)
            rounds += 1
            valid = True  # every earlier guess in the group was right
            for k, (c, guess, pruned) in enumerate(zip(group, guesses, verdicts)):
                if valid:
                    records.append((c, kl_at, offset + k, pruned))
                    predict.record(c, pruned)
                    pending.pop(0)
                    if pruned:
                        state, kl, kl_at = _with(state, c), kls[k], offset + k
                    valid = pruned == guess
                else:
                    # Evaluated on a wrongly assumed state: its verdict is only a guess for the re-run.
                    predict.stale[c] = pruned
    values = torch.cat(log).tolist() if log else []
    trace = []
    for c, before_at, after_at, pruned in records:
        kl_before = 0.0 if before_at is None else values[before_at]
        kl_after = values[after_at]
        trace.append(Step(c, kl_before, kl_after, kl_after - kl_before, pruned))
    return _Search(trace, evaluations, rounds)
