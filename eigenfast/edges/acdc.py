"""ACDC: greedy edge removal in reverse topological order, keeping an edge when removing it costs ≥ τ in KL.

Walking readers from the logits down, each edge into the current reader is
switched to its counterfactual on top of everything removed so far; it stays
removed if KL(f‖circuit) rises by less than ``threshold``. When the edges into
layer ``l`` are visited nothing below ``l`` has changed, so every candidate
resumes the masked forward at ``l`` from the cached writer differences below it.
"""
from __future__ import annotations

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


# The τ interval a target's bisection searches (log scale): from nearly every edge kept to nearly none.
TAU_RANGE = (1e-6, 1.0)


def search(task: PreparedTask, options: EdgeOptions) -> Found:
    """ACDC at τ = ``options.threshold``, or τ bisected for the sparsest circuit that reaches the target."""
    if options.threshold is not None:
        return greedy(task, options)
    plain = replace(options, faithfulness=None, kl=None)
    return target.bisect_knob(task, options, lambda tau: greedy(task, replace(plain, threshold=tau)), *TAU_RANGE,
                              log=True)


@torch.no_grad()
def greedy(task: PreparedTask, options: EdgeOptions) -> Found:
    """ACDC over the edge graph with KL threshold τ = ``options.threshold``; one masked forward per edge."""
    forward, graph, batches = task.forward, task.graph, task.batches
    prefixes = [forward.differences(b) for b in batches]
    device = batches[0].clean.logits.device
    edges = torch.ones(graph.n_edges, device=device)
    scores = torch.zeros(graph.n_edges)
    kl = 0.0  # KL(f‖f)
    trace = []
    order = reverse_topological(graph)
    bar = progress_bar(len(order), "ACDC: edges" if options.progress else None)
    for edge, layer in order:
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

    Without ``threshold``, τ is bisected (log scale, ``search_runs`` whole runs) for the
    sparsest circuit that reaches ``faithfulness`` (default 0.99) or ``kl``.
    """
    options = EdgeOptions(batch_size=batch_size, threshold=threshold, faithfulness=faithfulness, kl=kl,
                          search_runs=search_runs, progress=progress, evaluate=evaluate)
    return run_method(model, clean, corrupted, METHOD, options)
