"""Faithfulness curves and their areas, CPR and CMD, as the MIB circuit-localization track defines them.

For each circuit size (a fraction of the graph's edges) the circuit is built from a
method's edge scores (:mod:`.selection`), every edge outside it takes its
counterfactual activation (the masked forward), and its faithfulness is

    f(C) = (m(C) − m(∅)) / (m(full) − m(∅))

with ``m`` the task metric averaged over the examples, ``m(full)`` the model and
``m(∅)`` the fully corrupted run. Over the sizes ``x`` (fractions of edges, linear
axis), trapezoids give

    CPR = ∫ f dx           (higher is better)
    CMD = ∫ |1 − f| dx     (lower is better)

between the smallest and the largest size (0.1% to 100% by default). As MIB does, the
two areas come from two curves: CPR from the circuits of the highest scores as they
are (an edge whose score says it works against the answer comes last), CMD from the
circuits of the highest ``|score|``. Scores that are never negative give one curve;
a circuit met twice is evaluated once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ArgumentError, DataError
from ..runtime import distributed, figures
from ..runtime.forward import eval_mode
from ..runtime.progress import progress as progress_items
from .evaluate import PreparedTask
from .selection import SELECTIONS, select

log = logging.getLogger(__name__)

PERCENTAGES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)  # MIB's circuit sizes, percent of edges
FRACTIONS = tuple(p / 100 for p in PERCENTAGES)
METRICS = ("logit_diff", "prob")


def check_curve_settings(fractions: Sequence[float], selection: str, metric: str) -> None:
    """Refuse sizes, selection rules or metrics the curve cannot use, before any forward runs."""
    if len(fractions) < 2 or any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
        raise ArgumentError(f"fractions must be at least two increasing circuit sizes in (0, 1], got {list(fractions)}")
    if selection not in SELECTIONS:
        raise ArgumentError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
    if metric not in METRICS:
        raise ArgumentError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def circuit_sizes(n_edges: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Edges in each circuit: ``floor(fraction · n_edges)``, as MIB counts them."""
    return [int(f * n_edges) for f in fractions]


def areas(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoids of ``f`` and of ``|1 − f|`` over the fractions on a linear axis."""
    if len(fractions) != len(faithfulness) or len(fractions) < 2:
        raise ArgumentError("areas need one faithfulness per circuit size, and at least two sizes")
    cpr = cmd = 0.0
    for (x1, f1), (x2, f2) in zip(zip(fractions, faithfulness), zip(fractions[1:], faithfulness[1:])):
        cpr += (x2 - x1) * (f1 + f2) / 2
        cmd += (x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2
    return cpr, cmd


def metric_values(logits: torch.Tensor, answers: torch.Tensor, counterfactual_answers: torch.Tensor,
                  metric: str) -> torch.Tensor:
    """Per example ``(B,)``: the answer's logit minus the counterfactual answer's ("logit_diff"), or the answer's
    probability ("prob")."""
    logits = logits.double()
    if metric == "prob":
        return torch.softmax(logits, -1).gather(-1, answers[:, None])[:, 0]
    return (logits.gather(-1, answers[:, None]) - logits.gather(-1, counterfactual_answers[:, None]))[:, 0]


@torch.no_grad()
def mean_metric(task: PreparedTask, kept: torch.Tensor | str, metric: str) -> float:
    """The metric averaged over every rank's examples: for a circuit ``kept`` ``(E,)``, or "full" / "empty" (the
    model and the corrupted run themselves)."""
    total = torch.zeros(2, dtype=torch.float64)
    for batch, counterfactual in zip(task.batches, task.corrupted_labels):
        if isinstance(kept, str):
            logits = batch.clean.logits if kept == "full" else batch.corrupted.logits
        else:
            logits = task.forward.logits(batch, kept.float().to(batch.clean.logits.device))
        values = metric_values(logits, batch.clean.labels, counterfactual, metric)
        total += torch.tensor([float(values.sum()), len(values)], dtype=torch.float64)
    total = distributed.summed(total)
    return float(total[0] / total[1])


@dataclass
class FaithfulnessCurve:
    """One method's two faithfulness curves (highest scores: CPR; highest ``|score|``: CMD) and their areas."""

    method: str
    selection: str
    metric: str
    fractions: list[float]
    edges: list[int]  # edges in each circuit of the highest scores, after pruning dangling ones
    faithfulness: list[float]  # of those circuits: CPR's curve
    edges_abs: list[int]  # the same for the circuits of the highest |score|
    faithfulness_abs: list[float]  # CMD's curve
    full: float  # m(full)
    empty: float  # m(∅)
    cpr: float
    cmd: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def faithfulness_curve(
    task: PreparedTask,
    scores: torch.Tensor,
    method: str = "",
    selection: str = "top_n",
    metric: str = "logit_diff",
    fractions: Sequence[float] = FRACTIONS,
    progress: bool = False,
) -> FaithfulnessCurve:
    """The faithfulness curves of the circuits built from ``scores`` ``(E,)`` on an already prepared task."""
    check_curve_settings(fractions, selection, metric)
    graph = task.graph
    with eval_mode(task.model):
        full, empty = mean_metric(task, "full", metric), mean_metric(task, "empty", metric)
        if not math.isfinite(full - empty) or abs(full - empty) <= 1e-9 * max(1.0, abs(full)):
            raise DataError(
                f"the metric {metric} is {full:.6g} on the model and {empty:.6g} on the corrupted run, so faithfulness "
                "(its share of that difference) is undefined; use counterfactual inputs whose answers differ from "
                "the clean ones, or another metric"
            )
        if full < empty:
            log.warning(
                "the metric %s is %.4g on the model and %.4g on the corrupted run: the model does not favour the clean "
                "answers on these examples, so faithfulness changes sign and CPR/CMD measure little; use examples the "
                "model answers correctly", metric, full, empty,
            )
        measured: dict[bytes, float] = {}

        def faithfulness(kept: torch.Tensor) -> float:
            key = kept.numpy().tobytes()
            if key not in measured:
                measured[key] = (mean_metric(task, kept, metric) - empty) / (full - empty)
            return measured[key]

        curves = {False: ([], []), True: ([], [])}  # absolute -> (edges, faithfulness)
        sizes = circuit_sizes(graph.n_edges, fractions)
        for n in progress_items(sizes, len(sizes), f"faithfulness of {method or 'circuit'}" if progress else None):
            for absolute, (edges, values) in curves.items():
                kept = select(graph, scores, n, selection, absolute)
                edges.append(int(kept.sum()))
                values.append(faithfulness(kept))
    (edges, values), (edges_abs, values_abs) = curves[False], curves[True]
    cpr, cmd = areas(fractions, values)[0], areas(fractions, values_abs)[1]
    return FaithfulnessCurve(method, selection, metric, list(fractions), edges, values, edges_abs, values_abs, full,
                             empty, cpr, cmd)


def plot_curves(curves: Sequence[FaithfulnessCurve], path: str | Path) -> Path:
    """Faithfulness against the fraction of edges (log axis), one line per curve (dashed: its |score| circuits, where
    they differ), CPR/CMD in the legend."""
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for curve in curves:
        x = [100 * f for f in curve.fractions]
        (line,) = ax.plot(x, curve.faithfulness, marker="o",
                          label=f"{curve.method} (CPR {curve.cpr:.2f}, CMD {curve.cmd:.2f})")
        if curve.faithfulness_abs != curve.faithfulness:
            ax.plot(x, curve.faithfulness_abs, marker=".", ls="--", color=line.get_color(),
                    label=f"{curve.method}, by |score| (CMD's curve)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="edges in the circuit (%)", ylabel="faithfulness",
           title=f"faithfulness against circuit size ({curves[0].selection}, {curves[0].metric})" if curves else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figures.save(fig, path, dpi=120)
