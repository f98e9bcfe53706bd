"""How much a method's circuit depends on the data sample: a bootstrap over examples.

Each resample draws as many clean/corrupted pairs as the task has, with
replacement, runs the method on them, and judges the circuits built from its
scores on the whole task (the same prepared batches every resample), so the
spread of CPR and CMD is the spread due to the sample the method saw. The
circuits' agreement is the mean edge IoU (|A ∩ B| / |A ∪ B|) over every pair of
resampled circuits, each the method's own answer at its setting.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..errors import ArgumentError
from ..runtime.progress import progress as progress_items
from .evaluate import PreparedTask, prepare
from .faithfulness import FRACTIONS, faithfulness_curve
from .options import EdgeOptions
from .runner import EdgeMethod


def edge_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two ``(E,)`` edge sets; two empty circuits agree fully (1)."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def mean_pairwise_iou(circuits: Sequence[torch.Tensor]) -> float:
    """The mean :func:`edge_iou` over every pair of ``circuits`` (at least two)."""
    if len(circuits) < 2:
        raise ArgumentError(f"agreement needs at least two circuits, got {len(circuits)}: use resamples >= 2")
    pairs = list(itertools.combinations(circuits, 2))
    return sum(edge_iou(a, b) for a, b in pairs) / len(pairs)


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of ``values`` (linear interpolation between order statistics)."""
    tail = (1 - level) / 2
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])


@dataclass
class Stability:
    """The bootstrap's CPR and CMD per resample, their 95% intervals, and the resampled circuits' mean edge IoU."""

    resamples: int
    cpr: list[float]
    cmd: list[float]
    cpr_interval: tuple[float, float]
    cmd_interval: tuple[float, float]
    iou: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def check_resamples(resamples: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0 or resamples == 1:
        raise ArgumentError(f"resamples must be 0 (no bootstrap) or an integer >= 2, got {resamples!r}")


def bootstrap(
    task: PreparedTask,
    method: EdgeMethod,
    options: EdgeOptions,
    resamples: int,
    seed: int = 0,
    selection: str = "top_n",
    metric: str = "logit_diff",
    fractions: Sequence[float] = FRACTIONS,
) -> Stability:
    """Run ``method`` on ``resamples`` bootstrap samples of ``task``'s examples and judge each on the whole task."""
    check_resamples(resamples)
    if resamples == 0:
        raise ArgumentError("bootstrap needs resamples >= 2; resamples=0 means no bootstrap, so do not call it")
    generator = torch.Generator().manual_seed(seed)  # the same draws on every rank
    quiet = replace(options, progress=False, evaluate=False)
    n = len(task.clean)
    cpr, cmd, circuits = [], [], []
    desc = f"{method.label}: bootstrap" if options.progress else None
    for _ in progress_items(range(resamples), resamples, desc):
        pick = torch.randint(n, (n,), generator=generator)
        sample = prepare(task.model, task.clean.subset(pick), task.corrupted.subset(pick), options.batch_size)
        circuit = method.find(sample, quiet)
        curve = faithfulness_curve(task, circuit.scores, method.label, selection, metric, fractions)
        cpr.append(curve.cpr)
        cmd.append(curve.cmd)
        circuits.append(circuit.kept)
    return Stability(resamples, cpr, cmd, percentile_interval(cpr), percentile_interval(cmd),
                     mean_pairwise_iou(circuits))
