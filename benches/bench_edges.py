"""Benchmarks of the edge methods.

1. ``step``: one Edge Pruning step (masked forward + backward through every edge mask)
   on a GPT-2-small-shaped model (12 layers x 12 heads, d_model 768, the 50257-token
   vocabulary, random weights), ours against the hook-per-edge reference of the tests
   (``naive_run`` in tests/edges/edges_reference.py: every reader's input mixed edge by edge in
   Python, every head's q/k/v through the full projection). Their logits must agree
   (asserted) before anything is timed.
2. ``methods``: Edge Pruning, EAP, ACDC and Algorithm 1 side by side on the built-in
   int_sum model (KL, edges kept, wall time), through the one evaluation.
3. ``synthetic``: the same on ``synthetic_task``, whose true heads are known (TPR, FPR, AUC over edges).

Usage: python benches/bench_edges.py [step|methods|synthetic|all] [--batch 4] [--length 12] [--repeat 3]
       [--steps 300] [--n 64] [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "edges")]
os.environ.setdefault("EIGENFAST_QUIET", "1")

from edges_reference import naive_run  # noqa: E402

from eigenfast.data.task_data import TaskData
from eigenfast.edges.compare import compare  # noqa: E402
from eigenfast.edges.corrupt import corrupt_by_shuffling  # noqa: E402
from eigenfast.edges.masked_forward import EdgeForward  # noqa: E402
from eigenfast.edges.options import EdgeOptions  # noqa: E402
from eigenfast.runtime.forward import frozen_parameters as frozen  # noqa: E402
from eigenfast.runtime.metrics import kl_divergence


def gpt2_small(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(), attn_implementation="eager").to(device).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(args: argparse.Namespace) -> None:
    model = gpt2_small(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (2 * args.batch, args.length), generator=g)
    clean = TaskData(ids[: args.batch], torch.zeros(args.batch, dtype=torch.long))
    corrupted = TaskData(ids[args.batch :], torch.zeros(args.batch, dtype=torch.long))
    forward = EdgeForward(model)
    graph = forward.graph
    with frozen(model):
        prepared = forward.prepare(clean, corrupted)
        logp_f = torch.log_softmax(prepared.clean.logits, -1)
        edges = torch.rand(graph.n_edges, generator=g).to(args.device).requires_grad_(True)

        def ours() -> None:
            kl_divergence(logp_f, forward.logits(prepared, edges)).mean().backward()

        index = {name: i for i, name in enumerate(graph.edge_names)}
        with torch.no_grad():
            _, counterfactual, _ = naive_run(model, corrupted, lambda w, r: 1.0, None)

        def naive() -> torch.Tensor:
            logits, _, _ = naive_run(model, clean, lambda w, r: edges[index[(w, r)]], counterfactual)
            return logits

        with torch.no_grad():
            torch.testing.assert_close(forward.logits(prepared, edges), naive().float(), atol=1e-3, rtol=1e-3)
        fast = timed(ours, args.repeat, args.device)
        slow = timed(lambda: kl_divergence(logp_f, naive().float()).mean().backward(), max(1, args.repeat // 2), args.device)
    print(f"edge pruning step (forward + backward), GPT-2-small shapes, {graph.n_edges:,} edges, "
          f"batch {args.batch} x {args.length} tokens, {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"  ours (one contraction per reader group): {fast * 1e3:9.1f} ms")
    print(f"  hook-per-edge reference:                 {slow * 1e3:9.1f} ms")
    print(f"  speed-up: {slow / fast:.1f}x")


def bench_methods(args: argparse.Namespace) -> None:
    from eigenfast.builtin import load_builtin
    from eigenfast.data.tasks import load_task

    model, tokenizer = load_builtin("int_sum_gpt2")
    model = model.to(args.device)
    data = load_task("int_sum", tokenizer)
    clean = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.n])
    corrupted = corrupt_by_shuffling(clean, 0)
    settings = {"edge_prune": (0.9, 0.95), "eap": (0.9, 0.95), "acdc": (0.01, 0.03), "algorithm1": (0.01,)}
    result = compare(model, clean, corrupted, settings, EdgeOptions(steps=args.steps, batch_size=32, progress=False))
    print(f"built-in int_sum_gpt2, {args.n} int_sum prompts with shuffled same-length counterfactuals, "
          f"{args.steps} edge-pruning steps, {args.device}, {torch.get_num_threads()} thread(s)")
    print(result.table())


def bench_synthetic(args: argparse.Namespace) -> None:
    from eigenfast.circuit.synthetic import synthetic_task

    task = synthetic_task()
    corrupted = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
    settings = {"edge_prune": (0.6, 0.8), "eap": (0.6, 0.8), "acdc": (1e-4, 1e-3), "algorithm1": (1e-4,)}
    options = EdgeOptions(steps=80, batch_size=32, progress=False, lambda_lr=0.1)
    result = compare(task.model, task.val_data, corrupted, settings, options, true_heads=task.true_heads)
    print(f"synthetic_task (GPT-2, 3 layers x 4 heads, true heads {task.true_heads}), {len(task.val_data)} prompts, "
          f"80 edge-pruning steps (λ lr 0.1), {torch.get_num_threads()} thread(s)")
    print(result.table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("step", "methods", "synthetic", "all"), default="all")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what in ("step", "all"):
        bench_step(args)
    if args.what in ("methods", "all"):
        bench_methods(args)
    if args.what in ("synthetic", "all"):
        bench_synthetic(args)


if __name__ == "__main__":
    main()
