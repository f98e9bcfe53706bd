"""Benchmarks of EAP-IG, the targets and the warm start.

1. ``memory``: peak memory of EAP, EAP-IG-inputs and EAP-IG-activations on a
   GPT-2-small-shaped model (12 layers x 12 heads, d_model 768, random weights) at
   ``--batch`` x ``--length`` tokens. Each method runs in a fresh process; on the CPU the
   number is the peak resident set (``ru_maxrss``) minus the resident set just before the
   call, on CUDA torch's peak allocation. Every pass of a method has the same shape, so
   ``--activation-nodes K`` runs EAP-IG-activations over the first K of its (2·layers + 1)
   nodes only: the same peak, a fraction of the time (the table says so).
2. ``agreement``: Spearman rank correlation of EAP's and EAP-IG's scores with exact
   single-edge patching (``eigenfast.edges.exact_patching``: the loss change when one edge
   alone takes its counterfactual), by magnitude and signed, on the built-in int_sum_gpt2
   model and on the synthetic task (GPT-2 and Llama).
3. ``warm``: Edge Pruning started from EAP-IG-inputs' scores (``init_scores``) against the
   usual start (every mask on), and the score methods and their rank ensemble at fixed
   circuit sizes, on the built-in model: KL(f‖circuit) and faithfulness.

Usage: python benches/bench_eap_ig.py [memory|agreement|warm] [--batch 32] [--length 64] [--steps 5]
       [--n 64] [--device cpu|cuda] [--threads N] [--write-docs PAGE]

With ``--write-docs`` the table goes into that Markdown page between markers named after
the benchmark, with the command line, the date, the wall time and the load.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EIGENFAST_QUIET", "1")

from eigenfast.circuit.synthetic import synthetic_task  # noqa: E402
from eigenfast.commands.docs_block import check_page, measured, write_block  # noqa: E402
from eigenfast.data.task_data import TaskData  # noqa: E402
from eigenfast.edges import EdgeOptions, average_ranks, eap_ig, run  # noqa: E402
from eigenfast.edges.corrupt import corrupt_by_shuffling  # noqa: E402
from eigenfast.edges.eap import edge_attributions  # noqa: E402
from eigenfast.edges.eap_ig import integrated_attributions  # noqa: E402
from eigenfast.edges.evaluate import prepare, true_edges  # noqa: E402
from eigenfast.edges.exact_patching import exact_patching, spearman  # noqa: E402
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
    if args.method == "ig-activations" and args.activation_nodes:
        every_node = eap_ig.moving_writers
        eap_ig.moving_writers = lambda graph, path: every_node(graph, path)[: args.activation_nodes]
    with frozen_parameters(model):
        task = prepare(model, clean, corrupted, args.batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss_bytes()
        start = time.perf_counter()
        if args.method == "eap":
            edge_attributions(task.forward, task.batches)
        else:
            integrated_attributions(task.forward, task.batches, args.method, args.steps)
        seconds = time.perf_counter() - start
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(f"{task.graph.n_edges} {peak} {seconds}")


def bench_memory(args: argparse.Namespace) -> str:
    n_nodes = 2 * GPT2Config().n_layer + 1
    nodes = args.activation_nodes or n_nodes
    lines = [f"peak memory of the attribution, GPT-2-small shapes (random init), batch {args.batch} x {args.length} "
             f"tokens, {args.device}, " + ("peak RSS minus RSS before the call" if args.device == "cpu"
                                            else "torch peak allocation minus allocation before the call")]
    rows = [("eap", "EAP", 1), ("ig-inputs", f"EAP-IG-inputs m={args.steps}", args.steps),
            ("ig-activations", f"EAP-IG-activations m={args.steps}", nodes * args.steps)]
    base = None
    for method, label, passes in rows:
        command = [sys.executable, __file__, "memory-one", "--method", method, "--batch", str(args.batch),
                   "--length", str(args.length), "--steps", str(args.steps), "--device", args.device,
                   "--activation-nodes", str(args.activation_nodes)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
        edges, peak, seconds = int(out[-3]), int(out[-2]), float(out[-1])
        base = base or peak
        note = f" (first {nodes} of its {n_nodes} nodes)" if method == "ig-activations" and nodes < n_nodes else ""
        lines.append(f"  {label:<28} {peak / 2**30:7.2f} GiB  ({peak / base:.2f}x EAP), {passes} forward+backward "
                     f"pass(es){note}, {seconds:.0f} s, {edges:,} edges")
    return "\n".join(lines)


def builtin_task(args: argparse.Namespace, name: str = "int_sum_gpt2"):
    from eigenfast.builtin import load_builtin
    from eigenfast.data.tasks import load_task

    model, tokenizer = load_builtin(name)
    data = load_task("int_sum", tokenizer)
    clean = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.n])
    return model.to(args.device).eval(), clean, corrupt_by_shuffling(clean, 0)


def agreement_tasks(args: argparse.Namespace):
    """(description, model, clean, corrupted, true heads or None) of each task the agreement is measured on."""
    model, clean, corrupted = builtin_task(args)
    yield (f"built-in int_sum_gpt2, {args.n} int_sum prompts with shuffled same-length counterfactuals",
           model, clean, corrupted, None)
    for family in ("gpt2", "llama"):
        task = synthetic_task(family)
        rolled = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
        yield (f"synthetic_task({family!r}), {len(task.val_data)} prompts with rolled counterfactuals",
               task.model, task.val_data, rolled, task.true_heads)


def bench_agreement(args: argparse.Namespace) -> str:
    lines = ["Spearman of each method's edge scores against exact single-edge patching (the change of the mean "
             "cross-entropy when one edge alone takes its counterfactual), by |score| and signed; on the synthetic "
             "task also over the edges that can matter only (true_edges: out of the embeddings, an MLP or a true "
             "head, into what a true head or an MLP reads, or the logits), since the others' exact effects are "
             "float rounding (~1e-7) where EAP's are exactly 0"]
    for description, model, clean, corrupted, true_heads in agreement_tasks(args):
        with frozen_parameters(model):
            task = prepare(model, clean, corrupted, 32)
            exact = exact_patching(task)
            scores = {"EAP": edge_attributions(task.forward, task.batches)}
            for m in (args.steps, 4 * args.steps):
                scores[f"EAP-IG-inputs m={m}"] = integrated_attributions(task.forward, task.batches, "ig-inputs", m)
            scores[f"EAP-IG-activations m={args.steps}"] = integrated_attributions(task.forward, task.batches,
                                                                                   "ig-activations", args.steps)
        subsets = [("all", torch.ones(len(exact), dtype=torch.bool))]
        if true_heads is not None:
            subsets.append(("true edges", true_edges(task.graph, true_heads)))
        header = "".join(f"{f'|score| {name}':>20}{f'signed {name}':>20}" for name, _ in subsets)
        lines += ["", f"{description}, {task.graph.n_edges} edges"
                  + (f" ({int(subsets[1][1].sum())} true edges)" if true_heads is not None else ""),
                  f"  {'method':<28}{header}"]
        for name, s in scores.items():
            cells = "".join(f"{spearman(s[m].abs(), exact[m].abs()):20.3f}{spearman(s[m], exact[m]):20.3f}"
                            for _, m in subsets)
            lines.append(f"  {name:<28}{cells}")
    return "\n".join(lines)


def bench_warm(args: argparse.Namespace) -> str:
    model, clean, corrupted = builtin_task(args)
    lines = []
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
        lines.append(f"built-in int_sum_gpt2, {args.n} prompts, {n_edges} edges: circuits of the top edges, "
                     "faithfulness (prob) / KL(f||circuit)")
        lines.append(f"  {'method':<34}" + "".join(f"{f'{s:.0%} edges':>18}" for s in sizes))
        for name, s in methods.items():
            cells = []
            for size in sizes:
                f, kl = judge.measure(top(s, int(round(size * n_edges))))
                cells.append(f"{f:8.3f} / {kl:7.4f}")
            lines.append(f"  {name:<34}" + "".join(f"{c:>18}" for c in cells))
        size = int(round((1 - args.sparsity) * n_edges))
        lines.append(f"Edge Pruning at sparsity {args.sparsity} (lambda lr 1.0, lr 0.1, ramp 0.5), from all masks on vs "
                     f"from EAP-IG-inputs' scores, after each step budget: faithfulness / KL / edges of the rounded "
                     f"circuit (its size is the masks' mean, above the target until the run converges), and "
                     f"faithfulness / KL of the {size} edges (the target size) with the highest mask scores")
        budgets = args.budgets
        lines.append(f"  {'start':<24}{'circuit':<10}" + "".join(f"{f'{b} steps':>24}" for b in budgets))
        for name, init in (("all masks on", None), ("EAP-IG-inputs scores", ig)):
            rounded, at_size = [], []
            for steps in budgets:
                options = EdgeOptions(target_sparsity=args.sparsity, steps=steps, init_scores=init, progress=False,
                                      evaluate=False)
                circuit = run(model, clean, corrupted, "edge_prune", options)
                f, kl = judge.measure(circuit.kept)
                rounded.append(f"{f:.3f} / {kl:.4f} / {int(circuit.kept.sum())}")
                f, kl = judge.measure(top(circuit.scores, size))
                at_size.append(f"{f:.3f} / {kl:.4f}")
            lines.append(f"  {name:<24}{'rounded':<10}" + "".join(f"{c:>24}" for c in rounded))
            lines.append(f"  {'':<24}{f'top {size}':<10}" + "".join(f"{c:>24}" for c in at_size))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("memory", "agreement", "warm", "memory-one"))
    parser.add_argument("--method", default="eap", help="memory-one only: eap, ig-inputs or ig-activations")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="integrated-gradients steps")
    parser.add_argument("--activation-nodes", type=int, default=0,
                        help="memory: run EAP-IG-activations over its first K nodes only (0: all)")
    parser.add_argument("--n", type=int, default=64, help="int_sum prompts (agreement, warm)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="warm: Edge Pruning's target sparsity")
    parser.add_argument("--budgets", type=lambda t: tuple(int(v) for v in t.split(",")), default=(25, 50, 100, 200, 300),
                        help="warm: Edge Pruning step budgets, comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--write-docs", metavar="PAGE", default="", help="write the table into this Markdown page")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.what == "memory-one":
        memory_one(args)
        return
    block = f"bench_eap_ig {args.what}"
    if args.write_docs:
        check_page(args.write_docs, block)
    start = time.perf_counter()
    table = {"memory": bench_memory, "agreement": bench_agreement, "warm": bench_warm}[args.what](args)
    print(table)
    if args.write_docs:
        command = ["python", "benches/bench_eap_ig.py", *sys.argv[1:]]
        write_block(args.write_docs, block, measured(command, table, time.perf_counter() - start, args.device))
        print(f"wrote the table into {args.write_docs}")


if __name__ == "__main__":
    main()
