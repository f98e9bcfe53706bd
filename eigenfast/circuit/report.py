"""What an extraction produced: sizes, accuracy, KL, latency, and agreement with a known circuit."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Sequence

import torch
from torch import nn

from ..adapters import get_adapter
from ..data.task_data import TaskData
from ..runtime.forward import Evaluation, last_logits
from ..runtime.sizes import ParameterCount
from ..saving.results import heads_by_layer
from .synthetic import head_rates

LATENCY_BATCHES = (1, 32)
# The widest spread of the timed runs (interquartile range over median, the less steady model's)
# at which a latency is still reported: past it, other work on the machine, not the model, sets the number.
MAX_SPREAD = 0.2
MIN_RUNS = 3  # fewer runs have no spread to judge


@dataclass
class Latency:
    """Median seconds of one forward (last-token logits) at ``batch``, before and after extraction,
    and how much the timed runs varied."""

    batch: int
    before: float
    after: float
    runs: int
    spread: float  # interquartile range over median of the less steady model; inf with fewer than MIN_RUNS runs

    @classmethod
    def of(cls, batch: int, before: Sequence[float], after: Sequence[float]) -> "Latency":
        spread = max(_spread(before), _spread(after)) if len(before) >= MIN_RUNS else math.inf
        return cls(batch, statistics.median(before), statistics.median(after), len(before), spread)

    @property
    def reduction(self) -> float:
        return 1.0 - self.after / self.before

    @property
    def reliable(self) -> bool:
        return self.spread <= MAX_SPREAD

    def describe(self) -> str:
        head = f"latency b={self.batch:<3}"
        if self.runs < MIN_RUNS:
            return f"{head} not reported: {self.runs} timed run(s), at least {MIN_RUNS} are needed to judge the spread"
        if not self.reliable:
            return (f"{head} not reported: the timed runs varied by {self.spread:.0%} of their median (more than "
                    f"{MAX_SPREAD:.0%}), so the machine's other work would set the number; time again on a quiet machine")
        return (f"{head} {self.before * 1e3:.2f} ms -> {self.after * 1e3:.2f} ms ({-self.reduction:+.1%}, "
                f"median of {self.runs} runs taken in turns, spread {self.spread:.0%})")

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "before": self.before, "after": self.after, "runs": self.runs,
                "spread": None if math.isinf(self.spread) else self.spread, "reliable": self.reliable,
                "reduction": self.reduction}


def _spread(seconds: Sequence[float]) -> float:
    q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(seconds)


def latency_batch(data: TaskData, batch: int) -> TaskData:
    """The first ``batch`` examples, cycling through the data when it is smaller."""
    return data.subset([i % len(data) for i in range(batch)])


@torch.no_grad()
def time_forward(model: nn.Module, batch: TaskData, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one forward producing the last-token logits, as evaluation and the task use them.

    ``clock`` is wall time by default; ``time.process_time`` (CPU seconds of this process)
    compares models fairly on a CPU that other jobs share.
    """
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    last_logits(adapter, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def timed_runs(models: Sequence[nn.Module], batch: TaskData, repeats: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of ``repeats`` forwards of each model after ``warmup`` untimed ones; the models take turns,
    so a change in the machine's load reaches all of them alike."""
    for _ in range(warmup):
        for model in models:
            time_forward(model, batch)
    runs: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, seconds in zip(models, runs):
            seconds.append(time_forward(model, batch))
    return runs


@dataclass
class HeadRates:
    """Kept heads against a known circuit: TPR = found / known, FPR = kept outside it / heads outside it."""

    tpr: float
    fpr: float
    known: int

    @classmethod
    def of(cls, kept: Iterable[tuple[int, int]], truth: Collection[tuple[int, int]], n_layers: int, n_heads: int) -> "HeadRates":
        tpr, fpr = head_rates(list(kept), list(truth), n_layers, n_heads)
        return cls(tpr, fpr, len(truth))

    def as_dict(self) -> dict[str, float]:
        return {"tpr": self.tpr, "fpr": self.fpr, "known": self.known}


@dataclass
class CircuitReport:
    """The extracted circuit and how the model changed; :meth:`table` renders it as text."""

    threshold: float
    ablation: str
    include_mlps: bool
    heads: list[tuple[int, int]]  # kept
    mlps: list[int]  # kept
    n_heads_total: int
    n_layers: int
    params_before: ParameterCount
    params_after: ParameterCount
    before: Evaluation
    after: Evaluation
    kl: float
    latency: list[Latency]
    ground_truth: HeadRates | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        kept_non_embedding = self.params_after.non_embedding / self.params_before.non_embedding
        lines = [
            f"circuit extraction: threshold={self.threshold:g}, {self.ablation} ablation, "
            f"MLPs {'pruned too' if self.include_mlps else 'kept'}",
            f"  heads kept   {len(self.heads)}/{self.n_heads_total}: {heads_by_layer(self.heads)}",
            f"  MLPs kept    {len(self.mlps)}/{self.n_layers}: {self.mlps}",
            f"  size before  {self.params_before.describe()}",
            f"  size after   {self.params_after.describe()}; {1 - kept_non_embedding:.1%} of non-embedding removed",
            f"  accuracy     {self.before.accuracy:.2%} -> {self.after.accuracy:.2%} (on D_v, n={self.after.n})",
            f"  KL(f||g)     {self.kl:.4g}",
        ]
        lines += [f"  {lat.describe()}" for lat in self.latency]
        if self.ground_truth is not None:
            gt = self.ground_truth
            lines.append(f"  known circuit TPR {gt.tpr:.2f}, FPR {gt.fpr:.2f} ({gt.known} known heads)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "ablation": self.ablation,
            "include_mlps": self.include_mlps,
            "heads": [list(h) for h in self.heads],
            "mlps": self.mlps,
            "params_before": self.params_before.as_dict(),
            "params_after": self.params_after.as_dict(),
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "kl": self.kl,
            "latency": [lat.as_dict() for lat in self.latency],
            "ground_truth": None if self.ground_truth is None else self.ground_truth.as_dict(),
            "timings": self.timings,
        }


