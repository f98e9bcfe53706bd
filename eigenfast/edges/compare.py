"""Edge Pruning, EAP, ACDC and Algorithm 1 side by side on one task, through the one evaluation."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..circuit.discovery import discover
from ..data.task_data import TaskData
from ..errors import ArgumentError
from ..runtime import distributed, figures
from .acdc import acdc
from .eap import eap
from .edge_prune import edge_prune
from .evaluate import EdgeReport, evaluate_circuit

METHODS = ("edge_prune", "eap", "acdc", "algorithm1")
LABELS = {"edge_prune": "edge pruning", "eap": "EAP", "acdc": "ACDC", "algorithm1": "Algorithm 1"}


@dataclass
class Comparison:
    reports: list[tuple[str, EdgeReport]]  # (method, report); the report's own label names the setting

    def table(self) -> str:
        return "\n".join([EdgeReport.HEADER] + [r.row() for _, r in self.reports])

    def as_dict(self) -> list[dict]:
        return [{"method": m, **r.as_dict()} for m, r in self.reports]

    def plot(self, path: str | Path) -> Path:
        """KL(f‖circuit) against edges kept, one line per method."""
        plt = figures.pyplot()

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(m for m, _ in self.reports):
            points = sorted((r.edges_kept, r.kl) for m, r in self.reports if m == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=LABELS[method])
        ax.set(xlabel="edges kept", ylabel="KL(full ‖ circuit)", title="KL against edges kept")
        ax.grid(alpha=0.3)
        ax.legend()
        return figures.save(fig, path, dpi=120)

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """``edges.json`` and ``edges.png`` in ``directory``."""
        directory = Path(directory)

        def write() -> None:  # rank 0 only, under torchrun
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "edges.json").write_text(json.dumps(self.as_dict(), indent=2))
            self.plot(directory / "edges.png")

        distributed.on_main(write)
        return directory / "edges.json", directory / "edges.png"


def compare(
    model: nn.Module,
    clean: TaskData,
    corrupted: TaskData,
    methods: Sequence[str] = METHODS,
    sparsities: Sequence[float] = (0.95,),
    acdc_thresholds: Sequence[float] = (0.01,),
    alg1_thresholds: Sequence[float] = (0.01,),
    steps: int = 300,
    batch_size: int = 32,
    true_heads: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
    **edge_prune_options: Any,
) -> Comparison:
    """Run each method at each of its settings and judge every circuit the same way.

    ``edge_prune_options`` go to :func:`edge_prune` (learning rates, ramp, ...).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ArgumentError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    runs = []
    for method in methods:
        if method == "edge_prune":
            runs += [(method, f"edge pruning s={s:g}", edge_prune(model, clean, corrupted, s, steps, batch_size,
                                                                  progress=progress, evaluate=False,
                                                                  **edge_prune_options), None)
                     for s in sparsities]
        elif method == "eap":
            runs += [(method, f"EAP s={s:g}", eap(model, clean, corrupted, s, batch_size, progress, evaluate=False), None)
                     for s in sparsities]
        elif method == "acdc":
            runs += [(method, f"ACDC τ={t:g}", acdc(model, clean, corrupted, t, batch_size, progress, evaluate=False), None)
                     for t in acdc_thresholds]
        else:
            for t in alg1_thresholds:
                # Algorithm 1 takes its means from the corrupted inputs: the same counterfactual as the others.
                found = discover(model, corrupted, clean, t, ablation="mean", include_mlps=True,
                                 batch_size=batch_size, progress=progress)
                runs.append((method, f"Algorithm 1 α={t:g}", found, found.timings["total"]))
    reports = [
        (method, evaluate_circuit(model, circuit, clean, corrupted, label, seconds, true_heads, batch_size))
        for method, label, circuit, seconds in runs
    ]
    return Comparison(reports)
