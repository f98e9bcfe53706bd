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
from ..errors import ArgumentError
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.progress import progress
from . import eap_ig, target
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
    """Rank edges by ``|attribution|``; keep a fraction of them or the fewest that reach the target."""
    attributions = edge_attributions(task.forward, task.batches, "EAP: batches" if options.progress else None)
    return target.choose(task, attributions.float(), options)


METHOD = EdgeMethod("eap", "EAP", "target_sparsity", "s", search)
VARIANTS = {"eap": METHOD, "ig-inputs": eap_ig.INPUTS, "ig-activations": eap_ig.ACTIVATIONS}


@renamed_keywords(clean_data="clean", corrupted_data="corrupted")
def eap(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    target_sparsity: float | None = None,
    method: str = "eap",
    steps: int = 5,
    faithfulness: float | None = None,
    kl: float | None = None,
    batch_size: int = 32,
    progress: bool = True,
    evaluate: bool = True,
) -> EdgeCircuit:
    """EAP (``method="eap"``) or EAP-IG (``"ig-inputs"``, ``"ig-activations"``, ``steps`` points on the path).

    Edges are ranked by ``|score|``; the circuit's ``scores`` keep their sign (positive: patching the
    edge raises the loss, it carries the answer). With ``target_sparsity`` the ``(1 − target_sparsity)``
    fraction is kept; otherwise the fewest top edges whose circuit reaches ``faithfulness``
    (default 0.99) or ``kl`` (docs/EDGES.md, "Targets").
    """
    if method not in VARIANTS:
        raise ArgumentError(f"unknown EAP method {method!r}; choose from {', '.join(VARIANTS)}")
    options = EdgeOptions(batch_size=batch_size, target_sparsity=target_sparsity, ig_steps=steps,
                          faithfulness=faithfulness, kl=kl, progress=progress, evaluate=evaluate)
    return run_method(model, clean, corrupted, VARIANTS[method], options)
