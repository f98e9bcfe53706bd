"""Thin SVD of every head's matrix at a site, ``A_h = U_h diag(s_h) V_h``, cached per weight.

How: float64, QR of the tall orientation on the weight's device, then LAPACK's SVD of
the small square ``R`` on the CPU (docs/DESIGN.md, "SVD"). QR + SVD(R) is backward
stable like a direct SVD (the Gram matrix's eigendecomposition is not: it squares the
condition number), faster than a direct float64 SVD on the CPU, and on CUDA it keeps
cuSOLVER's batched Jacobi SVD, the slowest step of scoring, out of the way (the
measurements are in docs/DESIGN.md, "SVD").

The cache is keyed on the weight tensor itself (weakly: a dropped or replaced module
frees its entry) and checked against the tensor's ``_version``, so an in-place edit
of the weight recomputes, while repeated ``score`` calls or ``p="auto"`` reuse it.

Under a process group the sites to decompose are dealt round-robin over the ranks:
each rank decomposes its share and every factor is broadcast from the rank that made
it (in site order on every rank), so all ranks hold the owner's bytes and share the
cost. The ranks first agree on which sites are cached everywhere, so their caches
never lead them into different collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..adapters import Site, head_matrices, projection_matrix
from ..runtime import distributed


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


def placed_terms(site: Site, factors: Factors, head: int, index: torch.Tensor, d_in: int, d_out: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Terms of one head as full-width vectors: ``u (n, d_in)`` and ``w = s v (n, d_out)``, zero
    outside the head's block, so term ``j`` changes the module's output by ``(x · u_j) w_j``."""
    U, sV = factors.U[head][:, index].T, factors.s[head][index].unsqueeze(1) * factors.V[head][index]
    if site.in_index is not None:
        u = U.new_zeros(len(index), d_in)
        u[:, site.in_index[head].to(U.device)] = U
        U = u
    if site.out_index is not None:
        w = sV.new_zeros(len(index), d_out)
        w[:, site.out_index[head].to(sV.device)] = sV
        sV = w
    return U, sV


# weight -> {site key: (weight._version when computed, factors)}
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def site_factors(model: nn.Module, sites: Sequence[Site]) -> list[Factors]:
    """Each site's float64 factors, shared by scores and freezing; computed once per weight version."""
    distributed.reshard(model)  # FSDP2: key the cache on the sharded Parameters, which persist
    modules = [model.get_submodule(site.path) for site in sites]
    cached = [_cached(module.weight, site) for module, site in zip(modules, sites)]
    everywhere = distributed.all_true([hit is not None for hit in cached])
    out: list[Factors] = []
    owner = 0  # which rank decomposes the next site: round-robin
    for module, site, hit, shared in zip(modules, sites, cached, everywhere):
        if shared:
            out.append(hit)
            continue
        weight = module.weight
        version = weight._version
        # A sharded weight is gathered on every rank: full_tensor is a collective.
        heads = head_matrices(distributed.full_tensor(projection_matrix(module).detach()).double(), site)
        if distributed.rank() == owner:
            # Contiguous: a broadcast sends the storage as laid out (LAPACK's V is a transposed view).
            factors = Factors(*(t.contiguous() for t in thin_svd(heads)))
        else:
            factors = _empty_factors(heads)
        distributed.broadcast_([factors.U, factors.s, factors.V], owner)
        _CACHE.setdefault(weight, {})[site.key] = (version, factors)
        out.append(factors)
        owner = (owner + 1) % distributed.world_size()
    return out


def _cached(weight: torch.Tensor, site: Site) -> Factors | None:
    hit = _CACHE.get(weight, {}).get(site.key)
    return hit[1] if hit is not None and hit[0] == weight._version else None


def _empty_factors(heads: torch.Tensor) -> Factors:
    """Buffers for the factors of ``heads (H, m, n)`` that another rank decomposes."""
    h, m, n = heads.shape
    r = min(m, n)
    return Factors(*(heads.new_empty(shape) for shape in ((h, m, r), (h, r), (h, r, n))))


def thin_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (..., m, r)``, ``s (..., r)`` descending, ``V (..., r, n)`` with ``A = U diag(s) V``,
    ``r = min(m, n)``, in A's dtype and on A's device (the small SVD itself runs on the CPU)."""
    tall = A.shape[-2] >= A.shape[-1]
    B = A if tall else A.mT
    Q, R = torch.linalg.qr(B)
    Ur, s, Vr = torch.linalg.svd(R.cpu(), full_matrices=False)
    U = Q @ Ur.to(A.device)
    s, Vr = s.to(A.device), Vr.to(A.device)
    if tall:
        return U, s, Vr
    return Vr.mT.contiguous(), s, U.mT.contiguous()
