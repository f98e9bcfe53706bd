"""The options the edge methods share, checked once."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ArgumentError


@dataclass(frozen=True)
class EdgeOptions:
    """Every edge method's settings (docs/EDGES.md); constructing one checks them all.

    Each method reads the fields it needs: Edge Pruning and EAP ``target_sparsity``,
    ACDC (and Algorithm 1 in the comparison) ``threshold``, Edge Pruning the
    optimisation fields. ``evaluate`` adds a report on the same batches the method read.
    """

    batch_size: int = 32
    target_sparsity: float = 0.95
    threshold: float = 0.01
    steps: int = 300
    lr: float = 0.1
    lambda_lr: float = 1.0
    ramp: float = 0.5
    init_log_alpha: float = 3.0
    node_masks: bool = True
    seed: int = 0
    progress: bool = True
    evaluate: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ArgumentError(f"batch_size must be an integer >= 1 (examples per forward), got {self.batch_size!r}")
        if not 0.0 <= self.target_sparsity <= 1.0:  # NaN fails this too
            raise ArgumentError(
                f"target_sparsity must be in [0, 1] (the fraction of edges removed), got {self.target_sparsity}"
            )
        if not self.threshold >= 0:
            raise ArgumentError(
                f"threshold must be a number >= 0 (the KL increase an edge must cause to stay), got {self.threshold}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ArgumentError(f"steps must be an integer >= 1 (edge-pruning optimisation steps), got {self.steps!r}")
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
