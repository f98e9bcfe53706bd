"""EAP with integrated gradients (EAP-IG): EAP's gradient averaged along a path from the corrupted run to the clean one.

An edge ``j → i`` scores ``(ỹ_j − y_j) · (1/m) Σ_k ∂L/∂x_i`` at ``α_k = k/m``, ``k = 1..m``, with
``y``, ``ỹ`` the writer's clean and corrupted outputs and ``L`` EAP's loss. Two paths:

* ``ig-inputs``: the embeddings move from corrupted to clean, ``ẽ + α(e − ẽ)``, and the
  model runs on from there;
* ``ig-activations``: one node at a time (the embeddings, a layer's heads together, a
  layer's MLP) outputs ``ỹ + α(y − ỹ)`` while everything else runs on the clean input;
  the gradients of every node's ``m`` steps are averaged.

In the masked forward (every edge mask 1) both are node masks ``α`` on the moving
writers, and a :class:`~.masked_forward.Probe` turns each backward into the EAP products
with the fixed clean-minus-corrupted differences. ``m = 1`` is EAP. The published code
takes the left end points ``k = 0..m−1`` for ig-inputs; the right ones here make
``m = 1`` EAP and converge to the same integral. Cost per batch: one extra forward for
the differences, then ``m`` (ig-inputs) or ``(2·layers + 1)·m`` (ig-activations)
forward+backward passes of the masked forward. KV heads stay grouped: the graph's k
and v readers are per KV head.
"""
from __future__ import annotations

import torch
from torch import nn

from ..runtime import distributed
from ..runtime.progress import progress_bar
from . import target
from .evaluate import PreparedTask
from .graph import EdgeGraph
from .masked_forward import EdgeForward, Prepared, Probe
from .options import EdgeOptions
from .runner import EdgeMethod, Found

PATHS = ("ig-inputs", "ig-activations")


def moving_writers(graph: EdgeGraph, path: str) -> list[list[int]]:
    """The writers each path interpolates together, one list per node of the path."""
    if path == "ig-inputs":
        return [[0]]
    nodes = [[0]]
    for layer in range(graph.n_layers):
        nodes += [list(range(graph.head_writer(layer, 0), graph.mlp_writer(layer))), [graph.mlp_writer(layer)]]
    return nodes


def integrated_attributions(
    forward: EdgeForward, batches: list[Prepared], path: str, steps: int, desc: str | None = None
) -> torch.Tensor:
    """Mean ``(ỹ − y)·avg_α ∂L/∂x`` per edge ``(E,)`` over the batches' examples (of every rank)."""
    graph = forward.graph
    nodes_of_path = moving_writers(graph, path)
    total, n = torch.zeros(graph.n_edges, dtype=torch.float64), 0
    bar = progress_bar(len(batches) * len(nodes_of_path) * steps, desc)
    for batch in batches:
        device = batch.clean.logits.device
        differences = forward.differences(batch)
        edges = torch.ones(graph.n_edges, device=device)
        for writers in nodes_of_path:
            for k in range(1, steps + 1):
                nodes = torch.ones(graph.n_writers, device=device)
                nodes[writers] = k / steps
                probe = Probe(torch.ones(graph.n_edges, device=device, requires_grad=True), differences)
                logits = forward.logits(batch, edges, nodes, probe=probe)
                loss = nn.functional.cross_entropy(logits, batch.clean.labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, probe.weights)
                total -= grad.double().cpu()
                if bar is not None:
                    bar.update(1)
        n += len(batch.clean.labels)
    if bar is not None:
        bar.close()
    return distributed.summed(total) / (distributed.sum_number(n) * len(nodes_of_path) * steps)


def _searcher(path: str, label: str):
    def search(task: PreparedTask, options: EdgeOptions) -> Found:
        """Rank edges by ``|EAP-IG score|``; keep a fraction or the fewest that reach the target."""
        attributions = integrated_attributions(task.forward, task.batches, path, options.ig_steps,
                                               f"{label}: steps" if options.progress else None)
        return target.choose(task, attributions.float(), options)

    return search


INPUTS = EdgeMethod("eap_ig_inputs", "EAP-IG-inputs", "target_sparsity", "s", _searcher("ig-inputs", "EAP-IG-inputs"))
ACTIVATIONS = EdgeMethod("eap_ig_activations", "EAP-IG-activations", "target_sparsity", "s",
                         _searcher("ig-activations", "EAP-IG-activations"))
