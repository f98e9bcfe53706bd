"""Pass 2 of the attribution statistics: out[h, i] = max_row s (Q - P) G (docs/MATH.md §2, §5).

Each program owns a (rows block, head, rank block) tile. It computes on chip
P = X · U[h] (d_in loop) and G = Grad · V[h]^T (d_out loop) with fp32 accumulators,
combines them with the partner term Q, max-reduces over its rows and atomically
maxes the (rank block,) result into out (H, r). Neither P nor G ever reaches memory.

Q is, per row, either the best partner at the row's position (``pmax``/``pmin`` from
pass 1, "all" mode) or Xp · U[h] for an explicit partner row Xp ("shift" mode).

MEAN mode sums ``w · s (Q - P) G`` over rows instead (Q: the mean partner ``pmean``
at the row's position, or Xp · U[h]) and atomically adds into out. Rows of weight 0
never win the max (their gain is -inf): callers hand in padding rows too rather
than compacting the real ones with a host-synchronising boolean mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attribution_pass1 import dot_precision, dot_type, tile_sizes


@triton.jit
def _pass2_kernel(
    x_ptr,
    xp_ptr,
    g_ptr,
    u_ptr,
    v_ptr,
    s_ptr,
    pos_ptr,
    w_ptr,
    pmax_ptr,
    pmin_ptr,
    out_ptr,
    R,
    H,
    D_IN,
    D_OUT,
    RANK,
    stride_xr,
    stride_xh,
    stride_xk,
    stride_pr,
    stride_ph,
    stride_pk,
    stride_gr,
    stride_gh,
    stride_go,
    stride_uh,
    stride_uk,
    stride_un,
    stride_vh,
    stride_vn,
    stride_vo,
    stride_sh,
    stride_sn,
    stride_st,
    stride_th,
    stride_tn,
    stride_oh,
    stride_on,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_TYPE_X: tl.constexpr,
    DOT_TYPE_G: tl.constexpr,
    PRECISION_X: tl.constexpr,
    PRECISION_G: tl.constexpr,
):
    # Same program order as pass 1: rank blocks fastest, then heads, then row blocks.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(RANK, BLOCK_N)
    pid_n = pid % n_blocks
    h = (pid // n_blocks) % H
    pid_r = pid // (n_blocks * H)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < RANK
    rows64 = rows.to(tl.int64)

    # P (and the partner's Pp) over d_in. Shift mode runs two dots rather than one on
    # Xp - X so that 16-bit inputs stay on the 16-bit tensor-core path.
    x_rows = x_ptr + rows64[:, None] * stride_xr + h * stride_xh
    xp_rows = xp_ptr + rows64[:, None] * stride_pr + h * stride_ph
    u_cols = u_ptr + h * stride_uh + cols[None, :] * stride_un
    p = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    pp = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D_IN
        x_mask = row_ok[:, None] & k_ok[None, :]
        u_mask = k_ok[:, None] & col_ok[None, :]
        u = tl.load(u_cols + ks[:, None] * stride_uk, mask=u_mask, other=0.0).to(DOT_TYPE_X)
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=x_mask, other=0.0)
        p = tl.dot(x.to(DOT_TYPE_X), u, p, input_precision=PRECISION_X)
        if SHIFT:
            xp = tl.load(xp_rows + ks[None, :] * stride_pk, mask=x_mask, other=0.0)
            pp = tl.dot(xp.to(DOT_TYPE_X), u, pp, input_precision=PRECISION_X)

    # G over d_out; V[h] is read transposed, as a (d_out, rank) tile.
    g_rows = g_ptr + rows64[:, None] * stride_gr + h * stride_gh
    v_cols = v_ptr + h * stride_vh + cols[None, :] * stride_vn
    grad = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_K):
        js = o0 + tl.arange(0, BLOCK_K)
        j_ok = js < D_OUT
        g_mask = row_ok[:, None] & j_ok[None, :]
        v_mask = j_ok[:, None] & col_ok[None, :]
        g = tl.load(g_rows + js[None, :] * stride_go, mask=g_mask, other=0.0)
        v = tl.load(v_cols + js[:, None] * stride_vo, mask=v_mask, other=0.0)
        grad = tl.dot(g.to(DOT_TYPE_G), v.to(DOT_TYPE_G), grad, input_precision=PRECISION_G)

    s = tl.load(s_ptr + h * stride_sh + cols * stride_sn, mask=col_ok, other=0.0).to(tl.float32)
    sg = grad * s[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SHIFT:
        gain = (pp - p) * sg
    else:
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        stats = pos[:, None] * stride_st + h * stride_th + cols[None, :] * stride_tn
        hi = tl.load(pmax_ptr + stats, mask=mask, other=0.0)  # pmean in MEAN mode
        if MEAN:
            gain = (hi - p) * sg
        else:
            # With s >= 0 the sign of s*G picks the partner, so (Q - P) s G is the larger
            # of the two candidates: no select on the sign needed.
            lo = tl.load(pmin_ptr + stats, mask=mask, other=0.0)
            gain = tl.maximum((hi - p) * sg, (lo - p) * sg)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    else:
        w = tl.where(row_ok, 1.0, 0.0)
    if MEAN:
        gain = tl.where(mask, gain * w[:, None], 0.0)
        tl.atomic_add(out_ptr + h * stride_oh + cols * stride_on, tl.sum(gain, axis=0), mask=col_ok)
    else:
        gain = tl.where(mask & (w[:, None] != 0.0), gain, float("-inf"))
        tl.atomic_max(out_ptr + h * stride_oh + cols * stride_on, tl.max(gain, axis=0), mask=col_ok)


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
    reduce: str = "max",
    pmean: torch.Tensor | None = None,
) -> None:
    """Triton version of ``eigenfast.attribution.pass2_update`` (inputs validated there).

    x/partner: (R, H, d_in) and g: (R, H, d_out), any strides (stride 0 over H allowed);
    U/V are cast to the dtype of x/g. pmax/pmin (max) or pmean (mean): contiguous
    (T, H, r) float32, unused in shift mode; weight: (R,) float32 or None; out: (H, r)
    float32, updated in place.
    """
    R, H, d_in = x.shape
    d_out = g.shape[2]
    rank = U.shape[2]
    if R == 0:
        return
    shift = partner is not None
    mean = reduce == "mean"
    U = U.to(x.dtype)
    V = V.to(g.dtype)
    if shift:
        partner = partner.to(x.dtype)
        pmax = pmin = out  # never read; any valid pointer will do
    elif mean:
        pmax = pmin = pmean  # the kernel reads the anchor through pmax_ptr
    block_r, block_n, block_k = tile_sizes(rank)
    grid = (triton.cdiv(R, block_r) * H * triton.cdiv(rank, block_n),)
    _pass2_kernel[grid](
        x,
        partner if shift else x,
        g,
        U,
        V,
        s,
        pos,
        out if weight is None else weight,  # never read without HAS_WEIGHT
        pmax,
        pmin,
        out,
        R,
        H,
        d_in,
        d_out,
        rank,
        *x.stride(),
        *(partner.stride() if shift else x.stride()),
        *g.stride(),
        *U.stride(),
        *V.stride(),
        *s.stride(),
        *(pmax.stride() if not shift else (0, 0, 0)),
        *out.stride(),
        SHIFT=shift,
        MEAN=mean,
        HAS_WEIGHT=weight is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_TYPE_X=dot_type(x.dtype),
        DOT_TYPE_G=dot_type(g.dtype),
        PRECISION_X=dot_precision(x.dtype),
        PRECISION_G=dot_precision(g.dtype),
    )
