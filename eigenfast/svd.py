"""Thin SVD of every head's matrix at a site: ``A_h = U_h diag(s_h) V_h``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Site, head_matrices, projection_matrix


@dataclass
class Factors:
    """``U (H, d_in, r)``, ``s (H, r)`` descending, ``V (H, r, d_out)`` for one site."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "Factors":
        return Factors(self.U.to(device, dtype), self.s.to(device, dtype), self.V.to(device, dtype))

    def terms(self, head: int, index: torch.Tensor) -> torch.Tensor:
        """``Σ_i s_i u_i v_iᵀ`` over the given term indices of one head, ``(d_in, d_out)``."""
        U, s, V = self.U[head][:, index], self.s[head][index], self.V[head][index]
        return (U * s) @ V


def site_factors(module: nn.Module, site: Site) -> Factors:
    """SVD in float64 so frozen terms and scores share one exact decomposition."""
    A = head_matrices(projection_matrix(module).detach().double(), site)
    U, s, V = torch.linalg.svd(A, full_matrices=False)
    return Factors(U, s, V)
