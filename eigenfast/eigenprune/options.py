"""The options eigenpruning takes, checked once."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ArgumentError
from ..rewrite.plain_bias import validate_positions
from ..rewrite.position_tables import validate_extrapolate
from .freezing import validate_fraction
from .scoring import check_settings
from .significance import validate_significance

DEFAULT_CANDIDATES = (0.01, 0.05, 0.10, 0.30)
# The family-wise chance that p="auto" keeps a pruned model no better than the unpruned one (docs/MATH.md §3).
DEFAULT_SIGNIFICANCE = 0.05
# How p="auto" judges a candidate: on the validation data alone, or pooled with the other fold of a 2-fold
# cross-fit (scored on the validation data, judged on the scoring data; docs/MATH.md §3).
SELECTIONS = ("val", "crossfit")


@dataclass(frozen=True)
class PruneOptions:
    """:func:`eigenfast.prune`'s settings (docs/MATH.md §2, §3); constructing one checks them all.

    ``p`` is a fraction in [0, 1] or ``"auto"`` (then p = 0, the unpruned model, and every
    ``candidates`` value are tried on held-out data); ``layers=None`` scores every layer.
    ``estimate`` is how a term's effect is estimated ("linear", "ig" over ``steps`` points,
    or "verified": see :func:`eigenfast.score`). ``positions`` is what frozen terms become:
    ``"indexed"`` their mean at each token position (a table eigenfast serves), ``"mean"``
    their mean over all positions (an ordinary bias: a plain HF model). ``significance`` is the
    level at which p="auto" must find a pruned model better than the unpruned one on validation
    before keeping it (None: the most accurate on validation is kept, whatever its margin).
    ``select`` is what p="auto" ranks candidates by: accuracy on the validation data (``"val"``), or
    pooled over both folds of a 2-fold cross-fit (``"crossfit"``: each p is also scored on the
    validation data and judged on the scoring data, twice the evidence for the choice at twice the
    scoring cost; the kept model is still the one scored on the scoring data).
    """

    p: float | str = 0.05
    components: tuple[str, ...] = ("k",)
    layers: tuple[int, ...] | None = None
    pairs: str = "all"
    reduce: str = "max"
    estimate: str = "linear"
    steps: int = 8
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    extrapolate: str = "mean"
    positions: str = "indexed"
    batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    backend: str = "auto"
    inplace: bool = False
    significance: float | None = DEFAULT_SIGNIFICANCE
    select: str = "val"

    def __post_init__(self) -> None:
        validate_extrapolate(self.extrapolate)
        if self.select not in SELECTIONS:
            raise ArgumentError(f"select must be one of {SELECTIONS} (what p='auto' ranks candidates by), "
                                f"got {self.select!r}")
        if self.select == "crossfit" and self.p != "auto":
            raise ArgumentError(f"select='crossfit' chooses p among candidates, but p={self.p!r} is fixed: "
                                "pass p='auto', or leave select at 'val'")
        object.__setattr__(self, "significance", validate_significance(self.significance))
        validate_positions(self.positions)
        if isinstance(self.p, str):
            if self.p != "auto":
                raise ArgumentError(f"p must be a fraction in [0, 1] or 'auto', got {self.p!r}")
            if self.inplace:
                raise ArgumentError("inplace=True needs a fixed p: p='auto' builds one pruned copy per candidate")
            # Sorted and deduplicated: the sweep tries each once, smallest first.
            candidates = tuple(sorted({validate_fraction(c, "candidate p") for c in self.candidates}))
            if not any(candidates):
                raise ArgumentError("p='auto' needs at least one candidate p above 0; pass candidates=(0.01, 0.05, ...) "
                                    "or a fixed p")
            # p = 0 (the unpruned model) is always a choice, so p="auto" never picks a model
            # that does worse on validation than the one it was given (and, under the significance
            # gate, none that is not better beyond chance).
            candidates = (0.0, *(c for c in candidates if c > 0))
            object.__setattr__(self, "candidates", candidates)
        else:
            object.__setattr__(self, "p", validate_fraction(self.p))
            object.__setattr__(self, "candidates", tuple(self.candidates))
        components = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        object.__setattr__(self, "components", components)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        check_settings(self.pairs, self.reduce, self.batch_size, self.estimate, self.steps)
        if not 0.0 < self.val_fraction < 1.0:
            raise ArgumentError(
                f"val_fraction must be in (0, 1) (the share of data held out to choose p under p='auto'; or pass "
                f"val_data), got {self.val_fraction}"
            )

    @property
    def auto(self) -> bool:
        return self.p == "auto"

    @property
    def tried(self) -> tuple[float, ...]:
        """The values of p to freeze and evaluate: every candidate under ``"auto"``, else ``p`` alone."""
        return self.candidates if self.auto else (float(self.p),)
