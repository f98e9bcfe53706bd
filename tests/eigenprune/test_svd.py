"""eigenfast.eigenprune.svd.thin_svd (QR + SVD of R) against float64 torch.linalg.svd."""
from __future__ import annotations

import pytest
import torch

from eigenfast.eigenprune.svd import thin_svd


def conditioned(shape: tuple[int, int, int], kappa: float, seed: int = 0) -> torch.Tensor:
    """Batched matrices whose singular values spread log-uniformly over [1/kappa, 1]."""
    g = torch.Generator().manual_seed(seed)
    H, m, n = shape
    r = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(H, m, r, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(H, n, r, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)
    return (Q1 * s) @ Q2.mT


@pytest.mark.parametrize("shape", [(3, 96, 16), (3, 16, 96), (1, 64, 200), (1, 200, 64), (2, 32, 32)])
@pytest.mark.parametrize("kappa", [1e2, 1e6])
def test_thin_svd_matches_float64_svd(shape, kappa):
    A = conditioned(shape, kappa)
    U, s, V = thin_svd(A)
    U0, s0, V0 = torch.linalg.svd(A, full_matrices=False)
    r = min(shape[1:])
    assert U.shape == (shape[0], shape[1], r) and s.shape == (shape[0], r) and V.shape == (shape[0], r, shape[2])
    assert ((s - s0).abs() / s0).max() < 1e-10
    assert ((U * s.unsqueeze(-2)) @ V - A).abs().max() < 1e-10 * A.abs().max()
    eye = torch.eye(r, dtype=torch.float64)
    assert (U.mT @ U - eye).abs().max() < 1e-10
    assert (V @ V.mT - eye).abs().max() < 1e-10
    # Signs may differ, but each rank-one term u_i v_i^T must be the reference's (U and V consistent).
    terms = U.unsqueeze(-1) * V.unsqueeze(-3)  # (H, m, r, n)
    terms0 = U0.unsqueeze(-1) * V0.unsqueeze(-3)
    assert (terms - terms0).abs().max() < 1e-8


def test_thin_svd_keeps_dtype_and_orders_descending():
    A = torch.randn(4, 20, 6, dtype=torch.float64)
    U, s, V = thin_svd(A)
    assert U.dtype == s.dtype == V.dtype == torch.float64
    assert (s[:, :-1] >= s[:, 1:]).all()
