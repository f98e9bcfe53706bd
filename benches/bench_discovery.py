"""Benchmark of circuit discovery (eigenfast.circuit.discover) against a literal Algorithm 1.

The literal loop (``eigenfast.testing.naive_discovery``, the tests' reference)
runs one full hook-ablated forward over D_v per candidate. Ours runs only the
layers from the visited one up (skipping what is pruned in all of them, and
the top layer's position-wise work past the last position), several
candidates stacked in one forward, with one host read per stacked group. Both
must return the same circuit (asserted). The model is GPT-2-shaped (by default
GPT-2 small: 12 layers x 12 heads, d_model 768, the full 50257-token
vocabulary) with random weights, perturbed like the test models so that heads
differ in importance; D_a and D_v are random left-padded prompts.

Usage: python benches/bench_discovery.py [--threshold 1e-3] [--val 16 128 ...] [--length 10]
       [--layers 12] [--heads 12] [--d-model 768] [--vocab 50257] [--batch-size 64] [--mlps both|yes|no]
       [--repeat 2] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, GPT2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EIGENFAST_QUIET", "1")

from eigenfast.circuit import discover  # noqa: E402
from eigenfast.data.task_data import TaskData
from eigenfast.testing.naive_discovery import naive_discover  # noqa: E402


def gpt2(layers: int, heads: int, d_model: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=layers, n_head=heads, n_embd=d_model, vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def prompts(n: int, length: int, vocab: int, seed: int) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length - 3, length + 1, (n,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)).long()
    ids = torch.randint(0, vocab, (n, length), generator=g) * mask
    return TaskData(ids, torch.zeros(n, dtype=torch.long), mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=1e-3)
    parser.add_argument("--patch", type=int, default=32, help="examples in D_a")
    parser.add_argument("--val", type=int, nargs="+", default=[16], help="examples in D_v (one row each)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--length", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per stacked forward (ours)")
    parser.add_argument("--mlps", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--ablation", choices=("mean", "zero"), default="mean")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each, interleaved (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = gpt2(args.layers, args.heads, args.d_model, args.vocab)
    patch = prompts(args.patch, args.length, args.vocab, seed=1)
    settings = {"both": (False, True), "yes": (True,), "no": (False,)}[args.mlps]
    print(
        f"GPT-2 shape {args.layers}x{args.heads} heads, d_model {args.d_model}, vocab {args.vocab}, random weights, "
        f"{torch.get_num_threads()} threads; |D_a|={args.patch} T={args.length}; {args.ablation} ablation, "
        f"alpha={args.threshold:g}, batch_size={args.batch_size}; best of {args.repeat} interleaved run(s) each, "
        "wall clock (process CPU time in brackets)\n"
    )
    header = (
        f"{'|D_v|':>5} | {'include_mlps':>12} | {'ours (s)':>14} | {'naive (s)':>14} | {'speed-up':>14} | "
        f"{'kept heads':>10} | {'kept mlps':>9} | {'evals/decisions':>15} | {'host reads':>10}"
    )
    print(header)
    print("-" * len(header))
    n_heads = args.layers * args.heads
    for n_val in args.val:
        val = prompts(n_val, args.length, args.vocab, seed=2)
        for include_mlps in settings:
            ours, naive = [], []
            for _ in range(args.repeat):
                with timed(ours):
                    found = discover(
                        model, patch, val, args.threshold, ablation=args.ablation, include_mlps=include_mlps,
                        batch_size=args.batch_size, progress=False,
                    )
                with timed(naive):
                    heads, mlps, _ = naive_discover(
                        model, patch, val, args.threshold, ablation=args.ablation, include_mlps=include_mlps
                    )
                assert (heads, mlps) == (found.heads, found.mlps), "the fast search changed a decision"
            (o_wall, o_cpu), (n_wall, n_cpu) = best(ours), best(naive)
            print(
                f"{n_val:>5} | {str(include_mlps):>12} | {o_wall:5.1f} [{o_cpu:5.1f}] | {n_wall:5.1f} [{n_cpu:5.1f}] | "
                f"{n_wall / o_wall:4.2f}x [{n_cpu / o_cpu:4.2f}x] | {len(found.heads):>4}/{n_heads:<5} | "
                f"{len(found.mlps):>4}/{args.layers:<4} | {found.evaluations:>7}/{len(found.kl_trace):<7} | "
                f"{found.rounds:>10}",
                flush=True,
            )


@contextlib.contextmanager
def timed(runs: list[tuple[float, float]]) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    runs.append((time.perf_counter() - wall, time.process_time() - cpu))


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(w for w, _ in runs), min(c for _, c in runs)


if __name__ == "__main__":
    main()
