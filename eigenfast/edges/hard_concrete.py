"""Hard-concrete masks (Louizos et al.) and the Lagrangian sparsity term, with the constants of docs/EDGES.md."""
from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0  # temperature
LOW, HIGH = -0.1, 1.1  # the stretch interval [l, r]
EPSILON = 1e-6  # u ~ U(ε, 1 − ε)


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = clamp(σ((log u − log(1 − u) + log α) / β)·(r − l) + l, 0, 1), u ~ U(ε, 1 − ε)."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype).to(log_alpha.device)
    u = u * (1 - 2 * EPSILON) + EPSILON
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def expected(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic mask used once training ends: clamp(σ(log α)·(r − l) + l, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def probability_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = σ(log α − β·log(−l / r)): the expected L0 norm, per mask."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LOW / HIGH))


def lagrangian(target: float, sparsity: torch.Tensor, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """λ1·(t − s) + λ2·(t − s)²; the caller ascends in λ and descends in the masks."""
    gap = target - sparsity
    return lambda1 * gap + lambda2 * gap * gap
