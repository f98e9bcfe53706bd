"""Edge Pruning (docs/EDGES.md): learn hard-concrete masks on edges and nodes against KL to the full model."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..data.task_data import TaskData
from ..errors import ArgumentError
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.metrics import kl_divergence
from ..runtime.progress import progress_bar
from . import hard_concrete, target
from .ensemble import rank_normalised
from .evaluate import EdgeCircuit, PreparedTask
from .options import SEARCH_STEPS, STEPS, EdgeOptions
from .runner import EdgeMethod, Found, run_method
from .selection import top


def round_masks(edges: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Keep the ``round(mean(edges)·E)`` best-scored edges: the kept fraction matches the masks' mean."""
    k = int(round(float(edges.mean()) * edges.numel()))
    return top(scores, k)


def initial_log_alpha(options: EdgeOptions, n_edges: int, generator: torch.Generator) -> torch.Tensor:
    """``init_log_alpha`` for every edge (plus a little noise), or with ``init_scores`` from +a (largest ``|score|``) to
    −a (smallest)."""
    noise = 0.01 * torch.randn(n_edges, generator=generator)
    if options.init_scores is None:
        return options.init_log_alpha + noise
    return options.init_log_alpha * (2 * rank_normalised(options.init_scores.abs()) - 1) + noise


def search(task: PreparedTask, options: EdgeOptions) -> Found:
    """Learn the masks at ``target_sparsity``, or bisect it for the sparsest circuit that reaches the target."""
    if options.init_scores is not None and len(options.init_scores) != task.graph.n_edges:
        raise ArgumentError(f"init_scores has {len(options.init_scores)} entries but the model's edge graph has "
                            f"{task.graph.n_edges} edges: pass scores found on this model (circuit.scores)")
    if options.target_sparsity is not None:
        return learn(task, options)
    steps = SEARCH_STEPS if options.steps is None else options.steps
    plain = replace(options, faithfulness=None, kl=None, steps=steps)
    return target.bisect_knob(task, options, lambda s: learn(task, replace(plain, target_sparsity=s)), 0.0, 1.0)


def learn(task: PreparedTask, options: EdgeOptions) -> Found:
    """Learn the masks over the prepared batches, one batch per step (each rank its slice of it)."""
    graph, forward, batches = task.graph, task.forward, task.batches
    generator = torch.Generator().manual_seed(options.seed)
    device = batches[0].clean.logits.device
    edge_alpha = initial_log_alpha(options, graph.n_edges, generator).to(device)
    node_alpha = torch.full((graph.n_writers,), float(options.init_log_alpha), device=device)
    edge_alpha.requires_grad_(True)
    node_alpha.requires_grad_(options.node_masks)
    lambdas = torch.zeros(2, device=device, requires_grad=True)
    masks = torch.optim.Adam([edge_alpha, node_alpha] if options.node_masks else [edge_alpha], lr=options.lr)
    ascent = torch.optim.SGD([lambdas], lr=options.lambda_lr, maximize=True)
    steps = STEPS if options.steps is None else options.steps
    bar = progress_bar(steps, "edge pruning" if options.progress else None)
    trace = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        target = options.target_sparsity * min(1.0, step / (options.ramp * steps))
        z_edges = hard_concrete.sample(edge_alpha, generator)
        z_nodes = hard_concrete.sample(node_alpha, generator) if options.node_masks else None
        logits = forward.logits(batch, z_edges, z_nodes)
        kl = kl_divergence(torch.log_softmax(batch.clean.logits, -1), logits).sum() / task.batch_sizes[
            step % len(batches)]
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
        nodes = hard_concrete.expected(node_alpha) if options.node_masks else torch.ones_like(node_alpha)
        expected = hard_concrete.expected(edge_alpha) * nodes[writers]
        scores = torch.sigmoid(edge_alpha) * (torch.sigmoid(node_alpha[writers]) if options.node_masks else 1.0)
    return Found(round_masks(expected.cpu(), scores.cpu()), scores, trace)


METHOD = EdgeMethod("edge_prune", "edge pruning", "target_sparsity", "s", search)


@renamed_keywords(clean_data="clean", corrupted_data="corrupted")
def edge_prune(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    target_sparsity: float | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 0.1,
    lambda_lr: float = 1.0,
    ramp: float = 0.5,
    init_log_alpha: float = 3.0,
    node_masks: bool = True,
    seed: int = 0,
    faithfulness: float | None = None,
    kl: float | None = None,
    init_scores: torch.Tensor | None = None,
    search_runs: int = 6,
    progress: bool = True,
    evaluate: bool = True,
) -> EdgeCircuit:
    """Edge Pruning: the edges a task needs, found by gradient descent on hard-concrete masks.

    Loss = KL(f‖circuit) on the last token + λ1(t − s) + λ2(t − s)², where s is the
    expected edge sparsity, t ramps linearly from 0 to ``target_sparsity`` over the first
    ``ramp`` fraction of ``steps``, and λ rises by gradient ascent (``lambda_lr``).
    Edges and (with ``node_masks``) writer nodes each carry a mask; an edge counts as
    present when both do. At the end the expected masks are rounded so the kept
    fraction equals their mean. ``steps`` defaults to 300 at a given ``target_sparsity``.

    Without ``target_sparsity`` the sparsity is bisected over ``search_runs`` whole
    runs of ``steps`` (default 100 each) for the sparsest circuit that reaches
    ``faithfulness`` (default 0.99) or ``kl``: ``search_runs × steps`` forward+backward
    passes (one batch each) and ``search_runs`` masked forwards per batch to judge the
    probes (600 and 6 by default). ``init_scores`` (another method's ``circuit.scores``)
    starts the masks of the edges of largest ``|score|`` on and the smallest off instead of all on.
    ``clean`` and ``corrupted`` pair up row by row (same lengths and padding); the
    corrupted run supplies the counterfactual activations. With ``evaluate`` the result carries a report on the same batches.
    """
    options = EdgeOptions(batch_size=batch_size, target_sparsity=target_sparsity, steps=steps, lr=lr,
                          lambda_lr=lambda_lr, ramp=ramp, init_log_alpha=init_log_alpha, node_masks=node_masks,
                          seed=seed, faithfulness=faithfulness, kl=kl, init_scores=init_scores,
                          search_runs=search_runs, progress=progress, evaluate=evaluate)
    return run_method(model, clean, corrupted, METHOD, options)
