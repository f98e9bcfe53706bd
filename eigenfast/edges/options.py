"""The options the edge methods share, checked once."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ArgumentError

# The target when no knob (target_sparsity, threshold) and no other target is given.
DEFAULT_FAITHFULNESS = 0.99
# Edge Pruning's optimisation steps when ``steps`` is not given: a run at a given target_sparsity,
# and each run of the target search. 100 per probe is the one setting measured (50, 100, 300 on
# synthetic_task's seeds 0-2, docs/EDGES.md "Targets") that recovers the true heads with edge FPR
# <= 0.25 wherever any method can; 300 per probe, the search's cost before, missed on two Llama seeds.
STEPS = 300
SEARCH_STEPS = 100


@dataclass(frozen=True)
class EdgeOptions:
    """Every edge method's settings (docs/EDGES.md); constructing one checks them all.

    Each method reads the fields it needs: Edge Pruning and EAP ``target_sparsity``,
    ACDC (and Algorithm 1 in the comparison) ``threshold``, Edge Pruning the
    optimisation fields, EAP-IG ``ig_steps``. ``evaluate`` adds a report on the same
    batches the method read.

    Without a knob (``target_sparsity`` or ``threshold`` left ``None``) a method looks
    for the smallest circuit that reaches a target (edges/target.py): ``faithfulness``
    (the answer's probability, normalised between the corrupted run and the full
    model) or ``kl`` (KL(f‖circuit) at most this), by default faithfulness
    ``DEFAULT_FAITHFULNESS``. Edge Pruning and ACDC bisect their knob in at most
    ``search_runs`` runs. Edge Pruning's ``steps`` left ``None`` means ``STEPS`` at a
    given ``target_sparsity`` and ``SEARCH_STEPS`` per run of the search.
    ``init_scores`` ``(E,)`` starts Edge Pruning's masks from another method's edge
    scores (higher means more important).
    """

    batch_size: int = 32
    target_sparsity: float | None = None
    threshold: float | None = None
    faithfulness: float | None = None
    kl: float | None = None
    search_runs: int = 6
    ig_steps: int = 5
    steps: int | None = None
    lr: float = 0.1
    lambda_lr: float = 1.0
    ramp: float = 0.5
    init_log_alpha: float = 3.0
    node_masks: bool = True
    seed: int = 0
    progress: bool = True
    evaluate: bool = True
    init_scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, meaning in (("batch_size", "examples per forward"), ("steps", "edge-pruning optimisation steps"),
                              ("search_runs", "runs of a knob bisection"), ("ig_steps", "integrated-gradients steps")):
            value = getattr(self, name)
            if name == "steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{name} must be an integer >= 1 ({meaning}), got {value!r}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity <= 1.0:  # NaN fails this too
            raise ArgumentError(
                f"target_sparsity must be in [0, 1] (the fraction of edges removed), got {self.target_sparsity}"
            )
        if self.threshold is not None and not self.threshold >= 0:
            raise ArgumentError(
                f"threshold must be a number >= 0 (the KL increase an edge must cause to stay), got {self.threshold}"
            )
        if self.faithfulness is not None and not 0.0 < self.faithfulness <= 1.0:
            raise ArgumentError(f"faithfulness must be in (0, 1] (the share of the full model's answer probability "
                                f"over the corrupted run's the circuit must keep), got {self.faithfulness}")
        if self.kl is not None and not (self.kl > 0 and math.isfinite(self.kl)):
            raise ArgumentError(f"kl must be a finite number > 0 (the largest KL(f||circuit) allowed), got {self.kl}")
        targets = [n for n in ("faithfulness", "kl") if getattr(self, n) is not None]
        knobs = [n for n in ("target_sparsity", "threshold") if getattr(self, n) is not None]
        if len(targets) == 2 or (targets and knobs):
            raise ArgumentError(f"{' and '.join(knobs + targets)} are both set: give one target (faithfulness or kl) "
                                "or one knob (target_sparsity or threshold), not several")
        if self.init_scores is not None and (
            not isinstance(self.init_scores, torch.Tensor) or self.init_scores.dim() != 1
            or not bool(torch.isfinite(self.init_scores).all())
        ):
            raise ArgumentError("init_scores must be a 1-D tensor of finite edge scores (one per edge of the graph, "
                                "e.g. another method's circuit.scores)")
        if not 0.0 < self.ramp <= 1.0:
            raise ArgumentError(
                f"ramp (the fraction of steps over which the target rises) must be in (0, 1], got {self.ramp}"
            )
        for name in ("lr", "lambda_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ArgumentError(f"{name} must be a finite learning rate > 0, got {value}")
        if not math.isfinite(self.init_log_alpha):
            raise ArgumentError(f"init_log_alpha must be a finite number (the masks' starting logit), got "
                                f"{self.init_log_alpha}")

    @property
    def target(self) -> tuple[str, float]:
        """The target a method without its knob searches for: ("faithfulness", x) or ("kl", x)."""
        if self.kl is not None:
            return "kl", float(self.kl)
        return "faithfulness", float(DEFAULT_FAITHFULNESS if self.faithfulness is None else self.faithfulness)
