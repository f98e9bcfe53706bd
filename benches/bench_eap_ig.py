"""Benchmarks of EAP-IG, the targets and the warm start.

1. ``memory``: peak memory of EAP and EAP-IG-inputs on a GPT-2-small-shaped model (12
   layers x 12 heads, d_model 768, random weights) at ``--batch`` x ``--length`` tokens.
   Each method runs in a fresh process; on the CPU the number is the peak resident set
   (``ru_maxrss``) minus the resident set just before the call, on CUDA torch's peak allocation.
2. ``agreement``: Spearman rank correlation of EAP's and EAP-IG's scores with exact
   single-edge patching (the loss change when one edge alone takes its counterfactual),
   by magnitude and signed, on the built-in int_sum_gpt2 model.
3. ``warm``: Edge Pruning started from EAP-IG-inputs' scores (``init_scores``) against the
   usual start (every mask on), and the score methods and their rank ensemble at fixed
   circuit sizes, on the built-in model: KL(f‖circuit) and faithfulness.

Usage: python benches/bench_eap_ig.py [memory|agreement|warm] [--batch 32] [--length 64] [--steps 5]
       [--n 64] [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EIGENFAST_QUIET", "1")

from eigenfast.data.task_data import TaskData  # noqa: E402
from eigenfast.edges import EdgeOptions, average_ranks, run  # noqa: E402
from eigenfast.edges.corrupt import corrupt_by_shuffling  # noqa: E402
from eigenfast.edges.eap import edge_attributions  # noqa: E402
from eigenfast.edges.eap_ig import integrated_attributions  # noqa: E402
from eigenfast.edges.evaluate import prepare  # noqa: E402
from eigenfast.edges.target import Judge, top  # noqa: E402
from eigenfast.runtime.forward import frozen_parameters  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_one(args: argparse.Namespace) -> None:
    """In this (fresh) process: prepare, then measure the peak of one method's attribution."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(), attn_implementation="eager").to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (2 * args.batch, args.length), generator=g)
    labels = torch.randint(0, 50257, (2 * args.batch,), generator=g)
    clean, corrupted = TaskData(ids[: args.batch], labels[: args.batch]), TaskData(ids[args.batch:], labels[args.batch:])
    with frozen_parameters(model):
        task = prepare(model, clean, corrupted, args.batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss_bytes()
        if args.method == "eap":
            edge_attributions(task.forward, task.batches)
        else:
            integrated_attributions(task.forward, task.batches, args.method, args.steps)
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(f"{task.graph.n_edges} {peak}")


def bench_memory(args: argparse.Namespace) -> None:
    print(f"peak memory of the attribution, GPT-2-small shapes (random init), batch {args.batch} x {args.length} "
          f"tokens, {args.device}, " + ("peak RSS minus RSS before the call" if args.device == "cpu"
                                         else "torch peak allocation minus allocation before the call"))
    rows = [("eap", "EAP"), ("ig-inputs", f"EAP-IG-inputs, {args.steps} steps")]
    base = None
    for method, label in rows:
        command = [sys.executable, __file__, "memory-one", "--method", method, "--batch", str(args.batch),
                   "--length", str(args.length), "--steps", str(args.steps), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        edges, peak = int(out[-2]), int(out[-1])
        base = base or peak
        print(f"  {label:<28} {peak / 2**30:7.2f} GiB  ({peak / base:.2f}x EAP), {edges:,} edges")


def builtin_task(args: argparse.Namespace):
    from eigenfast.builtin import load_builtin
    from eigenfast.data.tasks import load_task

    model, tokenizer = load_builtin("int_sum_gpt2")
    data = load_task("int_sum", tokenizer)
    clean = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.n])
    return model.to(args.device).eval(), clean, corrupt_by_shuffling(clean, 0)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's coefficient uses."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((ends - (counts.double() - 1) / 2))[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def exact_patching(task) -> torch.Tensor:
    """Per edge: mean loss with that edge alone patched to its counterfactual, minus the full model's."""
    forward, n_edges = task.forward, task.graph.n_edges
    exact = torch.zeros(n_edges, dtype=torch.float64)
    n = sum(len(b.clean.labels) for b in task.batches)
    for b in task.batches:
        full = float(torch.nn.functional.cross_entropy(forward.logits(b, torch.ones(n_edges)), b.clean.labels,
                                                       reduction="sum"))
        for e in range(n_edges):
            edges = torch.ones(n_edges)
            edges[e] = 0.0
            loss = float(torch.nn.functional.cross_entropy(forward.logits(b, edges), b.clean.labels, reduction="sum"))
            exact[e] += (loss - full) / n
    return exact


def bench_agreement(args: argparse.Namespace) -> None:
    model, clean, corrupted = builtin_task(args)
    with frozen_parameters(model):
        task = prepare(model, clean, corrupted, 32)
        exact = exact_patching(task)
        scores = {"EAP": edge_attributions(task.forward, task.batches)}
        for m in sorted({1, args.steps, 4 * args.steps}):
            scores[f"EAP-IG-inputs m={m}"] = integrated_attributions(task.forward, task.batches, "ig-inputs", m)
        scores[f"EAP-IG-activations m={args.steps}"] = integrated_attributions(task.forward, task.batches,
                                                                               "ig-activations", args.steps)
    print(f"built-in int_sum_gpt2, {args.n} int_sum prompts with shuffled same-length counterfactuals, "
          f"{task.graph.n_edges} edges; Spearman against exact single-edge patching (loss change)")
    print(f"  {'method':<28} {'|score|':>8} {'signed':>8}")
    for name, s in scores.items():
        print(f"  {name:<28} {spearman(s.abs(), exact.abs()):8.3f} {spearman(s, exact):8.3f}")


def bench_warm(args: argparse.Namespace) -> None:
    model, clean, corrupted = builtin_task(args)
    with frozen_parameters(model):
        task = prepare(model, clean, corrupted, 32)
        judge = Judge(task)
        eap = edge_attributions(task.forward, task.batches).abs()
        ig = integrated_attributions(task.forward, task.batches, "ig-inputs", args.steps).abs()
        ig_act = integrated_attributions(task.forward, task.batches, "ig-activations", args.steps).abs()
        methods = {"EAP": eap, f"EAP-IG-inputs m={args.steps}": ig, f"EAP-IG-activations m={args.steps}": ig_act,
                   "ensemble (EAP, EAP-IG-inputs)": average_ranks([eap, ig])}
        n_edges = task.graph.n_edges
        sizes = (0.02, 0.05, 0.1, 0.2)
        print(f"built-in int_sum_gpt2, {args.n} prompts, {n_edges} edges: circuits of the top edges, "
              "faithfulness / KL(f||circuit)")
        print(f"  {'method':<34}" + "".join(f"{f'{s:.0%} edges':>18}" for s in sizes))
        for name, s in methods.items():
            cells = []
            for size in sizes:
                f, kl = judge.measure(top(s, int(round(size * n_edges))))
                cells.append(f"{f:8.3f} / {kl:7.4f}")
            print(f"  {name:<34}" + "".join(f"{c:>18}" for c in cells))
        print(f"Edge Pruning at sparsity 0.95 (lambda lr 1.0), from all masks on vs from EAP-IG-inputs' scores: "
              "faithfulness / KL of the rounded circuit after each step budget")
        budgets = (25, 50, 100, 200, 300)
        print(f"  {'start':<34}" + "".join(f"{f'{b} steps':>18}" for b in budgets))
        for name, init in (("all masks on", None), ("EAP-IG-inputs scores", ig)):
            cells = []
            for steps in budgets:
                options = EdgeOptions(target_sparsity=0.95, steps=steps, init_scores=init, progress=False,
                                      evaluate=False)
                circuit = run(model, clean, corrupted, "edge_prune", options)
                f, kl = judge.measure(circuit.kept)
                cells.append(f"{f:8.3f} / {kl:7.4f}")
            print(f"  {name:<34}" + "".join(f"{c:>18}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("memory", "agreement", "warm", "memory-one"))
    parser.add_argument("--method", default="eap", help="memory-one only: eap, ig-inputs or ig-activations")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="integrated-gradients steps")
    parser.add_argument("--n", type=int, default=64, help="int_sum prompts (agreement, warm)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    {"memory": bench_memory, "memory-one": memory_one, "agreement": bench_agreement, "warm": bench_warm}[args.what](args)


if __name__ == "__main__":
    main()
