"""The paper-style eigenpruning table (its Table 2, in kind), under a protocol fixed in advance.

For every (model, task) the examples the model never trained on are split, per
seed, into three disjoint thirds: *score* (the attribution data), *val* (chooses p)
and *test* (reported only). Every scoring setting (component set, pairing,
aggregation) is scored once per seed, each candidate p is frozen and evaluated
with :func:`eigenfast.evaluate` through :func:`eigenfast.prune`, and the table
gives test accuracy mean ± standard deviation over the seeds, plus the test
accuracy at the p that held-out data chose: validation alone, or (``select="crossfit"``)
validation pooled with the other fold of a 2-fold cross-fit over the score and val
thirds. Test numbers never choose anything.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ..data.task_data import TaskData
from ..errors import ArgumentError
from ..runtime import figures
from ..runtime.forward import Evaluation, evaluate
from .finetune import REFERENCE_LR, finetune, finetune_low_rank, matching_rank
from .options import DEFAULT_SIGNIFICANCE, SELECTIONS
from .prune import DEFAULT_CANDIDATES, prune

REDUCES = ("max", "mean")
MIN_GAIN = 0.01  # one point of accuracy
# Training before (or instead of) pruning, on the scoring third: the same data pruning gets.
TRAININGS = ("", "ft", "ft-tuned", "low-rank")
TUNED_LRS = (1e-4, 1e-3, REFERENCE_LR)  # the tuned fine-tune's choices, chosen on held-out data
LOW_RANK_P = 0.05  # the low-rank fine-tune trains as many values as the terms p = 0.05 freezes


@dataclass(frozen=True)
class Setting:
    """One way of scoring: which matrices, which partners x', and how ΔL over pairs is reduced."""

    components: tuple[str, ...]
    pairs: str = "all"
    reduce: str = "max"
    estimate: str = "linear"
    train: str = ""  # one of TRAININGS: what runs before pruning ("" nothing)
    prune: bool = True  # False: the training alone

    @property
    def label(self) -> str:
        rule = f"{'+'.join(self.components)} {self.pairs}/{self.reduce}"
        rule += "" if self.estimate == "linear" else f"/{self.estimate}"
        if not self.train:
            return rule
        train = {"ft": f"fine-tune lr {REFERENCE_LR:g}", "ft-tuned": "fine-tune, lr tuned",
                 "low-rank": f"low-rank fine-tune of {'+'.join(self.components)}"}[self.train]
        return f"{train} then {rule}" if self.prune else train


def default_settings(
    model_components: Sequence[str], estimates: Sequence[str] = ("linear", "ig", "verified"), baselines: bool = True,
) -> list[Setting]:
    """Per component: the paper's rule (max over pairs) and the mean over pairs under each estimate;
    then the training baselines at equal data: fine-tune alone (the reference pipeline's lr and a
    tuned one), fine-tune then prune (the reference pipeline: k, shift pairs, max), and a low-rank
    fine-tune of the first component with as many trainable values as the terms p = 0.05 freezes.
    """
    settings = []
    for c in model_components:
        settings += [Setting((c,), "all", "max")]
        settings += [Setting((c,), "all", "mean", estimate) for estimate in estimates]
    if not baselines:
        return settings
    first = (model_components[0],)
    reference = Setting(("k",), "shift", "max") if "k" in model_components else Setting(first, "all", "max")
    settings += [
        Setting(first, train="ft", prune=False), Setting(first, train="ft-tuned", prune=False),
        Setting(reference.components, reference.pairs, reference.reduce, train="ft"),
        Setting(first, train="low-rank", prune=False),
    ]
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
    seconds: float = field(default=0.0, compare=False)  # wall time of the cell (work shared with later cells included)
    sign: dict[float, float] = field(default_factory=dict)  # per pruned p: the sign test's p-value against p = 0 on val
    # select="crossfit": per p, the other fold's accuracy on the scoring third, and the p val alone would have kept.
    cross: dict[float, float] = field(default_factory=dict)
    val_p: float | None = None


class SeedWork:
    """What every setting of one (model, task, seed) shares, each computed on first use and then reused:
    the seed's three splits, the base model's val and test accuracy, and each fine-tuned model with its val
    accuracy (the reference lr's run serves fine-tune alone, the tuned lr's choice and fine-tune then prune), and
    for a cross-fit choice of lr, the accuracy on the scoring third of each lr's fine-tune on the val third.
    Every value is the one a setting computing it alone would get: the work is deterministic in the seed."""

    def __init__(self, model: nn.Module, data: TaskData, seed: int, batch_size: int = 256) -> None:
        self.model, self.seed, self.batch_size = model, seed, batch_size
        self.score, self.val, self.test = protocol_splits(data, seed)
        self._base: tuple[Evaluation, Evaluation] | None = None
        self._tuned: dict[float, tuple[nn.Module, float]] = {}
        self._crossed: dict[float, float] = {}

    def evaluations(self, model: nn.Module) -> tuple[Evaluation, Evaluation]:
        return evaluate(model, self.val, self.batch_size), evaluate(model, self.test, self.batch_size)

    def base(self) -> tuple[Evaluation, Evaluation]:
        """The given model's val and test evaluations (prune reuses them for its p = 0 instead of evaluating again)."""
        if self._base is None:
            self._base = self.evaluations(self.model)
        return self._base

    def finetuned(self, lr: float) -> tuple[nn.Module, float]:
        """Every parameter fine-tuned at ``lr`` on the scoring third, and that model's val accuracy."""
        if lr not in self._tuned:
            tuned = finetune(self.model, self.score, lr=lr, seed=self.seed).model
            self._tuned[lr] = (tuned, evaluate(tuned, self.val, self.batch_size).accuracy)
        return self._tuned[lr]

    def crossed(self, lr: float) -> float:
        """The cross-fit's other fold for the fine-tune's lr: every parameter fine-tuned at ``lr`` on the val
        third, its accuracy on the scoring third."""
        if lr not in self._crossed:
            tuned = finetune(self.model, self.val, lr=lr, seed=self.seed).model
            self._crossed[lr] = evaluate(tuned, self.score, self.batch_size).accuracy
        return self._crossed[lr]


def run_cell(
    model: nn.Module, data: TaskData, setting: Setting, seed: int,
    candidates: Sequence[float] = DEFAULT_CANDIDATES, batch_size: int = 256, work: SeedWork | None = None,
    significance: float | None = DEFAULT_SIGNIFICANCE, select: str = "val",
) -> Cell:
    """One seed of one setting; base numbers are always the given model's, before any training. ``work`` (of this
    model, data, seed and batch size) carries what earlier settings of the seed computed; None starts afresh.
    ``significance`` is prune's gate on choosing a pruned p over the unpruned (or trained) model; ``select`` what
    ranks the candidates (and the tuned fine-tune's lrs): validation, or both folds of a cross-fit. A model
    trained on the scoring third is pruned with p chosen on validation alone: the cross-fit's other fold would
    judge it on its own training data."""
    if select not in SELECTIONS:
        raise ArgumentError(f"select must be one of {SELECTIONS} (what ranks the candidates), got {select!r}")
    started = time.perf_counter()
    work = SeedWork(model, data, seed, batch_size) if work is None else work
    base = work.base()
    if setting.train:
        model = _trained(work, setting, select)
    if not setting.prune:  # the training alone: one "p", 0
        tuned_val, tuned_test = work.evaluations(model)
        return Cell(seed, base[0].accuracy, base[1].accuracy, {0.0: tuned_val.accuracy}, {0.0: tuned_test.accuracy},
                    0.0, time.perf_counter() - started)
    result = prune(
        model, work.score, p="auto", components=setting.components, pairs=setting.pairs, reduce=setting.reduce,
        estimate=setting.estimate, candidates=candidates, val_data=work.val, test_data=work.test,
        batch_size=batch_size, seed=seed, progress=False, significance=significance,
        baseline=None if setting.train else base,  # a trained model is not the one work.base() evaluated
        select="val" if setting.train else select,
    )
    report = result.report
    return Cell(
        seed,
        base[0].accuracy,
        base[1].accuracy,
        {c.p: c.evaluation.accuracy for c in report.candidates},
        {c.p: c.test.accuracy for c in report.candidates},
        report.p,
        time.perf_counter() - started,
        {c.p: c.sign.p_value for c in report.candidates if c.sign is not None},
        {c.p: c.cross.accuracy for c in report.candidates if c.cross is not None},
        report.kept_by("val") if report.select == "crossfit" else None,
    )


def _trained(work: SeedWork, setting: Setting, select: str) -> nn.Module:
    """The setting's training on the scoring third (fine-tunes use batches of 32, Adam, one pass)."""
    if setting.train == "ft":
        return work.finetuned(REFERENCE_LR)[0]
    if setting.train == "low-rank":
        rank = matching_rank(work.model, setting.components, LOW_RANK_P)
        return finetune_low_rank(work.model, work.score, setting.components, rank, seed=work.seed).model
    n_val, n_score = len(work.val), len(work.score)

    def held_out(lr: float) -> float:  # val accuracy, or pooled over both cross-fit folds
        accuracy = work.finetuned(lr)[1]
        if select == "val":
            return accuracy
        return (accuracy * n_val + work.crossed(lr) * n_score) / (n_val + n_score)

    return work.finetuned(max(TUNED_LRS, key=held_out))[0]  # the best held-out accuracy; ties: the smallest lr


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
        setting = Setting(tuple(record["components"]), record["pairs"], record["reduce"],
                          record.get("estimate", "linear"), record.get("train", ""), record.get("prune", True))
        cells = [
            Cell(c["seed"], c["base_val"], c["base_test"], {float(p): v for p, v in c["val"].items()},
                 {float(p): v for p, v in c["test"].items()}, c["chosen_p"], c.get("seconds", 0.0),
                 {float(p): v for p, v in c.get("sign", {}).items()},
                 {float(p): v for p, v in c.get("cross", {}).items()}, c.get("val_p"))
            for c in record["cells"]
        ]
        return cls(record["model"], record["task"], setting, record["n_heldout"], cells)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "task": self.task, "components": list(self.setting.components),
            "pairs": self.setting.pairs, "reduce": self.setting.reduce, "estimate": self.setting.estimate,
            "train": self.setting.train, "prune": self.setting.prune, "n_heldout": self.n_heldout,
            "cells": [
                {"seed": c.seed, "base_val": c.base_val, "base_test": c.base_test, "chosen_p": c.chosen_p,
                 "val": {str(p): v for p, v in c.val.items()}, "test": {str(p): v for p, v in c.test.items()},
                 "seconds": c.seconds, "sign": {str(p): v for p, v in c.sign.items()},
                 "cross": {str(p): v for p, v in c.cross.items()}, "val_p": c.val_p}
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
    significance: float | None = DEFAULT_SIGNIFICANCE,
    select: str = "val",
) -> list[Row]:
    """Every model × task × setting × seed; ``heldout(model, task, tokenizer)`` gives the never-trained-on data."""
    from ..adapters import get_adapter

    rows = []
    for name in models:
        model, tokenizer = load(name)
        for task in tasks:
            data = heldout(name, task, tokenizer)
            works = {seed: SeedWork(model, data, seed, batch_size) for seed in seeds}
            for setting in settings(get_adapter(model).components()):
                row = Row(name, task, setting, len(data))
                for seed in seeds:
                    row.cells.append(run_cell(model, data, setting, seed, candidates, batch_size, works[seed],
                                              significance, select))
                log(f"{name} {task} {setting.label}: base {_pm(row.base())} -> chosen {_pm(row.chosen())} "
                    f"({sum(c.seconds for c in row.cells):.0f} s)")
                rows.append(row)
    return rows


def _pm(values: Sequence[float], sign: str = "") -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):{sign}.1f} ± {100 * spread:.1f}"


def markdown(rows: Sequence[Row], candidates: Sequence[float]) -> str:
    """The table: test accuracy (%) mean ± sd over seeds at the base, every p, and the p chosen on held-out data."""
    ps = sorted(p for p in candidates if p > 0)  # p = 0 is the base column
    head = ["model", "task", "scoring", "base", *(f"p={p:g}" for p in ps), "p chosen", "gain", "works"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        chosen = ", ".join(f"{c.chosen_p:g}" for c in row.cells)
        lines.append("| " + " | ".join([
            row.model, row.task, row.setting.label, _pm(row.base()),
            *(_pm(row.at(p)) if row.setting.prune else "-" for p in ps),
            f"{_pm(row.chosen())} (p {chosen})", _pm(row.gains(), "+"), "yes" if row.works() else "no",
        ]) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], candidates: Sequence[float], path: str | Path) -> Path:
    """Test accuracy against p, one panel per (model, task), one line per scoring setting."""
    plt = figures.pyplot()

    ps = sorted(candidates)
    panels = list(dict.fromkeys((r.model, r.task) for r in rows))
    # Up to 14 lines a panel: one colour per component, the line style and marker tell aggregation and pairing.
    kinds = dict.fromkeys((r.setting.components, r.setting.estimate, r.setting.train) for r in rows)
    colours = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    styles = {"max": "-", "mean": "--"}
    markers = {"all": "o", "shift": "s"}
    cols = min(3, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5 * cols, 3.6 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (model, task) in zip(axes.flat, panels):
        for row in (r for r in rows if (r.model, r.task) == (model, task) and r.setting.prune):
            xs = [0.0, *ps]
            means = [statistics.fmean(row.base()), *(statistics.fmean(row.at(p)) for p in ps)]
            kind = (row.setting.components, row.setting.estimate, row.setting.train)
            ax.plot(xs, [100 * m for m in means], label=row.setting.label, color=colours[kind],
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
