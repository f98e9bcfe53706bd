"""``eigenfast.prune``: score, choose p (or sweep it), freeze, report."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..adapters import get_adapter
from ..data.task_data import TaskData, model_data
from ..errors import ArgumentError
from ..rewrite.plain_bias import check_bias_possible
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.forward import Evaluation, evaluate
from ..runtime.sizes import ParameterCount, count_parameters
from ..saving.results import ModelResult
from .freezing import check_foldable_in_place, freeze, select_frozen
from .options import DEFAULT_CANDIDATES, DEFAULT_SIGNIFICANCE, PruneOptions
from .scoring import Attribution, Key, attribute, path_candidates, select_sites
from .significance import SignTest, per_candidate_level, sign_test
from .verification import recheck_dropped, verify_lowest

NOTHING_BEAT_BASE = "no p beat the unpruned model; p=0 chosen"


@dataclass
class Candidate:
    """One value of p tried: how much it froze and how the pruned model did on held-out data."""

    p: float
    frozen: dict[str, int]
    evaluation: Evaluation | None = None
    test: Evaluation | None = None
    sign: SignTest | None = None  # against the unpruned model on the validation examples (p > 0 under "auto")
    # select="crossfit": the model this p gives when scored on the validation data, evaluated on the scoring data.
    cross: Evaluation | None = None


@dataclass
class PruneReport:
    p: float
    components: tuple[str, ...]
    pairs: str
    calib_len: int
    baseline: Evaluation | None
    candidates: list[Candidate]
    baseline_test: Evaluation | None = None
    timings: dict[str, float] = field(default_factory=dict)
    estimate: str = "linear"
    size_before: ParameterCount | None = None
    size_after: ParameterCount | None = None  # the kept model: its bias tables are buffers the forward reads
    positions: str = "indexed"  # what the frozen terms became: per-position tables or ordinary biases
    significance: float | None = None  # the sign-test gate's family-wise level under p="auto" (None: no gate)
    select: str = "val"  # what p="auto" ranked candidates by: "val", or "crossfit" (both folds pooled)

    @property
    def note(self) -> str | None:
        """Said when validation chose the unpruned model among several p: why, naming a candidate the gate refused."""
        if self.p != 0 or len(self.candidates) <= 1:
            return None
        refused = self.refused()
        if refused is None or refused.sign is None or self.significance is None or self.baseline is None:
            return NOTHING_BEAT_BASE
        assert refused.evaluation is not None
        tested = len(self.candidates) - 1
        judged = "on val" if self.select == "val" else "on both cross-fit folds"
        return (
            f"no p beat the unpruned model beyond chance (sign test at level {self.significance:g} over {tested} "
            f"candidates, {per_candidate_level(self.significance, tested):.3g} each); the best {judged}, "
            f"p={refused.p:g}, gained {100 * (refused.evaluation.accuracy - self.baseline.accuracy):+.1f} points "
            f"on val ({refused.sign.describe()}); p=0 chosen"
        )

    def refused(self) -> Candidate | None:
        """The pruned candidate held-out data ranks first, if it beat the unpruned model's held-out accuracy (val,
        or both folds pooled under select="crossfit") but was not kept."""
        pruned = [c for c in self.candidates if c.p > 0 and c.evaluation is not None]
        unpruned = next((c for c in self.candidates if c.p == 0), None)
        if not pruned or unpruned is None or unpruned.evaluation is None or self.p != 0:
            return None
        pooled = self.select == "crossfit"
        best = _choose(pruned, None, pooled)
        return best if _held_out(best, pooled)[0] > _held_out(unpruned, pooled)[0] else None

    def kept_by(self, select: str) -> float:
        """The p that p="auto" keeps, under the same gate, when it ranks the candidates by ``select`` ("val", or
        "crossfit" where they carry the other fold's evaluation): ``kept_by(self.select) == self.p``. The table
        records both choices of one run, so that the two selections compare on the same pruned models."""
        level = None if self.significance is None else per_candidate_level(self.significance, len(self.candidates) - 1)
        return _choose(self.candidates, level, select == "crossfit").p

    def table(self) -> str:
        """One row per p: what it froze, held-out accuracy/loss (chooses p), the sign test against the unpruned
        model on the held-out examples, and test accuracy/loss (reported only); under select="crossfit" also the
        other fold's accuracy/loss on the scoring data (the choice pools it with val's)."""
        crossfit = self.select == "crossfit"
        cross_head = f" {'fold acc':>8} {'fold loss':>9}" if crossfit else ""
        lines = [f"{'p':>6}  {'frozen':<28} {'val acc':>8} {'val loss':>9}{cross_head} {'sign p':>7} {'test acc':>9} "
                 f"{'test loss':>10}"]
        base_cross = " " + _cells(self.candidates[0].cross) if crossfit and self.candidates[0].p == 0 else ""
        lines.append(f"{'base':>6}  {'-':<28} {_cells(self.baseline)}{base_cross} {'-':>7} "
                     f"{_cells(self.baseline_test, 1)}")
        for cand in self.candidates:
            frozen = ", ".join(f"{c}:{n}" for c, n in cand.frozen.items())
            mark = "  <- kept" if cand.p == self.p and len(self.candidates) > 1 else ""
            sign = "-" if cand.sign is None else f"{cand.sign.p_value:.2g}"
            cross = " " + _cells(cand.cross) if crossfit else ""
            lines.append(f"{cand.p:>6.2f}  {frozen:<28} {_cells(cand.evaluation)}{cross} {sign:>7} "
                         f"{_cells(cand.test, 1)}{mark}")
        if self.size_before is not None and self.size_after is not None:
            lines.append(f"size before  {self.size_before.describe()}")
            lines.append(f"size after   {self.size_after.describe()}")
            lines.append(f"             {self.size_change()}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def size_change(self) -> str:
        """Why the size moved: eigenpruning folds frozen terms into biases, it removes no weights."""
        before, after = self.size_before, self.size_after
        assert before is not None and after is not None
        why = "eigenpruning keeps every matrix whole (frozen terms fold into biases)"
        if after.total == before.total:
            return f"the same size: {why}"
        if self.positions == "mean":
            return (f"{after.total - before.total:+,} parameters: {why}; projections built without a bias got one "
                    "(zeros where nothing was frozen), as their HF class does once its config's bias flag is on")
        return (
            f"{after.total - before.total:+,} elements: {why}; each pruned projection's bias became a position table "
            f"of {self.calib_len + 1} rows ({self.calib_len} scored positions + 1 for later ones): "
            f"{after.parameters - before.parameters:+,} parameters, {after.buffers - before.buffers:+,} buffer elements"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "components": list(self.components),
            "pairs": self.pairs,
            "estimate": self.estimate,
            "note": self.note,
            "calib_len": self.calib_len,
            "baseline": _as_dict(self.baseline),
            "baseline_test": _as_dict(self.baseline_test),
            "significance": self.significance,
            "select": self.select,
            "candidates": [
                {"p": c.p, "frozen": c.frozen, "evaluation": _as_dict(c.evaluation), "test": _as_dict(c.test),
                 "sign": None if c.sign is None else c.sign.as_dict(), "cross": _as_dict(c.cross)}
                for c in self.candidates
            ],
            "timings": self.timings,
            "size_before": None if self.size_before is None else self.size_before.as_dict(),
            "size_after": None if self.size_after is None else self.size_after.as_dict(),
            "positions": self.positions,
        }


def _cells(ev: Evaluation | None, pad: int = 0) -> str:
    if ev is None:
        return f"{'-':>{8 + pad}} {'-':>{9 + pad}}"
    return f"{ev.accuracy:>{8 + pad}.2%} {ev.loss:>{9 + pad}.4f}"


def _as_dict(ev: Evaluation | None) -> dict[str, float] | None:
    return None if ev is None else ev.as_dict()


@dataclass
class PruneResult(ModelResult):
    """The eigenpruned model (same class as the input, ready to use) and how it was made; ``.save(folder)``."""

    kind = "eigenpruned"
    model: nn.Module
    scores: dict[Key, torch.Tensor]
    frozen: dict[Key, torch.Tensor]
    report: PruneReport
    tokenizer: Any = None

    def saved_report(self) -> dict[str, Any]:
        return self.report.as_dict()

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"scores.{l}.{c}": v for (l, c), v in self.scores.items()}
        tensors.update({f"frozen.{l}.{c}": v.to(torch.uint8) for (l, c), v in self.frozen.items()})
        return tensors


@renamed_keywords(progress_bar="progress")
def prune(
    model: nn.Module,
    data: "TaskData | dict",
    p: "float | str" = 0.05,
    components: Sequence[str] = ("k",),
    pairs: str = "all",
    batch_size: int = 32,
    extrapolate: str = "mean",
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    val_data: "TaskData | dict | None" = None,
    test_data: "TaskData | dict | None" = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    backend: str = "auto",
    inplace: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    reduce: str = "max",
    layers: Sequence[int] | None = None,
    positions: str = "indexed",
    estimate: str = "linear",
    steps: int = 8,
    significance: float | None = DEFAULT_SIGNIFICANCE,
    baseline: "tuple[Evaluation | None, Evaluation | None] | None" = None,
    select: str = "val",
) -> PruneResult:
    """Eigenprune ``model`` for the task in ``data`` (docs/MATH.md §2, §3).

    ``p`` is the fraction of each component type's singular values to freeze, or
    ``"auto"``: score once, try every candidate p (plus the defaults) on held-out
    data (``val_data``, else a seeded ``val_fraction`` split of ``data``) and keep
    the most accurate; p = 0 (the unpruned model) is always among the choices, so
    the kept model never does worse on validation than ``model``. A pruned p is kept only when
    it beats the unpruned model on the validation examples beyond chance: an exact one-sided
    sign test on the examples whose correctness changed, at family-wise level ``significance``
    over the candidates (docs/MATH.md §3; None or 0: the most accurate is kept, whatever its
    margin). ``select="crossfit"`` ranks the candidates by their accuracy pooled over both folds
    of a 2-fold cross-fit instead of validation alone: every p is also scored on the validation
    data and that model evaluated on ``data``, which doubles the evidence for the choice at twice
    the scoring cost; the kept model is still the one scored on ``data`` and the gate still tests
    it on validation. ``baseline`` is the unpruned model's evaluations on ``val_data`` and ``test_data``
    (from :func:`eigenfast.evaluate`) when the caller has them already; None evaluates it.
    ``test_data``, if given, is evaluated for the report only, never to choose p.
    ``reduce`` is how scores pool over pairs ("max" or "mean", see :func:`eigenfast.score`);
    ``layers`` limits scoring and freezing to those layers (None: all). ``estimate`` is how
    a term's effect is estimated: "linear" (first-order), "ig" (integrated gradients over
    ``steps`` points of the path that freezes the terms the largest p tried could freeze, the
    lowest by the linear estimate) or "verified" (those candidates are each frozen
    and measured on ``data``; those that raise the loss stay unless, measured again with
    every other accepted term frozen, they no longer do, so p is then an upper bound).
    ``positions`` is what the frozen terms become: ``"indexed"`` (default)
    their mean at each token position, a table past whose length ``extrapolate`` decides;
    ``"mean"`` their mean over all calibration tokens, folded into ordinary biases, so the
    result is a plain HF model (``result.save(folder, format="hf")``). The input model is left
    untouched unless ``inplace``.
    """
    options = PruneOptions(
        p=p, components=components, layers=layers, pairs=pairs, reduce=reduce, candidates=candidates,
        extrapolate=extrapolate, positions=positions, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
        backend=backend, inplace=inplace, estimate=estimate, steps=steps, significance=significance, select=select,
    )
    _check_model(model, options)
    splits = _split(model, options, data, val_data, test_data)
    size_before = count_parameters(model)  # before an inplace prune changes it
    attribution, scores, allowed, timings = _score(model, splits.data, options, progress)
    if baseline is None:
        baseline = _evaluate_both(model, splits, options.batch_size, progress and "base model", timings)
    else:
        baseline = _check_baseline(baseline, splits)
    cross = _crossfit(model, splits, options, progress, timings) if options.select == "crossfit" else None
    results, (pruned, frozen, chosen) = _sweep(
        model, attribution, scores, allowed, baseline, splits, options, progress, timings, cross
    )
    report = PruneReport(
        chosen.p, tuple(dict.fromkeys(options.components)), options.pairs, attribution.calib_len, baseline[0], results,
        baseline[1], timings, options.estimate, size_before, count_parameters(pruned), options.positions,
        options.significance if options.auto else None, options.select,
    )
    return PruneResult(pruned, scores, frozen, report, tokenizer)


@dataclass
class _Splits:
    """What ``prune`` scores on, chooses p on (None: nothing to choose) and reports on (None: no test)."""

    data: TaskData
    val: TaskData | None
    test: TaskData | None


def _check_model(model: nn.Module, options: PruneOptions) -> None:
    """Refuse, before any work, a model ``prune`` cannot handle under these options."""
    adapter = get_adapter(model)  # fail early on an unsupported architecture
    sites = select_sites(adapter, options.components, options.layers)
    if options.positions == "mean":
        if distributed.is_sharded(model):
            raise ArgumentError(
                "positions='mean' rewrites each pruned projection's weight and bias, which an FSDP2-sharded model "
                "cannot take in place: prune the model unsharded, or use positions='indexed'"
            )
        check_bias_possible(adapter, [site.key for site in sites])
    if distributed.is_sharded(model):
        if not options.inplace:
            raise ArgumentError(
                "the model is sharded by FSDP2, which cannot deep-copy it (prune copies the model unless inplace): "
                "pass inplace=True and a fixed p to prune the sharded model itself"
            )
        check_foldable_in_place(model, [site.path for site in sites])


def _split(
    model: nn.Module, options: PruneOptions, data: "TaskData | dict", val_data: "TaskData | dict | None",
    test_data: "TaskData | dict | None",
) -> _Splits:
    """The task data as ``TaskData``, with a seeded held-out split under ``p="auto"`` when no ``val_data`` is given."""
    data = model_data(data, model)
    if val_data is not None:
        val_data = model_data(val_data, model)
    elif options.auto:
        data, val_data = data.split(1.0 - options.val_fraction, seed=options.seed)
    splits = _Splits(data, val_data, None if test_data is None else model_data(test_data, model))
    return splits


def _check_baseline(
    baseline: "tuple[Evaluation | None, Evaluation | None]", splits: _Splits
) -> tuple[Evaluation | None, Evaluation | None]:
    """A caller's evaluations of the unpruned model, refused unless each fits the split it stands for."""
    if not isinstance(baseline, tuple) or len(baseline) != 2:
        raise ArgumentError("baseline must be a pair (val evaluation, test evaluation) of the unpruned model, from "
                            "eigenfast.evaluate on val_data and test_data (None for a split not given)")
    for name, evaluation, data in (("val", baseline[0], splits.val), ("test", baseline[1], splits.test)):
        if (evaluation is None) != (data is None) or (evaluation is not None and evaluation.n != len(data)):
            raise ArgumentError(
                f"baseline's {name} evaluation does not fit {name}_data ({'none' if data is None else len(data)} "
                f"examples, evaluation of {'none' if evaluation is None else evaluation.n}): pass the unpruned "
                f"model's eigenfast.evaluate of exactly {name}_data, or baseline=None to evaluate it here"
            )
    if baseline[0] is not None and baseline[0].correct is None:
        raise ArgumentError("baseline's val evaluation lacks per-example correctness, which the significance gate "
                            "needs: pass an Evaluation returned by eigenfast.evaluate, or baseline=None")
    return baseline


def _score(
    model: nn.Module, data: TaskData, options: PruneOptions, progress: bool
) -> tuple[Attribution, dict[Key, torch.Tensor], dict[Key, torch.Tensor] | None, dict[str, float]]:
    """The attribution (factors and means for freezing), the scores the sweep ranks by, and which terms may be
    frozen (None: any; the verified estimate allows only those measured not to raise the loss)."""
    started = time.perf_counter()

    def scored(steps: int = 1, moving: dict[Key, torch.Tensor] | None = None) -> Attribution:
        return attribute(
            model, data, options.components, options.pairs, options.batch_size, options.layers,
            backend=options.backend, progress=progress, reduce=options.reduce, steps=steps, moving=moving,
        )

    attribution = scored()
    if options.estimate == "ig" and options.steps > 1:
        # The path moves the terms any tried p could freeze, from their values to their frozen values.
        attribution = scored(options.steps, path_candidates(attribution.scores, max(options.tried)))
    timings = {"score": time.perf_counter() - started, **attribution.timings}
    if options.estimate != "verified":
        return attribution, attribution.scores, None, timings
    started = time.perf_counter()
    # Every term any tried p could freeze is checked.
    verification = verify_lowest(model, attribution, data, max(options.tried), options.batch_size, progress)
    timings["verify"] = time.perf_counter() - started
    started = time.perf_counter()
    verification = recheck_dropped(model, attribution, data, verification, options.batch_size, progress)
    timings["recheck"] = time.perf_counter() - started
    return attribution, verification.scores, verification.allowed, timings


def _evaluate_both(
    model: nn.Module, splits: _Splits, batch_size: int, desc: "str | bool", timings: dict[str, float]
) -> tuple[Evaluation | None, Evaluation | None]:
    """Held-out and test evaluations of ``model`` (None where that split is absent), timed into ``timings["evaluate"]``."""
    started = time.perf_counter()
    evaluations = (
        _maybe_evaluate(model, splits.val, batch_size, desc and f"evaluate {desc}"),
        _maybe_evaluate(model, splits.test, batch_size, desc and f"test {desc}"),
    )
    timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - started
    return evaluations


def _sweep(
    model: nn.Module, attribution: Attribution, scores: dict[Key, torch.Tensor],
    allowed: dict[Key, torch.Tensor] | None, baseline: tuple[Evaluation | None, Evaluation | None],
    splits: _Splits, options: PruneOptions, progress: bool, timings: dict[str, float],
    cross: dict[float, Evaluation] | None = None,
) -> tuple[list[Candidate], tuple[nn.Module, dict[Key, torch.Tensor], Candidate]]:
    """Freeze and evaluate every p tried; every candidate and the best (model, frozen masks, candidate) among
    those the significance gate lets through (p = 0 always passes). ``cross`` is the other cross-fit fold's
    evaluation of each p, pooled with validation's to rank them (None: validation alone)."""
    tested = len(options.tried) - 1  # under "auto" every pruned candidate is compared with p = 0, tried first
    gated = options.auto and options.significance is not None
    level = per_candidate_level(options.significance, tested) if gated else None
    results: list[Candidate] = []
    best: tuple[nn.Module, dict[Key, torch.Tensor], Candidate] | None = None  # kept: only the best model so far
    for value in options.tried:
        started = time.perf_counter()
        frozen = _frozen_at(scores, allowed, value)
        target = model if options.inplace else copy.deepcopy(model)
        freeze(target, attribution, frozen, options.extrapolate, options.positions)
        timings["freeze"] = timings.get("freeze", 0.0) + time.perf_counter() - started
        if value == 0:  # nothing frozen: the base model's evaluations
            evaluation, test = baseline
        else:
            evaluation, test = _evaluate_both(target, splits, options.batch_size, progress and f"p={value:g}", timings)
        sign = None if value == 0 or evaluation is None or baseline[0] is None else sign_test(baseline[0], evaluation)
        candidate = Candidate(value, _count_by_component(frozen), evaluation, test, sign,
                              None if cross is None else cross[value])
        results.append(candidate)
        if _choose(results, level, cross is not None) is candidate:
            best = (target, frozen, candidate)
    assert best is not None  # options.tried is never empty
    return results, best


def _crossfit(
    model: nn.Module, splits: _Splits, options: PruneOptions, progress: bool, timings: dict[str, float]
) -> dict[float, Evaluation]:
    """The cross-fit's other fold: every p tried, scored on the validation data, evaluated on the scoring data."""
    assert splits.val is not None  # select="crossfit" needs p="auto", which always has validation data
    started = time.perf_counter()
    attribution, scores, allowed, _ = _score(model, splits.val, options, progress)
    evaluations = {}
    for value in options.tried:
        target = model
        if value > 0:
            target = copy.deepcopy(model)
            freeze(target, attribution, _frozen_at(scores, allowed, value), options.extrapolate, options.positions)
        evaluations[value] = evaluate(target, splits.data, options.batch_size,
                                      desc=f"cross-fit fold p={value:g}" if progress else None)
    timings["crossfit"] = time.perf_counter() - started
    return evaluations


def _frozen_at(
    scores: dict[Key, torch.Tensor], allowed: dict[Key, torch.Tensor] | None, value: float
) -> dict[Key, torch.Tensor]:
    """The terms p = ``value`` freezes: the lowest-scored, less those the verified estimate does not allow (measured
    to raise the loss, or never measured)."""
    frozen = select_frozen(scores, value)
    if allowed is None:
        return frozen
    return {key: mask & allowed[key] for key, mask in frozen.items()}


def _maybe_evaluate(model: nn.Module, data: TaskData | None, batch_size: int, desc: "str | bool") -> Evaluation | None:
    return None if data is None else evaluate(model, data, batch_size, desc=desc or None)


def _choose(candidates: Sequence[Candidate], level: float | None, pooled: bool) -> Candidate:
    """The candidate p="auto" keeps: among those the gate lets through at ``level`` (every one for None; p = 0
    always passes), the highest held-out accuracy (``pooled``: over both cross-fit folds), ties to the lower loss,
    then to the one tried first (the smaller p)."""
    best = None
    for candidate in candidates:
        passes = level is None or candidate.sign is None or candidate.sign.p_value <= level
        if passes and candidate.evaluation is not None and (best is None or _better(candidate, best, pooled)):
            best = candidate
    return candidates[0] if best is None else best


def _better(a: Candidate, b: Candidate, pooled: bool) -> bool:
    accuracy_a, loss_a = _held_out(a, pooled)
    accuracy_b, loss_b = _held_out(b, pooled)
    return (accuracy_a, -loss_a) > (accuracy_b, -loss_b)


def _held_out(candidate: Candidate, pooled: bool) -> tuple[float, float]:
    """The candidate's held-out accuracy and mean loss: on validation, or (``pooled``) over validation and the
    other cross-fit fold's examples."""
    assert candidate.evaluation is not None
    parts = [candidate.evaluation] + ([candidate.cross] if pooled and candidate.cross is not None else [])
    n = sum(e.n for e in parts)
    return sum(e.accuracy * e.n for e in parts) / n, sum(e.loss * e.n for e in parts) / n


def _count_by_component(frozen: dict[Key, torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (_, component), mask in frozen.items():
        counts[component] = counts.get(component, 0) + int(mask.sum())
    return counts
