"""Modules that eigenfast puts into a model: projections with a position-indexed bias.

Each module can describe its shape as a JSON-able ``spec()`` and be rebuilt
empty from it (``from_spec``), which is how saved models are loaded without
pickle.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters import projection_matrix
from ..adapters.projection import PositionalModule
from ..errors import ArgumentError, PositionIndexError
from ..ops import token_bias_linear

EXTRAPOLATE = ("mean", "last", "error")


def validate_extrapolate(extrapolate: str) -> str:
    """The one check of ``extrapolate``, for every entry point that takes it."""
    if extrapolate not in EXTRAPOLATE:
        raise ArgumentError(
            f"extrapolate must be one of {EXTRAPOLATE} (what positions past the calibration length get: the "
            f"table's mean row, its last row, or an error), got {extrapolate!r}"
        )
    return extrapolate


def extend_rows(rows: torch.Tensor, extrapolate: str) -> torch.Tensor:
    """``(..., calib_len, d)`` → ``(..., calib_len + 1, d)``: the extra row serves every position ≥ calib_len
    ("last": the last calibrated row; "mean" and "error": the mean row, which "error" never reads)."""
    validate_extrapolate(extrapolate)
    tail = rows[..., -1:, :] if extrapolate == "last" else rows.mean(dim=-2, keepdim=True)
    return torch.cat([rows, tail], dim=-2)


def check_positions(positions: torch.Tensor, calib_len: int) -> None:
    """``extrapolate="error"``: no position may reach ``calib_len`` (looks at the values: one host sync)."""
    if torch.compiler.is_compiling():
        return
    longest = int(positions.max())
    if longest >= calib_len:
        raise PositionIndexError(
            f"token position {longest} is beyond the calibration length {calib_len}; "
            "calibrate on longer sequences or pick extrapolate='mean' or 'last'"
        )


def table_positions(positions: torch.Tensor, calib_len: int, extrapolate: str) -> torch.Tensor:
    """Row indices into an :func:`extend_rows` table; past ``calib_len`` raises under ``"error"``."""
    if extrapolate == "error":
        check_positions(positions, calib_len)
    return positions.clamp(0, calib_len)


def resample_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """An extended table ``(L0 + 1, d)`` read at positions ``0..length``: ``(length + 1, d)``, the last row
    serving every position ≥ length. Exact whenever ``length ≥ L0``, which is how tables of different
    calibration lengths are added (composing prune and extract)."""
    return table[torch.arange(length + 1, device=table.device).clamp(max=table.shape[0] - 1)]


def bias_table(module: nn.Module, length: int) -> torch.Tensor:
    """What a projection adds to its output at positions ``0..length`` (the last row: every later
    position), ``(length + 1, d_out)``: its position table, its plain bias, or zeros."""
    if isinstance(module, PositionTable):
        return resample_table(module.table.detach(), length)
    d_out = projection_matrix(module).shape[1]
    bias = module.bias.detach() if module.bias is not None else module.weight.new_zeros(d_out)
    return bias.expand(length + 1, d_out)


def stores_linear_layout(module: nn.Module) -> bool:
    """Whether a projection stores ``A^T`` (d_out, d_in) as ``nn.Linear`` does, rather than ``A`` as ``Conv1D`` does."""
    return getattr(module, "linear_layout", not isinstance(module, Conv1D))


class PositionTable(PositionalModule):
    """A ``(calib_len, d)`` table read at true token positions.

    The buffer ``table`` holds one more row than the calibration length: the row
    used for positions at or past it (see :func:`extend_rows`), so the hot path is a
    clamp and a gather. With ``extrapolate="error"`` such positions raise.
    """

    def __init__(self, calib_len: int, dim: int, extrapolate: str = "mean") -> None:
        super().__init__()
        if calib_len < 1:
            raise ArgumentError("a position table needs at least one calibrated position")
        self.calib_len = calib_len
        self.extrapolate = validate_extrapolate(extrapolate)
        self.register_buffer("table", torch.zeros(calib_len + 1, dim))

    def set_table(self, table: torch.Tensor) -> None:
        """Fill the whole table ``(calib_len + 1, d)``, extrapolation row included."""
        with torch.no_grad():
            self.table.copy_(table)

    @property
    def rows(self) -> torch.Tensor:
        """The calibrated rows (without the extrapolation row)."""
        return self.table[: self.calib_len]

    def read_at(self, positions: torch.Tensor, leading: torch.Size) -> torch.Tensor:
        """Table row indices for a tensor whose leading shape is ``leading``."""
        return table_positions(positions, self.calib_len, self.extrapolate).expand(leading)

    def spec_fields(self) -> dict[str, Any]:
        return {"calib_len": self.calib_len, "extrapolate": self.extrapolate}


class TokenBiasLinear(PositionTable):
    """``y = x A' + table[pos]``: a projection whose bias depends on the token position.

    The weight keeps the layout of the projection it replaced: ``A'^T`` (d_out, d_in) as
    ``nn.Linear`` stores it (``linear_layout``), or ``A'`` (d_in, d_out) as GPT-2's
    ``Conv1D`` does. The op reads either without a copy, and keeping the base's layout
    keeps the base's GEMM: on the CPU a batch-1 GEMV over the other layout is measurably
    slower (docs/SERVING.md).
    """

    kind = "token_bias_linear"

    def __init__(
        self, d_in: int, d_out: int, calib_len: int, extrapolate: str = "mean", linear_layout: bool = True
    ) -> None:
        super().__init__(calib_len, d_out, extrapolate)
        self.linear_layout = linear_layout
        self.weight = nn.Parameter(torch.zeros((d_out, d_in) if linear_layout else (d_in, d_out)))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1 if self.linear_layout else 0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0 if self.linear_layout else 1]

    def set_matrix(self, A: torch.Tensor) -> None:
        """Fill the weight from the math-orientation matrix ``A`` (d_in, d_out)."""
        with torch.no_grad():
            self.weight.copy_(A.T if self.linear_layout else A)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.extrapolate == "error":
            check_positions(positions, self.calib_len)
        weight = self.weight if self.linear_layout else self.weight.T  # the op takes (d_out, d_in), any strides
        if positions.shape != x.shape[:-1]:  # eigenfast's layers expand once per layer; an expand costs microseconds
            positions = positions.expand(x.shape[:-1])
        # clamp_pos: the op clamps into the table, whose last row serves every later position.
        return token_bias_linear(x, weight, self.table, positions, clamp_pos=True)

    def spec(self) -> dict[str, Any]:
        return {"d_in": self.in_features, "d_out": self.out_features, **self.spec_fields(),
                "linear_layout": self.linear_layout}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TokenBiasLinear":
        # Saves from before the layout was kept have no "linear_layout": they stored nn.Linear's.
        return cls(spec["d_in"], spec["d_out"], spec["calib_len"], spec["extrapolate"], spec.get("linear_layout", True))

    def extra_repr(self) -> str:
        return (f"d_in={self.in_features}, d_out={self.out_features}, calib_len={self.calib_len}, "
                f"extrapolate={self.extrapolate}, linear_layout={self.linear_layout}")
