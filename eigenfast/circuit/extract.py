"""``eigenfast.extract_circuit``: find a task's circuit (Algorithm 1), then physically cut out everything else."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..data.task_data import TaskData, model_data
from ..errors import ArgumentError
from ..rewrite.removal import check_plain_removal, remove_pruned
from ..runtime.forward import Evaluation, evaluate
from ..runtime.sizes import ParameterCount, count_parameters
from ..saving.results import ModelResult, kept_masks
from .ablation import check_components
from .discovery import Discovery, Step, discover_with
from .options import CircuitOptions
from .report import (
    LATENCY_BATCHES,
    CircuitReport,
    HeadRates,
    Latency,
    latency_batch,
    timed_runs,
)


@dataclass
class CircuitResult(ModelResult):
    """The extracted model (same HF class, physically smaller) and how it was found; ``.save(folder)``."""

    kind = "circuit"
    method = "algorithm 1"  # what found the circuit, as the edge methods' results name theirs
    model: nn.Module
    heads: list[tuple[int, int]]  # kept (layer, head)
    mlps: list[int]  # layers whose MLP was kept
    kl_trace: list[Step]
    report: CircuitReport
    tokenizer: Any = None

    def saved_report(self) -> dict[str, Any]:
        return self.report.as_dict()

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        n_layers = self.report.n_layers
        return kept_masks(self.heads, self.mlps, n_layers, self.report.n_heads_total // n_layers)


def extract_circuit(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    threshold: float = 0.01,
    *,
    ablation: str = "mean",
    include_mlps: bool = False,
    extrapolate: str = "mean",
    batch_size: int | None = None,
    inplace: bool = False,
    ground_truth: Iterable[tuple[int, int]] | None = None,
    progress: bool = True,
    tokenizer: Any = None,
    latency_repeats: int = 9,
    positions: str = "indexed",
) -> CircuitResult:
    """Extract the circuit of the task in ``val_data`` (docs/MATH.md §4).

    Heads (and, with ``include_mlps``, MLPs) whose ablation raises KL(f‖g) on
    ``val_data`` by less than ``threshold`` are removed, walking from the last
    layer down; ``patch_data`` gives the means that mean ablation substitutes (it
    may be None for zero ablation). The input model is left untouched unless
    ``inplace``. ``positions="mean"`` folds the removed components' means over all positions
    (not per position) into ordinary biases, so a circuit that keeps whole layers' shapes
    saves as a plain HF checkpoint (``result.save(folder, format="hf")``); the circuit is
    found the same way either way. ``ground_truth`` (known circuit heads) adds TPR/FPR to the report;
    the report's latencies are medians of ``latency_repeats`` forwards of the model and the circuit
    taken in turns (0: not measured; too wide a spread is reported as such, not as a number).
    """
    options = CircuitOptions(threshold, ablation, include_mlps, extrapolate, batch_size, positions)
    adapter, truth, val = _check_inputs(model, patch_data, val_data, options, ground_truth, latency_repeats)
    batch_size = batch_size or 64  # evaluation and latency batches; discovery picks its own when None

    discovery = discover_with(model, patch_data, val, options, progress=progress)
    timings = {f"discover.{name}": seconds for name, seconds in discovery.timings.items()}
    params_before = count_parameters(model)
    before = evaluate(model, val, batch_size, desc="evaluate the model" if progress else None)
    batches = {b: latency_batch(val, b) for b in LATENCY_BATCHES} if latency_repeats else {}
    # The model and its circuit are timed in turns; in place, the model is gone after removal, so it is timed first.
    before_inplace = {b: timed_runs([model], batch, latency_repeats)[0] for b, batch in batches.items()} if inplace else {}

    start = time.perf_counter()
    target = remove_pruned(model, discovery.pruned_heads, discovery.pruned_mlps, discovery.means, ablation,
                           extrapolate, inplace, positions)
    timings["remove"] = time.perf_counter() - start

    after = evaluate(target, val, batch_size, desc="evaluate the circuit" if progress else None)
    latency = [
        Latency.of(b, before_inplace[b], timed_runs([target], batch, latency_repeats)[0]) if inplace
        else Latency.of(b, *timed_runs([model, target], batch, latency_repeats))
        for b, batch in batches.items()
    ]
    sizes = (params_before, count_parameters(target))
    report = _report(adapter, discovery, options, truth, sizes, (before, after), latency, timings)
    return CircuitResult(target, discovery.heads, discovery.mlps, discovery.kl_trace, report, tokenizer)


def _check_inputs(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    options: CircuitOptions,
    ground_truth: Iterable[tuple[int, int]] | None,
    latency_repeats: int,
) -> tuple[Adapter, frozenset[tuple[int, int]] | None, TaskData]:
    """Everything ``extract_circuit`` refuses, before any work: the adapter, the known heads and ``val_data`` as TaskData."""
    options.check_patch_data(patch_data)
    check_plain_removal(model, options.ablation, options.positions)
    if latency_repeats < 0:
        raise ArgumentError(f"latency_repeats must be >= 0 (0 skips the latency measurement), got {latency_repeats}")
    adapter = get_adapter(model)
    truth = None if ground_truth is None else check_components(adapter, ground_truth, ()).heads
    val = model_data(val_data, model)
    if patch_data is not None:
        model_data(patch_data, model)
    return adapter, truth, val


def _report(
    adapter: Adapter,
    discovery: Discovery,
    options: CircuitOptions,
    truth: frozenset[tuple[int, int]] | None,
    sizes: tuple[ParameterCount, ParameterCount],
    evaluations: tuple[Evaluation, Evaluation],
    latency: list[Latency],
    timings: dict[str, float],
) -> CircuitReport:
    """The report of one extraction: what was kept, sizes and evaluations before/after, latencies, TPR/FPR."""
    return CircuitReport(
        threshold=discovery.threshold,
        ablation=options.ablation,
        include_mlps=options.include_mlps,
        heads=discovery.heads,
        mlps=discovery.mlps,
        n_heads_total=adapter.n_layers * adapter.n_heads,
        n_layers=adapter.n_layers,
        params_before=sizes[0],
        params_after=sizes[1],
        before=evaluations[0],
        after=evaluations[1],
        kl=discovery.kl,
        latency=latency,
        ground_truth=None if truth is None else HeadRates.of(discovery.heads, truth, adapter.n_layers, adapter.n_heads),
        timings=timings,
    )
