"""How a decoder layer calls a projection once eigenfast may have replaced it.

eigenfast's modules (position-indexed biases, stand-ins for removed components) take
the token positions as a second argument; HF's ``nn.Linear``/``Conv1D`` take ``x``
alone. Positions are always passed as arguments, never stored (docs/MATH.md §6).
"""
from __future__ import annotations

import torch
from torch import nn


class PositionalModule(nn.Module):
    """An eigenfast module whose forward is ``forward(x, positions)``; ``positions`` are the
    true token positions ``(B or 1, T)`` of ``x``'s rows, as transformers passes them."""


def project(module: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``module(x, positions)`` for eigenfast's modules, ``module(x)`` for HF's."""
    if isinstance(module, PositionalModule):
        return module(x, positions)
    return module(x)
