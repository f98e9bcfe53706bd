"""Benchmark of the attribution statistics (eigenfast.attribution) on GPT-2-small shapes.

Prints three tables, all measured in this run on the same activations and gradients:

(a) ours vs. the eigenpruning reference code's loop over singular values ("shift"
    pairs: for each i project x' - x on u_i, expand it along v_i to a (rows, heads,
    d_out) change, dot it with the gradient; eigenfast.testing.reference). The loop
    costs the same for every i, so only ``--ref-iters`` of its iterations are timed
    and the total is scaled up by r/iters.
(b) our throughput as a fraction of the matmul limit: the time torch.matmul/bmm need
    for GEMMs of the same M, N, K as ours, in one call each, over our time.
(c) memory against the number of rows: the statistics are O(T x H x r) and our working
    memory is bounded by a row block; the reference loop's grows with the rows.

Usage: python benches/bench_attribution.py [--device cuda] [--rows 8192] [--threads N]
On CUDA the Triton kernels run (backend "auto") and memory is torch's peak allocation;
on the CPU the fast path runs and memory is the peak resident set (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eigenfast.eigenprune.attribution import pass1_update, pass2_update
from eigenfast.testing.reference import per_singular_value_loop  # noqa: E402

T = 128  # positions: rows are R/T sequences of T tokens


@dataclass(frozen=True)
class Component:
    name: str
    heads: int
    d_in: int
    d_out: int
    x_shared: bool
    g_shared: bool

    @property
    def rank(self) -> int:
        return min(self.d_in, self.d_out)


COMPONENTS = [
    # k: every head reads the residual stream; the gradient is per head.
    Component("attn k (12x768->64)", heads=12, d_in=768, d_out=64, x_shared=True, g_shared=False),
    # MLP up projection: one matrix, r = 768.
    Component("mlp_in (768->3072)", heads=1, d_in=768, d_out=3072, x_shared=True, g_shared=True),
]


# --------------------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds(
    fns: dict[str, Callable[[], object]], device: str, repeat: int = 5
) -> dict[str, float]:
    """Best time of each function over ``repeat`` rounds, after a warm-up round. The
    functions take turns within a round, so load from other processes on a shared
    machine hits all of them alike."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


class PeakMemory:
    """Extra memory a call needs beyond what is already allocated, in bytes.

    CUDA: torch's peak-allocation counter. CPU: the kernel's resident-set high-water
    mark, reset through /proc/self/clear_refs; glibc is told to serve every allocation
    above 64 KiB with mmap so that freed blocks leave the resident set and the next
    allocation shows up in it again. None where that is not available.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.cpu_ok = False
        if device == "cpu":
            try:
                libc = ctypes.CDLL("libc.so.6")
                self.cpu_ok = libc.mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD
                self.trim = libc.malloc_trim
                self._reset()
            except OSError:
                self.cpu_ok = False

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __call__(self, fn: Callable[[], object]) -> int | None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        if not self.cpu_ok:
            return None
        self.trim(0)
        self._reset()
        base = self._status("VmRSS:")
        fn()
        return self._status("VmHWM:") - base


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


# --------------------------------------------------------------------------- workloads


def make_inputs(
    c: Component, rows: int, device: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    H = c.heads

    def acts(width: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.randn(rows, 1 if shared else H, width, generator=gen).to(device, dtype)
        # The shift partner of a row: the same token of the previous sequence.
        return base.expand(rows, H, width), base.roll(T, dims=0).expand(rows, H, width)

    x, partner = acts(c.d_in, c.x_shared)
    U, s, V = torch.linalg.svd(torch.randn(H, c.d_in, c.d_out, generator=gen), full_matrices=False)
    return {
        "x": x,
        "partner": partner,
        "g": acts(c.d_out, c.g_shared)[0],
        "U": U.to(device),
        "V": V.to(device),
        "s": s.to(device),
        "pos": (torch.arange(rows) % T).to(device),
    }


def stats(c: Component, device: str):
    shape = (T, c.heads, c.rank)
    return (
        torch.full(shape, -torch.inf, device=device),
        torch.full(shape, torch.inf, device=device),
        torch.full(shape[1:], -torch.inf, device=device),
    )


def ours_shift(d, c: Component) -> torch.Tensor:
    _, _, out = stats(c, d["x"].device.type)
    args = [d[k] for k in ("x", "g", "U", "V", "s", "pos")]
    pass2_update(*args, None, None, out, partner=d["partner"])
    return out


def ours_all(d, c: Component) -> torch.Tensor:
    pmax, pmin, out = stats(c, d["x"].device.type)
    pass1_update(d["x"], d["U"], d["pos"], pmax, pmin)
    pass2_update(d["x"], d["g"], d["U"], d["V"], d["s"], d["pos"], pmax, pmin, out)
    return out


def reference_loop(d, iters: int | None = None) -> torch.Tensor:
    """The eigenpruning reference code's scoring, shift pairs (the shared reference)."""
    x, partner, g, U, V, s = (d[k].float() for k in ("x", "partner", "g", "U", "V", "s"))
    return per_singular_value_loop(x, g, U, V, s, partner, iters)


def gemm_limit(d, c: Component, mode: str) -> Callable[[], None]:
    """torch.matmul on GEMMs with the M, N, K of ours, one call each over all rows: the
    time they take is the limit our scoring could reach. Operands come in the dtype our
    GEMMs run in: the input's for the Triton kernels, float32 for the CPU path."""
    R, H = d["x"].shape[:2]
    device, r = d["x"].device, c.rank
    dtype = d["x"].dtype if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)

    def operands(k: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if shared:  # (R, k) x (k, H*r)
            a, b = torch.randn(R, k, generator=gen), torch.randn(k, H * r, generator=gen)
        else:  # H x (R, k) x (k, r)
            a, b = torch.randn(H, R, k, generator=gen), torch.randn(H, k, r, generator=gen)
        return a.to(device, dtype), b.to(device, dtype)

    gemms = [operands(c.d_in, c.x_shared), operands(c.d_out, c.g_shared)]
    if mode == "all":  # pass 1 computes P once more
        gemms.append(gemms[0])

    def run() -> None:
        for a, b in gemms:
            torch.matmul(a, b)

    return run


# --------------------------------------------------------------------------- tables


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--ref-iters", type=int, default=4, help="reference-loop iterations timed")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds, best kept")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    memory = PeakMemory(device)
    threads = torch.get_num_threads()
    print(f"device={device} dtype={args.dtype} rows={args.rows} positions={T} threads={threads}")

    speed, limit, mem = [], [], []
    for c in COMPONENTS:
        d = make_inputs(c, args.rows, device, dtype)
        iters = min(args.ref_iters, c.rank)
        t_ref = seconds({"ref": lambda: reference_loop(d, iters)}, device, repeat=1)["ref"]
        t_ref *= c.rank / iters
        t = seconds(
            {
                "shift": lambda: ours_shift(d, c),
                "all": lambda: ours_all(d, c),
                "limit shift": gemm_limit(d, c, "shift"),
                "limit all": gemm_limit(d, c, "all"),
            },
            device,
            repeat=args.repeat,
        )
        want = reference_loop(d, iters)[:, :iters]
        same = torch.allclose(ours_shift(d, c)[:, :iters], want, rtol=1e-3, atol=1e-3)
        speed.append([c.name, f"{t_ref:.2f}", f"{t['shift'] * 1e3:.1f}",
                      f"{t_ref / t['shift']:.0f}x", f"{t['all'] * 1e3:.1f}",
                      "yes" if same else "NO"])  # fmt: skip
        for mode in ("shift", "all"):
            t_mm = t[f"limit {mode}"]
            limit.append([c.name, mode, f"{t[mode] * 1e3:.1f}", f"{t_mm * 1e3:.1f}",
                          f"{t_mm / t[mode]:.0%}"])  # fmt: skip
        for rows in (args.rows // 4, args.rows, args.rows * 2):
            d = make_inputs(c, rows, device, dtype)
            stat_bytes = sum(st.numel() * st.element_size() for st in stats(c, device))
            mem.append([c.name, str(rows), mib(stat_bytes), mib(memory(lambda: ours_all(d, c))),
                        mib(memory(lambda: reference_loop(d, 1)))])  # fmt: skip
        del d

    table(
        "(a) scoring time, shift pairs: reference per-singular-value loop vs ours",
        ["component", "reference s", "ours shift ms", "speed-up", "ours all ms (pass 1+2)",
         "same scores"],  # fmt: skip
        speed,
    )
    table(
        "(b) ours vs. the matmul limit (same M, N, K GEMMs, one torch.matmul each)",
        ["component", "mode", "ours ms", "matmul ms", "fraction of limit"],
        limit,
    )
    table(
        "(c) memory (MiB) against rows: statistics, and working memory beyond the inputs",
        ["component", "rows", "statistics", "ours pass 1+2", "reference loop"],
        mem,
    )


if __name__ == "__main__":
    main()
