"""The paper-style eigenpruning table (its Table 2, in kind), under a protocol fixed in advance.

For every (model, task) the examples the model never trained on are split, per
seed, into three disjoint thirds: *score* (the attribution data), *val* (chooses p)
and *test* (reported only). Every scoring setting (component set, pairing,
aggregation) is scored once per seed, each candidate p is frozen and evaluated
with :func:`eigenfast.evaluate` through :func:`eigenfast.prune`, and the table
gives test accuracy mean ± standard deviation over the seeds, plus the test
accuracy at the p that validation chose. Test numbers never choose anything.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ..data.task_data import TaskData
from ..runtime import figures
from .prune import DEFAULT_CANDIDATES, prune

REDUCES = ("max", "mean")
MIN_GAIN = 0.01  # one point of accuracy


@dataclass(frozen=True)
class Setting:
    """One way of scoring: which matrices, which partners x', and how ΔL over pairs is reduced."""

    components: tuple[str, ...]
    pairs: str = "all"
    reduce: str = "max"

    @property
    def label(self) -> str:
        return f"{'+'.join(self.components)} {self.pairs}/{self.reduce}"


def default_settings(model_components: Sequence[str]) -> list[Setting]:
    """k (the paper's best) under every pairing, then every other component with exact pairs; each aggregation.

    Both aggregations for every component: the mean over pairs is the first-order estimate of what
    freezing a term (replacing it by its mean) does to the loss, the max is the paper's score.
    """
    settings = [Setting(("k",), pairs, reduce) for pairs in ("shift", "all") for reduce in REDUCES
                if "k" in model_components]
    settings += [Setting((c,), "all", reduce) for c in model_components if c != "k" for reduce in REDUCES]
    return settings


def protocol_splits(data: TaskData, seed: int) -> tuple[TaskData, TaskData, TaskData]:
    """(score, val, test): a seeded split of held-out data into thirds."""
    score, rest = data.split(1 / 3, seed=seed)
    val, test = rest.split(0.5, seed=seed)
    return score, val, test


@dataclass
class Cell:
    """One (model, task, setting, seed): accuracies on val and test at the base and at every p."""

    seed: int
    base_val: float
    base_test: float
    val: dict[float, float]
    test: dict[float, float]
    chosen_p: float


def run_cell(
    model: nn.Module, data: TaskData, setting: Setting, seed: int,
    candidates: Sequence[float] = DEFAULT_CANDIDATES, batch_size: int = 256,
) -> Cell:
    score, val, test = protocol_splits(data, seed)
    result = prune(
        model, score, p="auto", components=setting.components, pairs=setting.pairs, reduce=setting.reduce,
        candidates=candidates, val_data=val, test_data=test, batch_size=batch_size, seed=seed, progress=False,
    )
    report = result.report
    return Cell(
        seed,
        report.baseline.accuracy,
        report.baseline_test.accuracy,
        {c.p: c.evaluation.accuracy for c in report.candidates},
        {c.p: c.test.accuracy for c in report.candidates},
        report.p,
    )


@dataclass
class Row:
    model: str
    task: str
    setting: Setting
    n_heldout: int
    cells: list[Cell] = field(default_factory=list)

    def base(self) -> list[float]:
        return [c.base_test for c in self.cells]

    def at(self, p: float) -> list[float]:
        return [c.test[p] for c in self.cells]

    def chosen(self) -> list[float]:
        return [c.test[c.chosen_p] for c in self.cells]

    def gains(self) -> list[float]:
        """Per seed: test accuracy at the validation-chosen p minus the base model's."""
        return [c.test[c.chosen_p] - c.base_test for c in self.cells]

    def gain(self) -> float:
        return statistics.fmean(self.gains())

    def works(self) -> bool:
        """The protocol's bar (docs/EIGENPRUNING_TABLE.md): a mean gain of at least one point and above twice its sd."""
        gains = self.gains()
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        return self.gain() >= MIN_GAIN and self.gain() > 2 * spread

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Row":
        """The inverse of :meth:`as_dict`: a written table record can be rendered again without rerunning it."""
        setting = Setting(tuple(record["components"]), record["pairs"], record["reduce"])
        cells = [
            Cell(c["seed"], c["base_val"], c["base_test"], {float(p): v for p, v in c["val"].items()},
                 {float(p): v for p, v in c["test"].items()}, c["chosen_p"])
            for c in record["cells"]
        ]
        return cls(record["model"], record["task"], setting, record["n_heldout"], cells)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "task": self.task, "components": list(self.setting.components),
            "pairs": self.setting.pairs, "reduce": self.setting.reduce, "n_heldout": self.n_heldout,
            "cells": [
                {"seed": c.seed, "base_val": c.base_val, "base_test": c.base_test, "chosen_p": c.chosen_p,
                 "val": {str(p): v for p, v in c.val.items()}, "test": {str(p): v for p, v in c.test.items()}}
                for c in self.cells
            ],
        }


def run_table(
    models: Sequence[str],
    tasks: Sequence[str],
    load: Callable[[str], tuple[nn.Module, Any]],
    heldout: Callable[[str, str, Any], TaskData],
    seeds: Sequence[int] = (0, 1, 2),
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    settings: Callable[[Sequence[str]], list[Setting]] = default_settings,
    batch_size: int = 256,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every model × task × setting × seed; ``heldout(model, task, tokenizer)`` gives the never-trained-on data."""
    from ..adapters import get_adapter

    rows = []
    for name in models:
        model, tokenizer = load(name)
        for task in tasks:
            data = heldout(name, task, tokenizer)
            for setting in settings(get_adapter(model).components()):
                row = Row(name, task, setting, len(data))
                for seed in seeds:
                    row.cells.append(run_cell(model, data, setting, seed, candidates, batch_size))
                log(f"{name} {task} {setting.label}: base {_pm(row.base())} -> chosen {_pm(row.chosen())}")
                rows.append(row)
    return rows


def _pm(values: Sequence[float], sign: str = "") -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):{sign}.1f} ± {100 * spread:.1f}"


def markdown(rows: Sequence[Row], candidates: Sequence[float]) -> str:
    """The table: test accuracy (%) mean ± sd over seeds at the base, every p, and the p chosen on val."""
    ps = sorted(candidates)
    head = ["model", "task", "scoring", "base", *(f"p={p:g}" for p in ps), "p chosen on val", "gain", "works"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        chosen = ", ".join(f"{c.chosen_p:g}" for c in row.cells)
        lines.append("| " + " | ".join([
            row.model, row.task, row.setting.label, _pm(row.base()), *(_pm(row.at(p)) for p in ps),
            f"{_pm(row.chosen())} (p {chosen})", _pm(row.gains(), "+"), "yes" if row.works() else "no",
        ]) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], candidates: Sequence[float], path: str | Path) -> Path:
    """Test accuracy against p, one panel per (model, task), one line per scoring setting."""
    plt = figures.pyplot()

    ps = sorted(candidates)
    panels = list(dict.fromkeys((r.model, r.task) for r in rows))
    # Up to 14 lines a panel: one colour per component, the line style and marker tell aggregation and pairing.
    colours = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(r.setting.components for r in rows))}
    styles = {"max": "-", "mean": "--"}
    markers = {"all": "o", "shift": "s"}
    cols = min(3, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5 * cols, 3.6 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (model, task) in zip(axes.flat, panels):
        for row in (r for r in rows if (r.model, r.task) == (model, task)):
            xs = [0.0, *ps]
            means = [statistics.fmean(row.base()), *(statistics.fmean(row.at(p)) for p in ps)]
            ax.plot(xs, [100 * m for m in means], label=row.setting.label, color=colours[row.setting.components],
                    linestyle=styles[row.setting.reduce], marker=markers[row.setting.pairs], markersize=4)
        ax.set_title(f"{model} / {task}")
        ax.set_xlabel("p (fraction frozen)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return figures.save(fig, path, dpi=110)
