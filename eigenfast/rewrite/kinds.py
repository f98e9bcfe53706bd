"""Every module kind eigenfast puts into a model, by the name a saved model's spec records.

The list is written out, not filled in by decorators as modules happen to be imported,
so a load finds every kind whatever the caller imported first.
"""
from __future__ import annotations

from torch import nn

from .position_tables import TokenBiasLinear
from .stand_ins import ConstantOutput, PlainConv1D, PlainLinear, PositionMean, RemovedAttention, RemovedNorm

MODULE_KINDS: dict[str, type[nn.Module]] = {
    cls.kind: cls
    for cls in (TokenBiasLinear, PlainLinear, PlainConv1D, PositionMean, ConstantOutput, RemovedAttention, RemovedNorm)
}
