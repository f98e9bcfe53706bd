"""Attribution statistics (eigenfast.attribution, kernels/attribution_pass*.py) against the
plain PyTorch references of eigenfast.testing.reference.

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

from eigenfast.eigenprune import attribution
from eigenfast.eigenprune.attribution import pass1_update, pass2_update
from eigenfast.testing.reference import pair_statistics, per_singular_value_loop

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
TRITON_RUNS_HERE = INTERPRET or torch.cuda.is_available()


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


def fresh_stats(case: Case, device: str = DEVICE, reduce: str = "max"):
    shape = (T, case.heads, case.rank)
    pmax = torch.full(shape, -torch.inf, device=device)
    pmin = torch.full(shape, torch.inf, device=device)
    out = torch.full(shape[1:], -torch.inf if reduce == "max" else 0.0, device=device)
    return pmax, pmin, out


def mean_projection(d) -> torch.Tensor:
    """pmean[t] = mean of P over the rows at position t (what scoring derives from x̄[t])."""
    P = torch.einsum("rhk,hki->rhi", d["x"].float(), d["U"])
    total = torch.zeros(T, *P.shape[1:], device=P.device).index_add_(0, d["pos"], P)
    return total / torch.bincount(d["pos"], minlength=T).view(T, 1, 1)


def run_both_passes(d, case: Case, mode: str, backend: str, rows=slice(None), stats=None, reduce="max", weight=None):
    pmax, pmin, out = stats if stats is not None else fresh_stats(case, d["x"].device, reduce)
    x, g, pos = d["x"][rows], d["g"][rows], d["pos"][rows]
    pass1_update(x, d["U"], pos, pmax, pmin, backend=backend)
    partner = d["partner"][rows] if mode == "shift" else None
    pmean = mean_projection(d) if reduce == "mean" and mode == "all" else None
    pass2_update(
        x, g, d["U"], d["V"], d["s"], pos, pmax, pmin, out,
        partner=partner, weight=weight, reduce=reduce, pmean=pmean, backend=backend,
    )  # fmt: skip
    return pmax, pmin, out


def expected(d, mode: str, reduce: str = "max", weight=None):
    inputs = [d[k].float().cpu() for k in ("x", "g", "U", "V", "s")]
    partner = d["partner"].float().cpu() if mode == "shift" else None
    return pair_statistics(*inputs, d["pos"].cpu(), T, partner, weight, reduce)


def row_weights(d, reduce: str) -> torch.Tensor:
    """Every third row dropped (weight 0); for the mean, uneven positive weights on the rest."""
    R = len(d["pos"])
    keep = (torch.arange(R) % 3 != 0).float()
    w = keep if reduce == "max" else keep * (1 + torch.arange(R) % 4)
    return w.to(d["x"].device)


def assert_close(got, want, dtype: torch.dtype) -> None:
    # bf16 tolerances are loose because the Triton path rounds U and V to bf16 too.
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want):
        scale = b[b.isfinite()].abs().max()
        torch.testing.assert_close(a.cpu().double(), b.double(), rtol=rtol, atol=rtol * scale)


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


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("mode", ["all", "shift"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_row_weights_and_mean(case, mode, reduce, small_blocks):
    d = make_rows(case, torch.float32, device="cpu")
    w = row_weights(d, reduce)
    got = run_both_passes(d, case, mode, "torch", reduce=reduce, weight=w)
    assert_close(got, expected(d, mode, reduce, w), torch.float32)


def dropped_rows_case(backend: str, device: str) -> torch.Tensor:
    """One rank-one term, shift pairs, gain = partner: -1 on kept rows, +1 on dropped ones."""
    R = 10
    w = (torch.arange(R) % 2).float()
    x = torch.zeros(R, 1, 1)
    partner = torch.where(w == 1, -1.0, 1.0).view(R, 1, 1)
    one = torch.ones(1, 1, 1)
    out = torch.full((1, 1), -torch.inf)
    t = [v.to(device) for v in (x, torch.ones(R, 1, 1), one, one, one[0], torch.zeros(R, dtype=torch.long), out)]
    pass2_update(*t[:6], None, None, t[6], partner=partner.to(device), weight=w.to(device), backend=backend)
    return t[6]


def test_dropped_rows_never_win_the_max():
    # Masking to 0 instead of -inf would give 0 here.
    assert dropped_rows_case("torch", "cpu").item() == -1.0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pair_reference_agrees_with_per_singular_value_loop(case):
    d = make_rows(case, torch.float32, device="cpu")
    args = [d[k].double() for k in ("x", "g", "U", "V", "s")]
    _, _, score = pair_statistics(*args, d["pos"], T, d["partner"].double())
    torch.testing.assert_close(score, per_singular_value_loop(*args, d["partner"].double()), rtol=1e-9, atol=1e-9)


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
    args = [d[k] for k in ("x", "g", "U", "V", "s", "pos")]
    with pytest.raises(ValueError):
        pass1_update(d["x"], d["U"][:, :-1], d["pos"], pmax, pmin)
    with pytest.raises(ValueError):
        pass2_update(*args, None, None, out)
    with pytest.raises(ValueError):
        pass1_update(d["x"], d["U"], d["pos"], pmax, pmin, backend="numpy")
    with pytest.raises(ValueError, match="reduce must be one of"):
        pass2_update(*args, pmax, pmin, out, reduce="sum")
    with pytest.raises(ValueError, match="pmean"):
        pass2_update(*args, pmax, pmin, out, reduce="mean")
    with pytest.raises(ValueError, match="weight"):
        pass2_update(*args, pmax, pmin, out, weight=torch.ones(3))


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
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("mode", ["all", "shift"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_row_weights_and_mean(case, mode, reduce):
    d = make_rows(case, torch.float32)
    w = row_weights(d, reduce)
    got = run_both_passes(d, case, mode, "triton", reduce=reduce, weight=w)
    assert_close(got, expected(d, mode, reduce, w.cpu()), torch.float32)


@needs_triton
def test_triton_dropped_rows_never_win_the_max():
    assert dropped_rows_case("triton", DEVICE).item() == -1.0


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
    root = Path(__file__).resolve().parents[2]
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
