"""The MIB-style evaluation of one method: its circuit, its faithfulness curve, CPR/CMD and, on request, a bootstrap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import nn

from ..data.task_data import TaskData, model_data
from ..runtime.forward import eval_mode, frozen_parameters
from .evaluate import EdgeCircuit, PreparedTask, prepare
from .faithfulness import FRACTIONS, FaithfulnessCurve, check_curve_settings, faithfulness_curve
from .options import EdgeOptions
from .registry import METHODS, method_named
from .runner import EdgeMethod
from .stability import Stability, bootstrap, check_resamples


@dataclass
class FaithfulnessReport:
    """A method's circuit, the faithfulness curve of the circuits its scores give, and the bootstrap's spread."""

    circuit: EdgeCircuit
    curve: FaithfulnessCurve
    stability: Stability | None = None

    HEADER = f"{'method':<34}{'CPR ↑':>8}{'CMD ↓':>8}{'CPR 95% CI':>18}{'CMD 95% CI':>18}{'IoU':>6}"

    @property
    def cpr(self) -> float:
        return self.curve.cpr

    @property
    def cmd(self) -> float:
        return self.curve.cmd

    def row(self) -> str:
        s = self.stability
        interval = lambda pair: "-" if s is None else f"[{pair[0]:.2f}, {pair[1]:.2f}]"  # noqa: E731
        return (f"{self.curve.method:<34}{self.cpr:>8.3f}{self.cmd:>8.3f}"
                f"{interval(s and s.cpr_interval):>18}{interval(s and s.cmd_interval):>18}"
                f"{'-' if s is None else f'{s.iou:.2f}':>6}")

    def as_dict(self) -> dict[str, Any]:
        return {"curve": self.curve.as_dict(), "stability": None if self.stability is None else self.stability.as_dict()}


def faithfulness_report(
    task: PreparedTask,
    method: EdgeMethod,
    options: EdgeOptions,
    circuit: EdgeCircuit | None = None,
    label: str | None = None,
    selection: str = "top_n",
    metric: str = "logit_diff",
    resamples: int = 0,
    seed: int = 0,
    fractions: Sequence[float] = FRACTIONS,
) -> FaithfulnessReport:
    """``method``'s circuit on ``task`` (found here unless given), its curve, and with ``resamples`` its bootstrap."""
    if circuit is None:
        circuit = method.find(task, options)
    curve = faithfulness_curve(task, circuit.scores, label or method.label, selection, metric, fractions,
                               progress=options.progress)
    stability = None
    if resamples:
        stability = bootstrap(task, method, options, resamples, seed, selection, metric, fractions)
    return FaithfulnessReport(circuit, curve, stability)


def evaluate_faithfulness(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    method: str,
    options: EdgeOptions | None = None,
    selection: str = "top_n",
    metric: str = "logit_diff",
    resamples: int = 0,
    seed: int = 0,
    fractions: Sequence[float] = FRACTIONS,
    methods: Mapping[str, EdgeMethod] = METHODS,
) -> FaithfulnessReport:
    """MIB's circuit-localization evaluation of ``method`` (a name in ``methods``) on a task.

    The method runs once on every example; circuits of each size in ``fractions`` are built
    from its edge scores by ``selection`` ("top_n" or "greedy") and judged by the masked forward
    (everything outside the circuit patched with the corrupted run) with ``metric``
    ("logit_diff": the clean answer's logit minus the corrupted example's answer's; or "prob").
    With ``resamples`` >= 2 the method also runs on that many bootstrap samples of the examples,
    adding 95% intervals of CPR and CMD and the resampled circuits' mean edge IoU.
    """
    options = options or EdgeOptions()
    found = method_named(method, methods)
    check_curve_settings(fractions, selection, metric)
    check_resamples(resamples)
    clean, corrupted = model_data(clean, model), model_data(corrupted, model)
    with eval_mode(model), frozen_parameters(model):
        task = prepare(model, clean, corrupted, options.batch_size)
        return faithfulness_report(task, found, options, selection=selection, metric=metric, resamples=resamples,
                                   seed=seed, fractions=fractions)
