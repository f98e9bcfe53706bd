"""What a position-indexed bias costs: eigenfast::token_bias_linear against nn.Linear.

    python benches/bench_token_bias.py [--device cuda] [--dtype bfloat16] [--min-run-time 1] [--threads N]

Both sides get the same x and weight; nn.Linear adds its one bias row, the op gathers
a row per token (positions 0..tokens-1, expanded over the batch as eigenfast's modules
pass them). Times are medians over alternating rounds of torch.utils.benchmark blocks.
The fallback (pure PyTorch, as when the extension is not built) runs in a child
process with EIGENFAST_DISABLE_EXTENSION=1, its ratio taken against nn.Linear timed in
that child.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import benchmark

from eigenfast.ops import extension_available, token_bias_linear

SHAPES = [(1, 1), (8, 128), (32, 512)]  # batch × tokens
WIDTHS = [(768, 768), (768, 3072)]  # d_in → d_out


def paired_medians(candidates: dict[str, Callable[[], object]], min_run_time: float, rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternating rounds so that
    load drifting during the run (a shared machine) hits every candidate alike."""
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds).median)
    return {name: statistics.median(times) for name, times in samples.items()}


def measure(device: str, dtype: torch.dtype, min_run_time: float, rounds: int) -> list[dict]:
    results = []
    for batch, tokens in SHAPES:
        for d_in, d_out in WIDTHS:
            linear = nn.Linear(d_in, d_out, device=device, dtype=dtype)
            x = torch.randn(batch, tokens, d_in, device=device, dtype=dtype)
            table = torch.randn(tokens, d_out, device=device, dtype=dtype)
            pos = torch.arange(tokens, device=device).expand(batch, tokens)
            with torch.inference_mode():
                times = paired_medians({
                    "linear": lambda: linear(x),
                    "op": lambda: token_bias_linear(x, linear.weight, table, pos),
                }, min_run_time, rounds)
            results.append({"shape": f"{batch}×{tokens}", "widths": f"{d_in}→{d_out}", **times})
    return results


def measure_fallback(args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "EIGENFAST_DISABLE_EXTENSION": "1"}
    command = [sys.executable, __file__, "--child", "--device", args.device, "--dtype", args.dtype,
               "--min-run-time", str(args.min_run_time), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    child = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
    return json.loads(child.stdout)


def microseconds(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"


def print_table(native: list[dict], fallback: list[dict], args: argparse.Namespace) -> None:
    print(f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"extension {'built' if extension_available() else 'NOT built (op column = fallback)'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = ("batch×tokens", "d_in→d_out", "nn.Linear", "token-bias op", "op/linear", "fallback", "fallback/linear")
    rows = [header]
    for ours, theirs in zip(native, fallback):
        rows.append((ours["shape"], ours["widths"], microseconds(ours["linear"]), microseconds(ours["op"]),
                     f"{ours['op'] / ours['linear']:.2f}x", microseconds(theirs["op"]),
                     f"{theirs['op'] / theirs['linear']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per candidate and cell")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per cell; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    native = measure(args.device, getattr(torch, args.dtype), args.min_run_time, args.rounds)
    if args.child:
        json.dump(native, sys.stdout)
    else:
        print_table(native, measure_fallback(args), args)


if __name__ == "__main__":
    main()
