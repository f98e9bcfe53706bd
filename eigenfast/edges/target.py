"""The smallest circuit that reaches a target: faithfulness or KL, found over a method's own knob.

Faithfulness is MIB's normalised score ``(m(C) − m(∅)) / (m(M) − m(∅))``: ``m`` is the
mean probability of the clean answer, ``M`` the full model, ``∅`` the empty circuit
(every edge takes its counterfactual: the corrupted run), ``C`` the circuit with the
other edges patched. Score methods rank their edges once and bisect the number kept
(about log2(E) masked forwards); Edge Pruning bisects its sparsity here, one shorter
run per probe (edge_prune.py), ACDC its τ in acdc.py, runs resuming one another; at
most ``search_runs`` runs each.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import DataError
from ..runtime import distributed
from ..runtime.metrics import kl_divergence
from .evaluate import PreparedTask
from .faithfulness import mean_metric, metric_values
from .masked_forward import EdgeForward, Prepared
from .options import EdgeOptions
from .runner import Found
from .selection import top


def answer_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The clean answer's probability per example ``(B,)``: the metric ``m`` of faithfulness (MIB's "prob")."""
    return metric_values(logits, labels, labels, "prob")  # "prob" reads no counterfactual answer


class Judge:
    """Faithfulness and KL of circuits on a prepared task's batches (summed over every rank)."""

    def __init__(self, task: PreparedTask) -> None:
        self.forward: EdgeForward = task.forward
        self.batches: list[Prepared] = task.batches
        self.full, self.empty = mean_metric(task, "full", "prob"), mean_metric(task, "empty", "prob")
        self.evaluations = 0

    def check(self, kind: str) -> None:
        """Refuse a faithfulness target the data cannot define (before any search runs)."""
        if kind == "faithfulness" and not abs(self.full - self.empty) > 1e-6:
            raise DataError(
                f"faithfulness is undefined here: the answer's mean probability is {self.full:.6g} with the clean "
                f"inputs and {self.empty:.6g} with the corrupted ones; use corrupted inputs that change the answer, "
                "or ask for a KL target (kl=...) or give the method's knob (target_sparsity, threshold)"
            )

    @torch.no_grad()
    def measure(self, kept: torch.Tensor) -> tuple[float, float]:
        """(faithfulness, KL(f‖C)) of the circuit ``kept`` ``(E,)`` bool."""
        self.evaluations += 1
        sums = torch.zeros(3, dtype=torch.float64)  # m(C), KL, examples
        for b in self.batches:
            logits = self.forward.logits(b, kept.to(b.clean.logits.device).float())
            sums += torch.tensor([float(answer_probability(logits, b.clean.labels).sum()),
                                  float(kl_divergence(torch.log_softmax(b.clean.logits, -1), logits).sum()),
                                  len(logits)], dtype=torch.float64)
        metric, kl, n = distributed.summed(sums).tolist()
        return (metric / n - self.empty) / (self.full - self.empty), kl / n

    def reaches(self, kept: torch.Tensor, options: EdgeOptions) -> bool:
        kind, goal = options.target
        faithfulness, kl = self.measure(kept)
        return faithfulness >= goal if kind == "faithfulness" else kl <= goal


def smallest_top(task: PreparedTask, scores: torch.Tensor, options: EdgeOptions) -> Found:
    """The fewest edges of largest ``|score|`` whose circuit reaches ``options.target``, by bisection over their number.

    Bisection assumes that keeping more edges never loses the target; the full graph
    always reaches it (faithfulness 1, KL 0). Each probe is one masked forward per batch.
    """
    magnitude = scores.abs()
    judge = Judge(task)
    judge.check(options.target[0])
    low, high = 0, len(scores)  # top(low) is not known to reach the target, top(high) does
    trace = []
    while high - low > 1:
        middle = (low + high) // 2
        reached = judge.reaches(top(magnitude, middle), options)
        trace.append({"kept": middle, "reached": float(reached)})
        low, high = (low, middle) if reached else (middle, high)
    if low == 0 and judge.reaches(top(magnitude, 0), options):
        high = 0
    return Found(top(magnitude, high), scores, trace)


def bisect_knob(
    task: PreparedTask,
    options: EdgeOptions,
    run: Callable[[float], Found],
    low: float,
    high: float,
    log: bool = False,
) -> Found:
    """The circuit of the largest knob in ``[low, high]`` (larger = sparser) that reaches ``options.target``.

    ``run(knob)`` is one whole run of the method; there are ``options.search_runs`` of
    them, each halving the interval (in log space with ``log``). When none reaches the
    target the full graph is returned: it always does.
    """
    judge = Judge(task)
    judge.check(options.target[0])
    to = (lambda v: math.log(v)) if log else (lambda v: v)
    back = (lambda v: math.exp(v)) if log else (lambda v: v)
    a, b = to(low), to(high)
    best, trace = None, []
    for _ in range(options.search_runs):
        knob = back((a + b) / 2)
        found = run(knob)
        reached = judge.reaches(found.kept, options)
        trace.append({"knob": knob, "kept": float(found.kept.sum()), "reached": float(reached)})
        if reached:
            best, a = found, to(knob)
        else:
            b = to(knob)
    if best is None:
        best = Found(torch.ones(task.graph.n_edges, dtype=torch.bool), found.scores)
    return Found(best.kept, best.scores, trace)


def choose(task: PreparedTask, scores: torch.Tensor, options: EdgeOptions) -> Found:
    """A score method's circuit: the ``(1 − target_sparsity)`` edges of largest ``|score|``, or the fewest that reach
    the target. The scores stay as they are (signed, for the faithfulness curves' CPR)."""
    if options.target_sparsity is not None:
        return Found(top(scores.abs(), int(round((1.0 - options.target_sparsity) * len(scores)))), scores)
    return smallest_top(task, scores, options)
