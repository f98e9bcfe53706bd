"""Pass 1 of the attribution statistics: per-position extrema of P = X · U (docs/MATH.md §2, §5).

Each program owns a (rows block, head, rank block) tile: it computes the P tile on chip
with an fp32 accumulator and folds it into ``pmax``/``pmin`` (T, H, r) with fp32
atomic max/min at ``pos[row]``.

Why atomics rather than sorting rows by position: the caller's rows come sequence by
sequence, so the rows of one tile mostly hit distinct positions and the atomics
rarely contend; each atomic is paid once per P element, which costs d_in
multiply-adds, so they are cheap next to the GEMM. Sorting would need an extra pass
and a permuted copy of X (R x d_in) for no gain in the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pass1_kernel(
    x_ptr,
    u_ptr,
    pos_ptr,
    pmax_ptr,
    pmin_ptr,
    R,
    H,
    D_IN,
    RANK,
    stride_xr,
    stride_xh,
    stride_xk,
    stride_uh,
    stride_uk,
    stride_un,
    stride_st,
    stride_sh,
    stride_sn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_TYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Rank blocks vary fastest, then heads, so neighbouring programs share a row block
    # of X and (for head-shared X, stride_xh == 0) read it from L2.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(RANK, BLOCK_N)
    pid_n = pid % n_blocks
    h = (pid // n_blocks) % H
    pid_r = pid // (n_blocks * H)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < RANK
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xr + h * stride_xh
    u_cols = u_ptr + h * stride_uh + cols[None, :] * stride_un

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D_IN
        x_mask = row_ok[:, None] & k_ok[None, :]
        u_mask = k_ok[:, None] & col_ok[None, :]
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=x_mask, other=0.0)
        u = tl.load(u_cols + ks[:, None] * stride_uk, mask=u_mask, other=0.0)
        acc = tl.dot(x.to(DOT_TYPE), u.to(DOT_TYPE), acc, input_precision=PRECISION)

    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    offsets = pos[:, None] * stride_st + h * stride_sh + cols[None, :] * stride_sn
    mask = row_ok[:, None] & col_ok[None, :]
    tl.atomic_max(pmax_ptr + offsets, acc, mask=mask)
    tl.atomic_min(pmin_ptr + offsets, acc, mask=mask)


def dot_type(dtype: torch.dtype) -> tl.dtype:
    """Element type the tiles enter tl.dot with: the input's own, except bf16 under
    TRITON_INTERPRET, whose tl.dot multiplies bf16 bit patterns (triton-lang/triton
    #11584, unsupported there): the interpreter gets float32 tiles instead."""
    if dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[
        dtype
    ]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use 3xTF32: close to fp32 but on tensor cores. Plain TF32 would
    round P to ~1e-3, and pass 2 subtracts nearly equal P values."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def tile_sizes(rank: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_K); tl.dot needs every dimension >= 16."""
    return 64, min(64, max(16, triton.next_power_of_2(rank))), 64


def pass1_update(
    x: torch.Tensor,
    U: torch.Tensor,
    pos: torch.Tensor,
    pmax: torch.Tensor,
    pmin: torch.Tensor,
) -> None:
    """Triton version of ``eigenfast.attribution.pass1_update`` (inputs validated there).

    x: (R, H, d_in), any strides (stride 0 over H allowed); U: (H, d_in, r), cast to
    x's dtype; pmax/pmin: contiguous (T, H, r) float32, updated in place.
    """
    R, H, d_in = x.shape
    rank = U.shape[2]
    if R == 0:
        return
    U = U.to(x.dtype)
    block_r, block_n, block_k = tile_sizes(rank)
    grid = (triton.cdiv(R, block_r) * H * triton.cdiv(rank, block_n),)
    _pass1_kernel[grid](
        x,
        U,
        pos,
        pmax,
        pmin,
        R,
        H,
        d_in,
        rank,
        *x.stride(),
        *U.stride(),
        *pmax.stride(),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_TYPE=dot_type(x.dtype),
        PRECISION=dot_precision(x.dtype),
    )
