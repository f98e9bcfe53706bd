"""Is a pruned model's gain over the unpruned one, on the same validation examples, beyond chance?

An exact one-sided sign test on the discordant examples (McNemar's exact test), docs/MATH.md §3
"Choosing p". Only the examples whose correctness changed carry information about which model is
better: ``gained`` (right after pruning, wrong before) and ``lost`` (the reverse). Were the two
models equally good, each changed example would be a fair coin, so
``p-value = P(X >= gained)``, ``X ~ Binomial(gained + lost, 1/2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ArgumentError
from ..runtime.forward import Evaluation


@dataclass(frozen=True)
class SignTest:
    """A pruned model against the unpruned one on the same examples."""

    gained: int  # right after pruning, wrong before
    lost: int  # wrong after pruning, right before
    p_value: float  # one-sided: the chance of at least ``gained`` of ``gained + lost`` fair coin flips

    def as_dict(self) -> dict[str, float]:
        return {"gained": self.gained, "lost": self.lost, "p_value": self.p_value}

    def describe(self) -> str:
        return f"{self.gained} examples gained, {self.lost} lost, one-sided sign test p = {self.p_value:.3g}"


def sign_test_p_value(gained: int, lost: int) -> float:
    """``P(X >= gained)`` for ``X ~ Binomial(gained + lost, 1/2)``, summed exactly in integers."""
    n = gained + lost
    return sum(math.comb(n, k) for k in range(gained, n + 1)) / 2**n


def sign_test(base: Evaluation, pruned: Evaluation) -> SignTest:
    """The test of ``pruned`` against ``base``, both evaluations of the same examples in the same order."""
    if base.correct is None or pruned.correct is None or base.correct.shape != pruned.correct.shape:
        raise ArgumentError(
            "the sign test needs both models' per-example correctness on the same examples: evaluate both with "
            "eigenfast.evaluate on the same validation data"
        )
    gained = int((pruned.correct & ~base.correct).sum())
    lost = int((base.correct & ~pruned.correct).sum())
    return SignTest(gained, lost, sign_test_p_value(gained, lost))


def validate_significance(level: object) -> float | None:
    """The family-wise level of the gate, or None (also for 0) when the gate is off."""
    if level is None or (isinstance(level, (int, float)) and not isinstance(level, bool) and level == 0):
        return None
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ArgumentError(
            f"significance must be a level in (0, 1), e.g. 0.05 (the chance p='auto' may keep a pruned model that "
            f"is no better than the unpruned one), or None or 0 to choose on validation accuracy alone; got {level!r}"
        )
    return float(level)


def per_candidate_level(level: float, candidates: int) -> float:
    """Bonferroni: each of ``candidates`` pruned models is tested at ``level / candidates``, so the chance that
    any passes when none is better than the unpruned model is at most ``level``."""
    return level / max(1, candidates)
