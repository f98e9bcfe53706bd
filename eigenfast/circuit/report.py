"""What an extraction produced: sizes, accuracy, KL, latency, and agreement with a known circuit."""
from __future__ import annotations

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
from .synthetic import head_rates

LATENCY_BATCHES = (1, 32)


@dataclass
class Latency:
    """Median seconds of one forward (last-token logits) at ``batch``, before and after extraction."""

    batch: int
    before: float
    after: float

    @property
    def reduction(self) -> float:
        return 1.0 - self.after / self.before

    def as_dict(self) -> dict[str, float]:
        return {"batch": self.batch, "before": self.before, "after": self.after, "reduction": self.reduction}


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


def median_latency(model: nn.Module, batch: TaskData, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        time_forward(model, batch)
    return statistics.median(time_forward(model, batch) for _ in range(repeats))


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
            f"  heads kept   {len(self.heads)}/{self.n_heads_total}: {_heads_by_layer(self.heads)}",
            f"  MLPs kept    {len(self.mlps)}/{self.n_layers}: {self.mlps}",
            f"  size before  {self.params_before.describe()}",
            f"  size after   {self.params_after.describe()}; {1 - kept_non_embedding:.1%} of non-embedding removed",
            f"  accuracy     {self.before.accuracy:.2%} -> {self.after.accuracy:.2%} (on D_v, n={self.after.n})",
            f"  KL(f||g)     {self.kl:.4g}",
        ]
        for lat in self.latency:
            lines.append(
                f"  latency b={lat.batch:<3} {lat.before * 1e3:.2f} ms -> {lat.after * 1e3:.2f} ms "
                f"({-lat.reduction:+.1%}, median)"
            )
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


def _heads_by_layer(heads: Sequence[tuple[int, int]]) -> str:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(layer, []).append(head)
    return " ".join(f"L{layer}:{','.join(map(str, hs))}" for layer, hs in sorted(layers.items())) or "none"
