"""Data-parallel scaling on the CPU: 1 → 2 gloo processes, one thread each, in one run.

Each world size runs in freshly spawned processes (the 1-process run too, so both
pay the same start-up); the time is the slowest rank's, from a barrier to the end of
the call, and the busiest rank's CPU time (which other load on the machine does not
inflate: it shows how the work splits). Workloads: ``eigenfast.score`` with k alone and with every component, and
``discover`` (mean ablation, heads and MLPs). The results of both world sizes are
checked equal before any time is printed.

It also prints what docs/DISTRIBUTED.md scales from: seconds per scored token, this
CPU's float32 GEMM rate on one thread, and the model's FLOPs per token, so the
measured cost can be stated as a multiple of its GEMM-only time.

    python benches/bench_distributed.py [--examples 64] [--tokens 32] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

os.environ.setdefault("EIGENFAST_QUIET", "1")

import eigenfast  # noqa: E402
from eigenfast.circuit.discovery import discover  # noqa: E402
from eigenfast.data.task_data import TaskData

ALL = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")
SHAPE = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 4096}  # Llama-3's proportions (GQA 4:1, MLP 3.5×), scaled down


def llama_small() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def task(n: int, tokens: int, seed: int) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    vocab = SHAPE["vocab_size"]
    return TaskData(torch.randint(3, vocab, (n, tokens), generator=g), torch.randint(3, vocab, (n,), generator=g))


def workloads(args: argparse.Namespace) -> dict:
    model, data = llama_small(), task(args.examples, args.tokens, 0)
    patch, val = task(args.examples, args.tokens, 1), task(args.examples // 2, args.tokens, 2)
    return {
        "score k": lambda: eigenfast.score(model, data, ("k",), batch_size=args.batch, progress=False),
        "score all": lambda: eigenfast.score(model, data, ALL, batch_size=args.batch, progress=False),
        "discover": lambda: discover(model, patch, val, 1e-3, "mean", True, batch_size=args.batch * 4,
                                     progress=False).kl_trace,
    }


def rank_main(rank: int, world: int, port: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        times, cpu, results = {}, {}, {}
        for name, run in workloads(args).items():
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = run()
            elapsed = torch.tensor([time.perf_counter() - start, time.process_time() - start_cpu], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name], cpu[name] = elapsed.tolist()
        if rank == 0:
            torch.save({"times": times, "cpu": cpu, "results": results}, Path(folder) / f"world{world}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gemm_rate() -> float:
    """float32 FLOP/s of one thread on a projection-sized GEMM (the rate the model's matmuls could reach)."""
    torch.set_num_threads(1)
    x, w = torch.randn(256, SHAPE["hidden_size"]), torch.randn(SHAPE["hidden_size"], SHAPE["intermediate_size"])
    for _ in range(3):
        x @ w
    reps, start = 50, time.perf_counter()
    for _ in range(reps):
        x @ w
    return 2 * x.shape[0] * w.shape[0] * w.shape[1] * reps / (time.perf_counter() - start)


def model_flops_per_token() -> float:
    """2 × the layers' matrix parameters: one forward's matmul FLOPs per token (attention scores left out)."""
    h, i, layers = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    kv = h * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    return 2.0 * layers * (2 * h * h + 2 * h * kv + 3 * h * i)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for world in (1, 2):
            mp.spawn(rank_main, args=(world, free_port(), folder, args), nprocs=world, join=True)
            runs[world] = torch.load(Path(folder) / f"world{world}.pt", weights_only=False)  # our own file
    one, two = runs[1]["results"], runs[2]["results"]
    for name in ("score k", "score all"):
        assert all(torch.equal(one[name][k], two[name][k]) for k in one[name]), f"{name}: 2 processes differ"
    assert [s.pruned for s in one["discover"]] == [s.pruned for s in two["discover"]], "discover: circuits differ"

    tokens = args.examples * args.tokens
    print(f"Llama-shaped {SHAPE}, {args.examples} examples x {args.tokens} tokens, batch {args.batch}, "
          "1 thread per process; results equal across world sizes")
    print("wall: the slowest rank, barrier to end; CPU: the busiest rank's CPU time (what contention leaves alone)")
    print(f"{'workload':<10} {'1 process':>10} {'2 processes':>12} {'speed-up':>9} {'CPU 1':>7} {'CPU 2':>7} "
          f"{'CPU ratio':>9} {'ms/token (1 proc)':>18}")
    for name in runs[1]["times"]:
        t1, t2 = runs[1]["times"][name], runs[2]["times"][name]
        c1, c2 = runs[1]["cpu"][name], runs[2]["cpu"][name]
        per_token = f"{1e3 * t1 / tokens:.3f}" if name.startswith("score") else "-"
        print(f"{name:<10} {t1:>9.2f}s {t2:>11.2f}s {t1 / t2:>8.2f}x {c1:>6.2f}s {c2:>6.2f}s {c1 / c2:>8.2f}x "
              f"{per_token:>18}")
    rate, flops = gemm_rate(), model_flops_per_token()
    print(f"one-thread float32 GEMM rate {rate / 1e9:.1f} GFLOP/s; model matmul FLOPs/token (one forward) "
          f"{flops / 1e6:.2f} MFLOP; GEMM-only time of one forward: {1e3 * flops / rate:.4f} ms/token")


if __name__ == "__main__":
    main()
