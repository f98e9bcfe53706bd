"""Modules that eigenfast puts into a model: projections with a position-indexed bias.

Each module can describe its shape as a JSON-able ``spec()`` and be rebuilt
empty from it (``from_spec``), which is how saved models are loaded without
pickle.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .errors import PositionIndexError
from .ops import token_bias_linear
from .positions import PositionTracker, attach_tracker

EXTRAPOLATE = ("mean", "last", "error")


class PositionTable(nn.Module):
    """A ``(calib_len, d)`` table read at true token positions.

    The buffer ``table`` holds one more row than the calibration length: the row
    used for positions at or past it (the table mean or the last row), so the hot
    path is a clamp and a gather. With ``extrapolate="error"`` such positions raise.
    """

    def __init__(self, calib_len: int, dim: int, extrapolate: str = "mean") -> None:
        super().__init__()
        if extrapolate not in EXTRAPOLATE:
            raise ValueError(f"extrapolate must be one of {EXTRAPOLATE}, got {extrapolate!r}")
        if calib_len < 1:
            raise ValueError("a position table needs at least one calibrated position")
        self.calib_len = calib_len
        self.extrapolate = extrapolate
        self.register_buffer("table", torch.zeros(calib_len + 1, dim))
        self.tracker: PositionTracker | None = None

    def set_rows(self, rows: torch.Tensor) -> None:
        """Fill the calibrated rows ``(calib_len, d)`` and derive the extrapolation row."""
        with torch.no_grad():
            self.table[: self.calib_len].copy_(rows)
            tail = rows[-1] if self.extrapolate == "last" else rows.mean(dim=0)
            self.table[self.calib_len].copy_(tail)

    @property
    def rows(self) -> torch.Tensor:
        """The calibrated rows (without the extrapolation row)."""
        return self.table[: self.calib_len]

    def positions(self, shape: torch.Size) -> torch.Tensor:
        if self.tracker is None:
            raise RuntimeError("this module is not attached to a model; use eigenfast.load() to rebuild saved models")
        pos = self.tracker.current()
        if self.extrapolate == "error" and not torch.compiler.is_compiling():
            longest = int(pos.max())
            if longest >= self.calib_len:
                raise PositionIndexError(
                    f"token position {longest} is beyond the calibration length {self.calib_len}; "
                    "calibrate on longer sequences or pick extrapolate='mean' or 'last'"
                )
        return pos.clamp(max=self.calib_len).expand(shape)

    def spec_fields(self) -> dict[str, Any]:
        return {"calib_len": self.calib_len, "extrapolate": self.extrapolate}


MODULE_KINDS: dict[str, type[nn.Module]] = {}


def register_kind(cls: type[nn.Module]) -> type[nn.Module]:
    """Make a module class rebuildable from its ``spec()`` when a saved model is loaded."""
    MODULE_KINDS[cls.kind] = cls
    return cls


def connect_positions(model: nn.Module) -> None:
    """Point every position table in ``model`` at the tracker on the model's backbone."""
    tables = [m for m in model.modules() if isinstance(m, PositionTable)]
    if tables:
        tracker = attach_tracker(get_adapter(model).backbone())
        for table in tables:
            table.tracker = tracker


ATTRIBUTES = "eigenfast_attributes"  # where a module remembers the plain attributes eigenfast changed


def set_attributes(module: nn.Module, values: dict[str, Any]) -> None:
    """Change plain (JSON-able) attributes of a HF module, such as a shrunk attention's head counts,
    and remember them so that a saved model gets them back."""
    for name, value in values.items():
        if not hasattr(module, name):
            raise AttributeError(f"{type(module).__name__} has no attribute {name!r}")
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"attribute {name!r} must be a bool, int, float or str, got {type(value).__name__}")
        setattr(module, name, value)
    setattr(module, ATTRIBUTES, {**getattr(module, ATTRIBUTES, {}), **values})


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


@register_kind
class TokenBiasLinear(PositionTable):
    """``y = x A'^T + table[pos]``: a projection whose bias depends on the token position."""

    kind = "token_bias_linear"

    def __init__(self, d_in: int, d_out: int, calib_len: int, extrapolate: str = "mean") -> None:
        super().__init__(calib_len, d_out, extrapolate)
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.positions(x.shape[:-1])
        return token_bias_linear(x, self.weight, self.table.to(x.dtype), pos)

    def spec(self) -> dict[str, Any]:
        return {"d_in": self.in_features, "d_out": self.out_features, **self.spec_fields()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TokenBiasLinear":
        return cls(spec["d_in"], spec["d_out"], spec["calib_len"], spec["extrapolate"])

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, calib_len={self.calib_len}, extrapolate={self.extrapolate}"
