"""The options circuit discovery and extraction share, checked once."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ArgumentError
from ..rewrite.removal import check_ablation


@dataclass(frozen=True)
class CircuitOptions:
    """Algorithm 1's settings (docs/MATH.md §4); constructing one checks them all.

    ``batch_size`` bounds the rows of one forward (candidates × examples when
    discovery stacks candidates); ``None`` picks it from the device. ``positions`` is how the
    extracted model holds removed components' means: ``"indexed"`` per token position (tables
    eigenfast serves), ``"mean"`` over all positions (ordinary biases and constants). Discovery
    itself always ablates with the per-position means.
    """

    threshold: float
    ablation: str = "mean"
    include_mlps: bool = False
    extrapolate: str = "mean"
    batch_size: int | None = None
    positions: str = "indexed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", float(self.threshold))
        if not self.threshold >= 0:  # NaN fails this too
            raise ArgumentError(
                "threshold must be a number >= 0 (the KL increase a component must cause to stay; inf prunes "
                f"everything), got {self.threshold}"
            )
        check_ablation(self.ablation, self.extrapolate, self.positions)
        if self.batch_size is not None and self.batch_size < 1:
            raise ArgumentError(f"batch_size must be >= 1 (or None to pick it from the device), got {self.batch_size}")

    def check_patch_data(self, patch_data: object) -> None:
        if self.ablation == "mean" and patch_data is None:
            raise ArgumentError(
                "mean ablation needs patch_data (D_a) for the mean activations; pass it or use ablation='zero'"
            )
