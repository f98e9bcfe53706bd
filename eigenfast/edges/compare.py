"""Several methods at several settings side by side on one task: one preparation, one evaluation (KL and MIB faithfulness)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from ..data.task_data import TaskData
from ..runtime import distributed, figures
from ..runtime.forward import eval_mode, frozen_parameters
from .benchmark import FaithfulnessReport, faithfulness_report
from .evaluate import EdgeReport, judge, prepare
from .faithfulness import check_curve_settings, plot_curves
from .options import EdgeOptions
from .registry import METHODS, method_named
from .runner import EdgeMethod
from .stability import check_resamples


@dataclass
class Comparison:
    reports: list[tuple[str, EdgeReport]]  # (method, report); the report's own label names the setting
    labels: Mapping[str, str]  # method -> its name in the plot's legend
    faithfulness: list[FaithfulnessReport]  # one per report, in the same order

    def table(self) -> str:
        return "\n".join([EdgeReport.HEADER] + [r.row() for _, r in self.reports])

    def faithfulness_table(self) -> str:
        """CPR and CMD of each method's scores (and the bootstrap's intervals and IoU when it ran)."""
        return "\n".join([FaithfulnessReport.HEADER] + [f.row() for f in self.faithfulness])

    def as_dict(self) -> list[dict]:
        return [{"method": m, **r.as_dict(), "faithfulness": f.as_dict()}
                for (m, r), f in zip(self.reports, self.faithfulness)]

    def plot(self, path: str | Path) -> Path:
        """KL(f‖circuit) against edges kept, one line per method."""
        plt = figures.pyplot()

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(m for m, _ in self.reports):
            points = sorted((r.edges_kept, r.kl) for m, r in self.reports if m == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=self.labels[method])
        ax.set(xlabel="edges kept", ylabel="KL(full ‖ circuit)", title="KL against edges kept")
        ax.grid(alpha=0.3)
        ax.legend()
        return figures.save(fig, path, dpi=120)

    def save(self, directory: str | Path) -> tuple[Path, Path, Path]:
        """``edges.json``, ``edges.png`` (KL against edges) and ``faithfulness.png`` (the MIB curves) in ``directory``."""
        directory = Path(directory)

        def write() -> None:  # rank 0 only, under torchrun
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "edges.json").write_text(json.dumps(self.as_dict(), indent=2))
            self.plot(directory / "edges.png")
            plot_curves([f.curve for f in self.faithfulness], directory / "faithfulness.png")

        distributed.on_main(write)
        return directory / "edges.json", directory / "edges.png", directory / "faithfulness.png"


def compare(
    model: nn.Module,
    clean: TaskData,
    corrupted: TaskData,
    settings: Mapping[str, Sequence[float]],
    options: EdgeOptions | None = None,
    true_heads: Sequence[tuple[int, int]] | None = None,
    methods: Mapping[str, EdgeMethod] = METHODS,
    selection: str = "top_n",
    metric: str = "logit_diff",
    resamples: int = 0,
    seed: int = 0,
) -> Comparison:
    """Run each method of ``settings`` at each of its values and judge every circuit the same way.

    ``settings`` maps a method's name in ``methods`` to the values of its swept option
    (``EdgeMethod.setting``); ``options`` holds everything else. The clean and corrupted
    forwards run once for all of them. Each circuit's edge scores also give its MIB
    faithfulness curve (``selection``, ``metric``; docs/EDGES.md), with a bootstrap of
    ``resamples`` draws when that is >= 2.
    """
    options = options or EdgeOptions()
    check_curve_settings((0.5, 1.0), selection, metric)
    check_resamples(resamples)
    runs = []  # every setting is checked before any forward runs
    for name, values in settings.items():
        method = method_named(name, methods)
        runs += [(method, value, replace(options, **{method.setting: value})) for value in values]
    reports, faithfulness = [], []
    with eval_mode(model), frozen_parameters(model):
        task = prepare(model, clean, corrupted, options.batch_size)
        for method, value, chosen in runs:
            circuit = method.find(task, chosen)
            label = f"{method.label} {method.symbol}={value:g}"
            reports.append((method.name, judge(task, circuit, label, true_heads=true_heads)))
            faithfulness.append(faithfulness_report(task, method, chosen, circuit, label, selection, metric,
                                                    resamples, seed))
    return Comparison(reports, {m.name: m.label for m in methods.values()}, faithfulness)
