"""ACDC: greedy edge removal in reverse topological order, keeping an edge when removing it costs ≥ τ in KL.

Walking readers from the logits down, each edge into the current reader is
switched to its counterfactual on top of everything removed so far; it stays
removed if KL(f‖circuit) rises by less than ``threshold``. When the edges into
layer ``l`` are visited nothing below ``l`` has changed, so every candidate
resumes the masked forward at ``l`` from the cached writer differences below it.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..data.task_data import TaskData
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.metrics import kl_divergence
from ..runtime.progress import progress_bar
from . import target
from .evaluate import EdgeCircuit, PreparedTask
from .graph import EdgeGraph
from .masked_forward import EdgeForward, Prepared
from .options import EdgeOptions
from .runner import EdgeMethod, Found, run_method


def reverse_topological(graph: EdgeGraph) -> list[tuple[int, int]]:
    """(edge index, reader layer) from the logits down: groups, readers and writers, each last first."""
    order = []
    for g, start in reversed(list(zip(graph.groups, graph.offsets))):
        for reader in reversed(range(g.n_readers)):
            order += [(start + reader * g.n_writers + writer, g.layer) for writer in reversed(range(g.n_writers))]
    return order


@torch.no_grad()
def mean_kl(forward: EdgeForward, batches: list[Prepared], edges: torch.Tensor, start_layer: int = 0,
            prefixes: list[torch.Tensor] | None = None) -> float:
    """KL(f‖circuit) per example over the batches of every rank (the same number on each)."""
    total, n = 0.0, 0
    for i, batch in enumerate(batches):
        prefix = None
        if start_layer:
            prefix = prefixes[i][: forward.graph.first_writer(start_layer)]
        logits = forward.logits(batch, edges, start_layer=start_layer, prefix=prefix)
        total += float(kl_divergence(torch.log_softmax(batch.clean.logits, -1), logits).sum())
        n += len(logits)
    total, n = distributed.summed(torch.tensor([total, n], dtype=torch.float64))  # alike on every rank
    return float(total / n)


# The τ interval a target's search covers: from nearly every edge kept to nearly none.
TAU_RANGE = (1e-6, 1.0)


def search(task: PreparedTask, options: EdgeOptions) -> Found:
    """ACDC at τ = ``options.threshold``, or the τ search for the sparsest circuit that reaches the target."""
    if options.threshold is not None:
        return greedy(task, options)
    return search_tau(task, options)


def first_change(trace: list[dict[str, float]], threshold: float) -> int:
    """Where a run at ``threshold`` would first decide otherwise than the run that left ``trace`` (its length if
    nowhere): every decision before it compares the same KL increase with ``threshold`` and comes out the same."""
    for i, step in enumerate(trace):
        if (step["kl_after"] - step["kl_before"] < threshold) != bool(step["removed"]):
            return i
    return len(trace)


def tau_interval(trace: list[dict[str, float]]) -> tuple[float, float]:
    """``(low, high)``: every τ with low < τ ≤ high makes the same decisions, hence the same run, as this trace's.

    An edge removed at KL increase δ stays removed for every τ > δ, a kept one stays for every τ ≤ δ.
    """
    deltas = [(s["kl_after"] - s["kl_before"], bool(s["removed"])) for s in trace]
    low = max((d for d, removed in deltas if removed), default=-math.inf)
    high = min((d for d, removed in deltas if not removed), default=math.inf)
    return low, high


def search_tau(task: PreparedTask, options: EdgeOptions) -> Found:
    """The largest τ (the sparsest circuit) whose run reaches ``options.target``, in at most ``search_runs`` runs.

    A run is constant over a τ interval (:func:`tau_interval`), so each probe moves the
    bracket past the whole interval of the run it made: the reaching run's upper end
    becomes the lower bound, the failing run's lower end the upper bound, and the next
    τ is the bracket's geometric middle, a τ no run made so far would answer. When
    the bracket closes no other circuit lies between the two: the search stops early.
    Each run resumes the run made so far that agrees with it longest (:func:`first_change`),
    so it evaluates only the edges from its first different decision on; the trace
    counts them (``evaluated``). If no run reaches the target the full graph is returned.
    """
    judge = target.Judge(task)
    judge.check(options.target[0])
    plain = replace(options, faithfulness=None, kl=None)
    low, high = TAU_RANGE
    runs: list[Found] = []
    best, trace = None, []
    for _ in range(options.search_runs):
        tau = math.sqrt(low * high)
        resumed = max(runs, key=lambda run: first_change(run.trace, tau), default=None)
        found = greedy(task, replace(plain, threshold=tau), resumed)
        evaluated = len(found.trace) - (0 if resumed is None else first_change(resumed.trace, tau))
        runs.append(found)
        reached = judge.reaches(found.kept, options)
        below, above = tau_interval(found.trace)
        trace.append({"knob": tau, "kept": float(found.kept.sum()), "reached": float(reached),
                      "evaluated": float(evaluated)})
        if reached:
            best, low = found, max(low, above)
        else:
            high = min(high, below)
        if not low < high:
            break
    if best is None:
        return Found(torch.ones(task.graph.n_edges, dtype=torch.bool), found.scores, trace)
    return Found(best.kept, best.scores, trace)


@torch.no_grad()
def greedy(task: PreparedTask, options: EdgeOptions, resumed: Found | None = None) -> Found:
    """ACDC over the edge graph with KL threshold τ = ``options.threshold``; one masked forward per edge.

    With ``resumed`` (a run at another τ) the decisions it shares with this τ are taken from
    its trace without forwards, and the walk goes on from the first edge decided otherwise.
    """
    forward, graph, batches = task.forward, task.graph, task.batches
    prefixes = [forward.differences(b) for b in batches]
    device = batches[0].clean.logits.device
    edges = torch.ones(graph.n_edges, device=device)
    scores = torch.zeros(graph.n_edges)
    kl = 0.0  # KL(f‖f)
    order = reverse_topological(graph)
    same = 0 if resumed is None else first_change(resumed.trace, options.threshold)
    trace = [] if resumed is None else resumed.trace[:same]
    for step in trace:
        edge = int(step["edge"])
        scores[edge] = step["kl_after"] - step["kl_before"]
        if step["removed"]:
            edges[edge], kl = 0.0, step["kl_after"]
    bar = progress_bar(len(order) - same, "ACDC: edges" if options.progress else None)
    for edge, layer in order[same:]:
        edges[edge] = 0.0
        kl_after = mean_kl(forward, batches, edges, layer, prefixes)
        delta = kl_after - kl
        scores[edge] = delta
        removed = delta < options.threshold
        trace.append({"edge": edge, "kl_before": kl, "kl_after": kl_after, "removed": float(removed)})
        if removed:
            kl = kl_after
        else:
            edges[edge] = 1.0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{kl:.4f}", kept=int(edges.sum()))
    if bar is not None:
        bar.close()
    return Found(edges.bool().cpu(), scores, trace)


METHOD = EdgeMethod("acdc", "ACDC", "threshold", "τ", search)


@renamed_keywords(clean_data="clean", corrupted_data="corrupted")
def acdc(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    threshold: float | None = None,
    faithfulness: float | None = None,
    kl: float | None = None,
    search_runs: int = 6,
    batch_size: int = 32,
    progress: bool = True,
    evaluate: bool = True,
) -> EdgeCircuit:
    """ACDC over the edge graph with KL threshold τ = ``threshold``; one masked forward per edge.

    Without ``threshold``, τ is searched in [1e-6, 1] (log scale, at most ``search_runs``
    runs) for the sparsest circuit that reaches ``faithfulness`` (default 0.99) or ``kl``
    (:func:`search_tau`): each run resumes the earlier run that decides like it longest,
    so it costs one masked forward per batch for each edge from its first different
    decision on (its trace's ``evaluated``), fewer than one whole run; and the search
    stops when no τ is left that could give another circuit. Judging each probe is one
    more masked forward per batch.
    """
    options = EdgeOptions(batch_size=batch_size, threshold=threshold, faithfulness=faithfulness, kl=kl,
                          search_runs=search_runs, progress=progress, evaluate=evaluate)
    return run_method(model, clean, corrupted, METHOD, options)
