"""Size and accuracy of the extracted circuit against the threshold α (the paper's figures 2 and 3)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..data.task_data import TaskData
from ..errors import ArgumentError
from ..runtime import distributed, figures
from .extract import extract_circuit


@dataclass
class SweepPoint:
    threshold: float
    heads: int  # kept
    mlps: int  # kept
    size: float  # non-embedding parameters kept, as a fraction of the original's
    accuracy: float
    kl: float


@dataclass
class Sweep:
    points: list[SweepPoint]
    accuracy_before: float
    ablation: str
    include_mlps: bool

    def table(self) -> str:
        lines = [
            f"threshold sweep: {self.ablation} ablation, MLPs {'pruned too' if self.include_mlps else 'kept'}; "
            f"unpruned accuracy {self.accuracy_before:.2%}",
            f"{'alpha':>10} {'heads':>6} {'MLPs':>5} {'size':>7} {'accuracy':>9} {'KL':>9}",
        ]
        for p in self.points:
            lines.append(
                f"{p.threshold:>10.3g} {p.heads:>6} {p.mlps:>5} {p.size:>7.1%} {p.accuracy:>9.2%} {p.kl:>9.4g}"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ablation": self.ablation,
            "include_mlps": self.include_mlps,
            "accuracy_before": self.accuracy_before,
            "points": [asdict(p) for p in self.points],
        }

    def plot(self, path: str | Path) -> Path:
        """Two panels: size against α (figure 2) and accuracy against size (figure 3); rank 0 writes it."""
        distributed.on_main(lambda: self._draw(Path(path)))
        return Path(path)

    def _draw(self, path: Path) -> Path:
        plt = figures.pyplot()

        label = f"{self.ablation} ablation, {'with' if self.include_mlps else 'without'} MLPs"
        alphas = [p.threshold for p in self.points]
        sizes = [100 * p.size for p in self.points]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(alphas, sizes, marker="o", label=label)
        if all(a > 0 for a in alphas):
            left.set_xscale("log")
        left.set(xlabel="threshold α", ylabel="non-embedding parameters kept (%)", title="size against α")
        right.plot(sizes, [100 * p.accuracy for p in self.points], marker="o", label=label)
        right.axhline(100 * self.accuracy_before, color="gray", linestyle=":", label="unpruned")
        right.set(xlabel="non-embedding parameters kept (%)", ylabel="accuracy (%)", title="accuracy against size")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend()
        return figures.save(fig, path, dpi=120)

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """``sweep.json`` and ``sweep.png`` in ``directory``, written by rank 0 (every rank gets the paths)."""
        directory = Path(directory)
        table, figure = directory / "sweep.json", directory / "sweep.png"

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            table.write_text(json.dumps(self.as_dict(), indent=2))
            self._draw(figure)

        distributed.on_main(write)
        return table, figure


def sweep(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    thresholds: Sequence[float],
    ablation: str = "mean",
    include_mlps: bool = False,
    extrapolate: str = "mean",
    batch_size: int = 64,
    progress: bool = True,
    positions: str = "indexed",
) -> Sweep:
    """Extract one circuit per threshold (the model is never modified) and record its size and accuracy."""
    if not thresholds:
        raise ArgumentError("give at least one threshold to sweep")
    points, accuracy_before = [], 0.0
    for threshold in sorted(thresholds):
        result = extract_circuit(
            model, patch_data, val_data, threshold, ablation=ablation, include_mlps=include_mlps,
            extrapolate=extrapolate, batch_size=batch_size, progress=progress, latency_repeats=0, positions=positions,
        )
        report = result.report
        accuracy_before = report.before.accuracy
        size = report.params_after.non_embedding / report.params_before.non_embedding
        points.append(SweepPoint(threshold, len(result.heads), len(result.mlps), size, report.after.accuracy, report.kl))
    return Sweep(points, accuracy_before, ablation, include_mlps)
