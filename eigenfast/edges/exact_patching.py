"""Exact single-edge patching: what attribution scores approximate, and how well they rank edges against it.

An edge's exact effect is the change of EAP's loss (the cross-entropy of the label,
averaged over the examples) when that edge alone takes its counterfactual: its mask
0, every other mask 1, in the masked forward. EAP's score ``(ỹ_j − y_j)·∂L/∂x_i`` is
the first-order estimate of exactly this number (same sign), EAP-IG's an average of
gradients along a path to it. One masked forward per edge and batch; each resumes at
the edge's reader layer from the clean differences below it, as ACDC does, since
nothing below the reader changes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ArgumentError
from ..runtime import distributed
from ..runtime.forward import eval_mode
from ..runtime.progress import progress_bar
from .evaluate import PreparedTask
from .graph import EdgeGraph


def reader_layers(graph: EdgeGraph) -> torch.Tensor:
    """``(E,)``: the layer of each edge's reader (``n_layers`` for the logits)."""
    return torch.cat([torch.full((g.n_edges,), g.layer, dtype=torch.long) for g in graph.groups])


@torch.no_grad()
def exact_patching(task: PreparedTask, progress: bool = False) -> torch.Tensor:
    """``(E,)`` float64: the mean loss with each edge alone patched to its counterfactual, minus the model's."""
    forward, graph = task.forward, task.graph
    layers = reader_layers(graph).tolist()
    change = torch.zeros(graph.n_edges, dtype=torch.float64)
    bar = progress_bar(graph.n_edges * len(task.batches), "exact patching: edges" if progress else None)
    with eval_mode(task.model):
        for batch in task.batches:
            device, labels = batch.clean.logits.device, batch.clean.labels
            edges = torch.ones(graph.n_edges, device=device)
            # The unpatched loss from the same masked forward, so its own rounding cancels in each difference.
            full = float(nn.functional.cross_entropy(forward.logits(batch, edges).double(), labels, reduction="sum"))
            differences = forward.differences(batch)
            for edge, layer in enumerate(layers):
                edges[edge] = 0.0
                prefix = differences[: graph.first_writer(layer)] if layer else None
                logits = forward.logits(batch, edges, start_layer=layer, prefix=prefix)
                change[edge] += float(nn.functional.cross_entropy(logits.double(), labels, reduction="sum")) - full
                edges[edge] = 1.0
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    n = distributed.sum_number(sum(len(b.clean.labels) for b in task.batches))
    return distributed.summed(change) / n


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's coefficient needs)."""
    _, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (Pearson's of their average ranks)."""
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ArgumentError(f"spearman needs two 1-D score vectors of the same length >= 2, got shapes {tuple(a.shape)} "
                            f"and {tuple(b.shape)}: pass one score per edge of the same graph")
    ra, rb = _average_ranks(a.detach().cpu()), _average_ranks(b.detach().cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    if denominator == 0:
        raise ArgumentError("spearman is undefined when every score of one vector is equal; check that the "
                            "scores were computed (an all-zero vector means nothing was attributed)")
    return float((ra * rb).sum()) / denominator
