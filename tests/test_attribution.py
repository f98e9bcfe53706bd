"""Attribution statistics (eigenfast.attribution, kernels/attribution_pass*.py) against a
plain PyTorch reference.

The Triton kernels run on the GPU when there is one; otherwise
``test_kernels_in_interpreter`` re-runs this file's ``test_triton_*`` tests in a child
process with ``TRITON_INTERPRET=1``. A child is needed because the variable only takes
effect for kernels defined after it is set, and other test modules may already have
imported Triton kernels in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from eigenfast import attribution
from eigenfast.attribution import pass1_update, pass2_update

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
TRITON_RUNS_HERE = INTERPRET or torch.cuda.is_available()


# --------------------------------------------------------------------------- reference


def reference(x, g, U, V, s, pos, T, partner=None):
    """Naive statistics: P and G for all rows, and in "all" mode every (row, partner)
    pair at the same position tried explicitly (O(R^2), no Pmax/Pmin shortcut).

    Returns (pmax, pmin, score) with pmax/pmin (T, H, r) and score (H, r).
    """
    x, g, U, V, s = (t.double() for t in (x, g, U, V, s))
    P = torch.einsum("rhk,hki->rhi", x, U)
    G = torch.einsum("rho,hio->rhi", g, V)
    at_t = (pos[None, :] == torch.arange(T, device=pos.device)[:, None])[..., None, None]
    pmax = torch.where(at_t, P, -torch.inf).amax(1)
    pmin = torch.where(at_t, P, torch.inf).amin(1)
    if partner is None:
        same_pos = (pos[:, None] == pos[None, :])[..., None, None]
        gain = s * (P[None, :] - P[:, None]) * G[:, None]  # [row, partner, h, i]
        score = torch.where(same_pos, gain, -torch.inf).amax((0, 1))
    else:
        Pp = torch.einsum("rhk,hki->rhi", partner.double(), U)
        score = (s * (Pp - P) * G).amax(0)
    return pmax.float(), pmin.float(), score.float()


def reference_loop(x, g, U, V, s, pos, T, partner):
    """Shift-mode score the way the eigenpruning reference code computes it: one
    rank-one matrix E_i = s_i u_i v_i^T at a time, ΔL_i = max <(x' - x) E_i, g>."""
    H, _, r = U.shape
    score = torch.empty(H, r)
    for h in range(H):
        for i in range(r):
            E = s[h, i] * torch.outer(U[h, :, i], V[h, i])
            delta = (partner[:, h] - x[:, h]).double() @ E.double()
            score[h, i] = (delta * g[:, h].double()).sum(-1).max()
    return score


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    d_in: int
    d_out: int
    x_shared: bool  # stride 0 over heads (q/k/v, MLP)
    g_shared: bool  # stride 0 over heads (o, MLP)

    @property
    def rank(self) -> int:
        return min(self.d_in, self.d_out)


CASES = [
    Case("k-like", heads=3, d_in=16, d_out=12, x_shared=True, g_shared=False),  # r = 12
    Case("o-like", heads=3, d_in=5, d_out=20, x_shared=False, g_shared=True),  # r = 5
    Case("mlp", heads=1, d_in=12, d_out=20, x_shared=True, g_shared=True),
    Case("per-head", heads=3, d_in=7, d_out=9, x_shared=False, g_shared=False),
]
T = 9


def make_rows(case: Case, dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    """Rows of a few padded-away sequences of uneven length (so positions repeat
    unevenly and R is not a multiple of any block size), plus SVD-like factors."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 7, 9, 2, 8, 9, 5, 6, 9, 3]
    pos = torch.cat([torch.arange(n) for n in lengths])
    R, H = len(pos), case.heads

    def rows(width: int, shared: bool) -> torch.Tensor:
        base = torch.randn(R, 1 if shared else H, width, generator=gen).to(dtype)
        return base.expand(R, H, width)

    x = rows(case.d_in, case.x_shared)
    g = rows(case.d_out, case.g_shared)
    partner = rows(case.d_in, case.x_shared)
    U = torch.randn(H, case.d_in, case.rank, generator=gen)
    V = torch.randn(H, case.rank, case.d_out, generator=gen)
    s = torch.rand(H, case.rank, generator=gen) * 3
    out = [t.to(device) for t in (x, g, partner, U, V, s, pos)]
    return dict(zip(("x", "g", "partner", "U", "V", "s", "pos"), out))


def fresh_stats(case: Case, device: str = DEVICE):
    shape = (T, case.heads, case.rank)
    pmax = torch.full(shape, -torch.inf, device=device)
    pmin = torch.full(shape, torch.inf, device=device)
    out = torch.full(shape[1:], -torch.inf, device=device)
    return pmax, pmin, out


def run_both_passes(d, case: Case, mode: str, backend: str, rows=slice(None), stats=None):
    pmax, pmin, out = stats if stats is not None else fresh_stats(case, d["x"].device)
    x, g, pos = d["x"][rows], d["g"][rows], d["pos"][rows]
    pass1_update(x, d["U"], pos, pmax, pmin, backend=backend)
    partner = d["partner"][rows] if mode == "shift" else None
    pass2_update(
        x, g, d["U"], d["V"], d["s"], pos, pmax, pmin, out, partner=partner, backend=backend
    )
    return pmax, pmin, out


def expected(d, mode: str):
    inputs = [d[k].float().cpu() for k in ("x", "g", "U", "V", "s")]
    partner = d["partner"].float().cpu() if mode == "shift" else None
    return reference(*inputs, d["pos"].cpu(), T, partner)


def assert_close(got, want, dtype: torch.dtype) -> None:
    # bf16 tolerances are loose because the Triton path rounds U and V to bf16 too.
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        scale = b[b.isfinite()].abs().max()
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- CPU path


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so R is split into many blocks with a ragged last one."""
    monkeypatch.setattr(attribution, "BLOCK_ELEMS", 200)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["all", "shift"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_matches_reference(case, mode, dtype, small_blocks):
    d = make_rows(case, dtype, device="cpu")
    assert_close(run_both_passes(d, case, mode, "torch"), expected(d, mode), dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_agrees_with_per_singular_value_loop(case):
    d = make_rows(case, torch.float32, device="cpu")
    args = [d[k] for k in ("x", "g", "U", "V", "s", "pos")]
    _, _, score = reference(*args, T, d["partner"])
    torch.testing.assert_close(score, reference_loop(*args, T, d["partner"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["all", "shift"])
def test_torch_running_update_equals_one_call(mode, small_blocks):
    case = CASES[0]
    d = make_rows(case, torch.float32, device="cpu")
    whole = run_both_passes(d, case, mode, "torch")
    # Pass 2 of the first half needs the pass-1 statistics of all rows in "all" mode.
    split = fresh_stats(case, "cpu")
    pass1_update(d["x"], d["U"], d["pos"], split[0], split[1], backend="torch")
    for rows in (slice(0, 30), slice(30, None)):
        partner = d["partner"][rows] if mode == "shift" else None
        pass2_update(
            d["x"][rows], d["g"][rows], d["U"], d["V"], d["s"], d["pos"][rows],
            split[0], split[1], split[2], partner=partner, backend="torch",
        )  # fmt: skip
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pass1_running_update_equals_one_call(small_blocks):
    case = CASES[1]
    d = make_rows(case, torch.float32, device="cpu")
    whole, halves = fresh_stats(case, "cpu"), fresh_stats(case, "cpu")
    pass1_update(d["x"], d["U"], d["pos"], whole[0], whole[1])
    for rows in (slice(0, 41), slice(41, None)):
        pass1_update(d["x"][rows], d["U"], d["pos"][rows], halves[0], halves[1])
    for a, b in zip(halves[:2], whole[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shift_mode_needs_no_pass1_statistics():
    case = CASES[0]
    d = make_rows(case, torch.float32, device="cpu")
    _, _, out = fresh_stats(case, "cpu")
    args = [d[k] for k in ("x", "g", "U", "V", "s", "pos")]
    pass2_update(*args, None, None, out, partner=d["partner"])
    assert out.isfinite().all()


def test_rejects_bad_shapes():
    case = CASES[0]
    d = make_rows(case, torch.float32, device="cpu")
    pmax, pmin, out = fresh_stats(case, "cpu")
    with pytest.raises(ValueError):
        pass1_update(d["x"], d["U"][:, :-1], d["pos"], pmax, pmin)
    with pytest.raises(ValueError):
        pass2_update(d["x"], d["g"], d["U"], d["V"], d["s"], d["pos"], None, None, out)
    with pytest.raises(ValueError):
        pass1_update(d["x"], d["U"], d["pos"], pmax, pmin, backend="numpy")


# --------------------------------------------------------------------------- Triton

needs_triton = pytest.mark.skipif(
    not TRITON_RUNS_HERE, reason="no GPU; run by test_kernels_in_interpreter in a child process"
)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["all", "shift"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_matches_reference(case, mode, dtype):
    d = make_rows(case, dtype)
    assert_close(run_both_passes(d, case, mode, "triton"), expected(d, mode), dtype)


@needs_triton
@pytest.mark.parametrize("mode", ["all", "shift"])
def test_triton_running_update_equals_one_call(mode):
    case = CASES[1]
    d = make_rows(case, torch.float32)
    whole = run_both_passes(d, case, mode, "triton")
    split = fresh_stats(case)
    pass1_update(d["x"], d["U"], d["pos"], split[0], split[1], backend="triton")
    for rows in (slice(0, 30), slice(30, None)):
        partner = d["partner"][rows] if mode == "shift" else None
        pass2_update(
            d["x"][rows], d["g"][rows], d["U"], d["V"], d["s"], d["pos"][rows],
            split[0], split[1], split[2], partner=partner, backend="triton",
        )  # fmt: skip
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(TRITON_RUNS_HERE, reason="Triton tests run directly in this process")
def test_kernels_in_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    cmd += ["-k", "test_triton_"]
    child = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]
