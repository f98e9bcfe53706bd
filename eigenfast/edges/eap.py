"""Edge Attribution Patching: one forward/backward per batch scores every edge at once.

An edge's score is ``(ỹ_j − y_j)·∂L/∂x_i``: the first-order change of the loss when
the reader ``i`` takes writer ``j``'s counterfactual output. In the masked forward
with every mask 1 that is exactly ``−∂L/∂z_ji``, so one backward through the masks
gives all of them. ``L`` is the task loss (cross-entropy of the label): the KL to
the full model is zero with zero gradient at the full model, so it ranks nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.task_data import TaskData
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.progress import progress
from .evaluate import EdgeCircuit, PreparedTask
from .masked_forward import EdgeForward, Prepared
from .options import EdgeOptions
from .runner import EdgeMethod, Found, run_method


def edge_attributions(forward: EdgeForward, batches: list[Prepared], desc: str | None = None) -> torch.Tensor:
    """Mean ``(ỹ − y)·∂L/∂x`` per edge ``(E,)`` over the batches' examples (of every rank)."""
    total, n = torch.zeros(forward.graph.n_edges, dtype=torch.float64), 0
    for batch in progress(batches, len(batches), desc):
        edges = torch.ones(forward.graph.n_edges, device=batch.clean.logits.device, requires_grad=True)
        logits = forward.logits(batch, edges)
        loss = nn.functional.cross_entropy(logits, batch.clean.labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, edges)
        total -= grad.double().cpu()
        n += len(batch.clean.labels)
    return distributed.summed(total) / distributed.sum_number(n)


def search(task: PreparedTask, options: EdgeOptions) -> Found:
    """Keep the ``(1 − target_sparsity)`` fraction of edges with the largest ``|attribution|``."""
    attributions = edge_attributions(task.forward, task.batches, "EAP: batches" if options.progress else None)
    scores = attributions.abs().float()
    k = int(round((1.0 - options.target_sparsity) * task.graph.n_edges))
    kept = torch.zeros(task.graph.n_edges, dtype=torch.bool)
    kept[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    return Found(kept, scores)


METHOD = EdgeMethod("eap", "EAP", "target_sparsity", "s", search)


@renamed_keywords(clean_data="clean", corrupted_data="corrupted")
def eap(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    target_sparsity: float = 0.95,
    batch_size: int = 32,
    progress: bool = True,
    evaluate: bool = True,
) -> EdgeCircuit:
    """EAP: keep the ``(1 − target_sparsity)`` fraction of edges with the largest ``|attribution|``."""
    options = EdgeOptions(batch_size=batch_size, target_sparsity=target_sparsity, progress=progress,
                          evaluate=evaluate)
    return run_method(model, clean, corrupted, METHOD, options)
