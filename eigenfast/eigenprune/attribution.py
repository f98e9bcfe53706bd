"""Attribution statistics for eigenpruning (docs/MATH.md §2, §5).

For one (layer, component) with per-head thin SVD ``A_h = U_h diag(s_h) V_h``, rows
(real tokens) carry an input activation ``x`` and an output gradient ``g``:

    P[row, h, i] = x[row, h, :] · U[h, :, i]      G[row, h, i] = g[row, h, :] · V[h, i, :]

Pass 1 keeps per position ``t`` the running max/min of ``P`` (``pmax``/``pmin``).
Pass 2 keeps ``out[h, i] = max_row s[h, i] · (Q - P) · G``, where the partner term ``Q``
is ``pmax[pos]`` or ``pmin[pos]`` ("all" pairs: the best partner at that position) or
``partner · U`` ("shift" pairs: one explicit partner per row). With ``reduce="mean"``
it keeps ``out[h, i] = Σ_row w · s · (Q - P) · G`` instead, ``Q`` being ``pmean[pos]``
(the mean partner, "all") or ``partner · U`` ("shift"); the caller divides by the
total weight. Row weights ``w`` also drop rows (weight 0) from the max, so callers
pass every row, padding included, and never index rows by a data-dependent mask.

All statistics are float32 and updated in place, so a data set is streamed batch by
batch. The CPU fast path here works blockwise over rows: one GEMM per block and
operand, in-place reductions, never more than ``block × H × r`` values alive. The
Triton kernels (``kernels/``) keep ``P`` and ``G`` on chip instead.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Literal

import torch

from ..errors import ArgumentError

Backend = Literal["auto", "torch", "triton"]
Reduce = Literal["max", "mean"]
REDUCE = ("max", "mean")

# Budget, in float32 elements, for one row-block buffer of shape (block, H, r). About
# five such buffers are alive at once: 2**21 (8 MiB each) caps the working memory near
# 40 MiB whatever the number of rows, and gives the GEMMs thousands of rows per call.
# Each torch op is a parallel region, so fewer, larger blocks also mean fewer thread
# synchronisations, which is what costs most on a busy machine.
BLOCK_ELEMS = 1 << 21


def pass1_update(
    x: torch.Tensor,
    U: torch.Tensor,
    pos: torch.Tensor,
    pmax: torch.Tensor,
    pmin: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """Fold rows into the per-position extrema of ``P = x · U``.

    x: (R, H, d_in), possibly stride 0 over H; U: (H, d_in, r); pos: (R,) int64 in
    [0, T); pmax/pmin: (T, H, r) float32, updated in place (start them at -inf/+inf).
    """
    _check(x, U, None, None, None, pos, pmax, pmin, None, None)
    if _use_triton(backend, x):
        from eigenfast.kernels import attribution_pass1

        attribution_pass1.pass1_update(x, U, pos, pmax, pmin)
        return
    R, H, _ = x.shape
    project = _projector(x, U)
    step = _block_rows(H, U.shape[2])
    # index_reduce_ rather than scatter_reduce_ with an expanded index: the latter collapses
    # on contended threads (docs/BENCHMARKS.md, "Measured design choices").
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="index_reduce\\(\\) is in beta")
        for start in range(0, R, step):
            stop = min(R, start + step)
            P = project(start, stop)
            pmax.index_reduce_(0, pos[start:stop], P, "amax")
            pmin.index_reduce_(0, pos[start:stop], P, "amin")


def pass2_update(
    x: torch.Tensor,
    g: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    s: torch.Tensor,
    pos: torch.Tensor,
    pmax: torch.Tensor | None,
    pmin: torch.Tensor | None,
    out: torch.Tensor,
    *,
    partner: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduce: Reduce = "max",
    pmean: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> None:
    """Fold rows into ``out`` (see module docstring).

    x: (R, H, d_in) and g: (R, H, d_out), each possibly stride 0 over H; U: (H, d_in, r);
    V: (H, r, d_out); s: (H, r), non-negative (singular values); pos: (R,) int64.
    partner=None is "all" mode and reads pmax/pmin (max) or pmean (mean), (T, H, r),
    which must already hold every position in ``pos``; partner (same layout as x) is
    "shift" mode and reads none of them. weight: (R,) float32, or None for all ones;
    reduce="max" skips rows of weight 0, "mean" sums weight x gain. out: (H, r)
    float32, updated in place (start it at -inf for "max", 0 for "mean").
    """
    _check(x, U, g, V, s, pos, pmax, pmin, out, partner, weight, reduce, pmean)
    if _use_triton(backend, x):
        from eigenfast.kernels import attribution_pass2

        attribution_pass2.pass2_update(
            x, g, U, V, s, pos, pmax, pmin, out, partner=partner, weight=weight, reduce=reduce, pmean=pmean
        )
        return
    R, H, _ = x.shape
    step = _block_rows(H, U.shape[2])
    mean = reduce == "mean"
    # G is linear in g and P in x, so ``s`` folds into V once per call and the shift
    # partner into x per block: (Pp - P) = (xp - x) · U costs one GEMM, not two.
    gradient = _projector(g, V.float().transpose(1, 2) * s.float().unsqueeze(1))
    if partner is None:
        project = _projector(x, U)
        spread = None if mean else pmax - pmin
        anchor = pmean if mean else pmax
    else:
        project = _projector(partner, U, minus=x)
    for start in range(0, R, step):
        stop = min(R, start + step)
        sG = gradient(start, stop)
        if partner is None:
            p = pos[start:stop]
            # The GEMM writes Q - P straight into the gathered anchor rows. For the max,
            # with s >= 0 the best partner is Pmax where sG >= 0 and Pmin = Pmax - spread
            # elsewhere, so (Q - P) sG = (Pmax - P) sG - spread min(sG, 0): no select.
            gain = project(start, stop, minus_from=anchor.index_select(0, p)).mul_(sG)
            if not mean:
                gain.addcmul_(spread.index_select(0, p), sG.clamp_(max=0), value=-1)
        else:
            gain = project(start, stop).mul_(sG)
        w = None if weight is None else weight[start:stop]
        if mean:
            flat = gain.reshape(stop - start, -1)
            out.view(-1).add_(flat.sum(0) if w is None else w @ flat)
            continue
        if w is not None:
            # -inf, not 0: a dropped row must never win the max, even if every real gain is negative.
            gain.masked_fill_((w == 0).view(-1, 1, 1), -torch.inf)
        torch.maximum(out, gain.amax(0), out=out)


def _use_triton(backend: Backend, x: torch.Tensor) -> bool:
    if backend == "auto":
        # The torch path runs on any device, so a GPU without Triton still works.
        return x.is_cuda and importlib.util.find_spec("triton") is not None
    if backend not in ("torch", "triton"):
        raise ArgumentError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend == "triton"


def _block_rows(H: int, r: int) -> int:
    return max(1, BLOCK_ELEMS // (H * r))


def _is_shared(t: torch.Tensor) -> bool:
    """True when every head reads the same row vector (H == 1 or stride 0 over H)."""
    return t.shape[1] == 1 or t.stride(1) == 0


def _projector(
    t: torch.Tensor, W: torch.Tensor, minus: torch.Tensor | None = None
) -> Callable[..., torch.Tensor]:
    """Return ``project(start, stop, minus_from=None)`` giving ``(t - minus)[start:stop]
    · W`` as a float32 (block, H, r) tensor (``minus`` defaults to nothing), or, given a
    contiguous ``minus_from`` of that shape, ``minus_from - (t - minus)[start:stop] · W``
    written into it.

    t, minus: (R, H, k) and W: (H, k, r). Head-shared inputs use a single (block, k) x
    (k, H*r) GEMM, which is as many FLOPs as H small GEMMs but one wide call, and can
    subtract from ``minus_from`` inside the GEMM. Per-head inputs use one batched GEMM
    whose (H, block, r) result is returned as a transposed view: the elementwise ops
    after it read it in place, where a copy to (block, H, r) would be one more pass.
    """
    H, k, r = W.shape
    W = W.float()
    shared = _is_shared(t) and (minus is None or _is_shared(minus))
    if shared:
        W = W.permute(1, 0, 2).reshape(k, H * r)
        t = t[:, 0]
        minus = None if minus is None else minus[:, 0]

    def rows(start: int, stop: int) -> torch.Tensor:
        block = t[start:stop].float()
        return block if minus is None else block - minus[start:stop].float()

    def project(start: int, stop: int, minus_from: torch.Tensor | None = None) -> torch.Tensor:
        block = rows(start, stop)
        if shared:
            if minus_from is None:
                return (block @ W).view(stop - start, H, r)
            minus_from.view(stop - start, H * r).addmm_(block, W, alpha=-1)
            return minus_from
        P = torch.bmm(block.transpose(0, 1), W).transpose(0, 1)
        return P if minus_from is None else minus_from.sub_(P)

    return project


def _check(
    x: torch.Tensor,
    U: torch.Tensor,
    g: torch.Tensor | None,
    V: torch.Tensor | None,
    s: torch.Tensor | None,
    pos: torch.Tensor,
    pmax: torch.Tensor | None,
    pmin: torch.Tensor | None,
    out: torch.Tensor | None,
    partner: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    reduce: str = "max",
    pmean: torch.Tensor | None = None,
) -> None:
    if x.dim() != 3 or U.dim() != 3:
        raise ArgumentError("x must be (R, H, d_in) and U (H, d_in, r)")
    R, H, d_in = x.shape
    if U.shape[:2] != (H, d_in):
        raise ArgumentError(f"U shape {tuple(U.shape)} does not match x {tuple(x.shape)}")
    r = U.shape[2]
    if pos.shape != (R,) or pos.dtype != torch.int64:
        raise ArgumentError("pos must be an int64 tensor of shape (R,)")
    if g is None:
        for name, stat in (("pmax", pmax), ("pmin", pmin)):
            _check_stat(name, stat, H, r)
        return
    if reduce not in REDUCE:
        raise ArgumentError(f"reduce must be one of {REDUCE}, got {reduce!r}")
    if g.dim() != 3 or g.shape[:2] != (R, H):
        raise ArgumentError(f"g shape {tuple(g.shape)} does not match x {tuple(x.shape)}")
    if V.shape != (H, r, g.shape[2]) or s.shape != (H, r):
        raise ArgumentError("V must be (H, r, d_out) and s (H, r)")
    if out.shape != (H, r) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ArgumentError("out must be a contiguous float32 (H, r) tensor")
    if weight is not None and (weight.shape != (R,) or weight.dtype != torch.float32):
        raise ArgumentError("weight must be a float32 tensor of shape (R,)")
    if partner is not None:
        if partner.shape != x.shape:
            raise ArgumentError(f"partner shape {tuple(partner.shape)} != x shape {tuple(x.shape)}")
    elif reduce == "mean":
        _check_stat("pmean", pmean, H, r)
    else:
        for name, stat in (("pmax", pmax), ("pmin", pmin)):
            _check_stat(name, stat, H, r)


def _check_stat(name: str, stat: torch.Tensor | None, H: int, r: int) -> None:
    if stat is None or stat.dim() != 3 or stat.shape[1:] != (H, r):
        raise ArgumentError(f"{name} must be a (T, H, r) tensor")
    if stat.dtype != torch.float32 or not stat.is_contiguous():
        raise ArgumentError(f"{name} must be a contiguous float32 tensor")
