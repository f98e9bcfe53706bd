"""SVD routes for the per-head factors at GPT-2-small shapes: time and accuracy against
float64 ``torch.linalg.svd`` (docs/DESIGN.md, "SVD").

Table 1: random Gaussian weights (well conditioned). Table 2: relative error of the
singular values when they spread log-uniformly over a condition number κ, which is
where the Gram route loses accuracy.

    OMP_NUM_THREADS=1 python benches/bench_svd.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eigenfast.eigenprune.svd import thin_svd

SHAPES = {
    "q/k/v heads 12 x (768x64)": (12, 768, 64),
    "o heads 12 x (64x768)": (12, 64, 768),
    "mlp_in 768x3072": (1, 768, 3072),
    "mlp_out 3072x768": (1, 3072, 768),
}


def direct(A: torch.Tensor):
    return torch.linalg.svd(A, full_matrices=False)


def gram(A: torch.Tensor):
    """Eigendecomposition of the small Gram matrix: fast, but it squares the condition number."""
    tall = A.shape[-2] >= A.shape[-1]
    B = A if tall else A.mT
    w, W = torch.linalg.eigh(B.mT @ B)
    s, W = w.flip(-1).clamp_min(0).sqrt(), W.flip(-1)
    U = (B @ W) / s.unsqueeze(-2)
    return (U, s, W.mT) if tall else (W, s, U.mT)


METHODS = {"torch.linalg.svd f64": direct, "QR + SVD(R) f64 (ours)": thin_svd, "Gram eigh f64": gram}


def errors(A: torch.Tensor, out, s0: torch.Tensor) -> tuple[float, float, float]:
    U, s, V = (t.double() for t in out)
    eye = torch.eye(s.shape[-1], dtype=torch.float64)
    rel_s = float(((s - s0).abs() / s0).max())
    recon = float(((U * s.unsqueeze(-2)) @ V - A).abs().max() / A.abs().max())
    orth = max(float((U.mT @ U - eye).abs().max()), float((V @ V.mT - eye).abs().max()))
    return rel_s, recon, orth


def conditioned(H: int, m: int, n: int, kappa: float) -> torch.Tensor:
    r = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(H, m, r, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(H, n, r, dtype=torch.float64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)
    return (Q1 * s) @ Q2.mT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat}\n")
    print("| shape | method | time (ms) | max rel. error of s | reconstruction error | orthonormality |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        A = torch.randn(*shape, dtype=torch.float64) * 0.02
        s0 = direct(A)[1]
        for method, fn in {**METHODS, "torch.linalg.svd f32": direct}.items():
            X = A.float() if method.endswith("f32") else A
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                out = fn(X)
                best = min(best, time.perf_counter() - start)
            e = errors(A, out, s0)
            print(f"| {name} | {method} | {best * 1e3:.1f} | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} |")
    print("\n| κ | shape | method | max rel. error of s |")
    print("|---|---|---|---|")
    for kappa in (1e2, 1e4, 1e6):
        for name in ("q/k/v heads 12 x (768x64)", "mlp_in 768x3072"):
            A = conditioned(*SHAPES[name], kappa)
            s0 = direct(A)[1]
            for method in ("QR + SVD(R) f64 (ours)", "Gram eigh f64"):
                print(f"| {kappa:.0e} | {name} | {method} | {errors(A, METHODS[method](A), s0)[0]:.1e} |")


if __name__ == "__main__":
    main()
