"""Edge Pruning (docs/EDGES.md): learn hard-concrete masks on edges and nodes against KL to the full model."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..data.task_data import TaskData, as_task_data
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.forward import eval_mode, frozen_parameters
from ..runtime.metrics import kl_divergence
from ..runtime.progress import progress_bar
from . import hard_concrete
from .evaluate import EdgeCircuit, evaluate_circuit
from .masked_forward import EdgeForward


def round_masks(edges: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Keep the ``round(mean(edges)·E)`` best-scored edges: the kept fraction matches the masks' mean."""
    k = int(round(float(edges.mean()) * edges.numel()))
    kept = torch.zeros(edges.numel(), dtype=torch.bool)
    kept[torch.argsort(scores.cpu(), descending=True, stable=True)[:k]] = True
    return kept


@renamed_keywords(clean_data="clean", corrupted_data="corrupted")
def edge_prune(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    target_sparsity: float = 0.95,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.1,
    lambda_lr: float = 1.0,
    ramp: float = 0.5,
    init_log_alpha: float = 3.0,
    node_masks: bool = True,
    seed: int = 0,
    progress: bool = True,
    evaluate: bool = True,
) -> EdgeCircuit:
    """Edge Pruning: the edges a task needs, found by gradient descent on hard-concrete masks.

    Loss = KL(f‖circuit) on the last token + λ1(t − s) + λ2(t − s)², where s is the
    expected edge sparsity, t ramps linearly from 0 to ``target_sparsity`` over the first
    ``ramp`` fraction of ``steps``, and λ rises by gradient ascent (``lambda_lr``).
    Edges and (with ``node_masks``) writer nodes each carry a mask; an edge counts as
    present when both do. At the end the expected masks are rounded so the kept
    fraction equals their mean. ``clean`` and ``corrupted`` pair up row by
    row (same lengths and padding); the corrupted run supplies the counterfactual
    activations. With ``evaluate`` the result carries a report on the same data.
    """
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1], got {target_sparsity}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < ramp <= 1.0:
        raise ValueError(f"ramp (the fraction of steps over which the target rises) must be in (0, 1], got {ramp}")
    clean, corrupted = as_task_data(clean), as_task_data(corrupted)
    start = time.perf_counter()
    forward = EdgeForward(model)
    graph = forward.graph
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model), frozen_parameters(model):
        if len(clean) != len(corrupted):
            raise ValueError(f"clean ({len(clean)}) and corrupted ({len(corrupted)}) data must pair up one to one")
        # One step reads one batch; under a process group each rank reads its slice of it.
        slices = distributed.local_rows(len(clean), batch_size, "edge pruning")
        batches = [forward.prepare(clean.subset(rows), corrupted.subset(rows)) for rows, _ in slices]
        device = batches[0].clean.logits.device
        edge_alpha = (init_log_alpha + 0.01 * torch.randn(graph.n_edges, generator=generator)).to(device)
        node_alpha = torch.full((graph.n_writers,), float(init_log_alpha), device=device)
        edge_alpha.requires_grad_(True)
        node_alpha.requires_grad_(node_masks)
        lambdas = torch.zeros(2, device=device, requires_grad=True)
        masks = torch.optim.Adam([edge_alpha, node_alpha] if node_masks else [edge_alpha], lr=lr)
        ascent = torch.optim.SGD([lambdas], lr=lambda_lr, maximize=True)
        bar = progress_bar(steps, "edge pruning" if progress else None)
        trace = []
        for step in range(steps):
            batch = batches[step % len(batches)]
            target = target_sparsity * min(1.0, step / (ramp * steps))
            z_edges = hard_concrete.sample(edge_alpha, generator)
            z_nodes = hard_concrete.sample(node_alpha, generator) if node_masks else None
            logits = forward.logits(batch, z_edges, z_nodes)
            kl = kl_divergence(torch.log_softmax(batch.clean.logits, -1), logits).sum() / slices[step % len(slices)][1]
            sparsity = 1.0 - hard_concrete.probability_nonzero(edge_alpha).mean()
            # Every rank adds its share of the sparsity term, so the gradients' sum holds it once.
            lagrangian = hard_concrete.lagrangian(target, sparsity, lambdas[0], lambdas[1]) / distributed.world_size()
            loss = kl + lagrangian
            masks.zero_grad()
            ascent.zero_grad()
            loss.backward()
            kl = kl.detach()
            distributed.all_sum_([edge_alpha.grad, node_alpha.grad, lambdas.grad, kl])
            masks.step()
            ascent.step()
            kl, sparsity = kl.item(), sparsity.item()
            trace.append({"step": step, "kl": kl, "sparsity": sparsity, "target": target,
                          "lambda1": lambdas[0].item(), "lambda2": lambdas[1].item()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4f}", sparsity=f"{sparsity:.3f}", target=f"{target:.3f}")
        if bar is not None:
            bar.close()
        with torch.no_grad():
            writers = graph.edge_writers.to(device)
            nodes = hard_concrete.expected(node_alpha) if node_masks else torch.ones_like(node_alpha)
            expected = hard_concrete.expected(edge_alpha) * nodes[writers]
            scores = torch.sigmoid(edge_alpha) * (torch.sigmoid(node_alpha[writers]) if node_masks else 1.0)
        kept = round_masks(expected.cpu(), scores.cpu())
    circuit = EdgeCircuit("edge pruning", graph, kept, scores.detach().cpu(), time.perf_counter() - start, trace)
    if evaluate:
        circuit.report = evaluate_circuit(model, circuit, clean, corrupted, batch_size=batch_size)
    return circuit
