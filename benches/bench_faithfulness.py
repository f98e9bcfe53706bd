"""MIB-style faithfulness (CPR/CMD) of every circuit-discovery method on the synthetic task, with a bootstrap.

    python benches/bench_faithfulness.py [--methods eap,acdc] [--resamples 4] [--selection top_n|greedy]

Every method comes from the registry (eigenfast.edges.METHODS plus Algorithm 1 as the
`eigenfast edges` command wraps it), so a method added there shows up here. The table
it prints is in docs/EDGES.md ("MIB faithfulness").
"""
from __future__ import annotations

import argparse
import time

import torch

from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.commands.edges import METHODS
from eigenfast.edges.compare import compare
from eigenfast.edges.options import EdgeOptions

# One setting per method: sparsities for the score-ranked methods, KL thresholds for the greedy ones.
SETTINGS = {"edge_prune": (0.8,), "eap": (0.8,), "acdc": (1e-4,), "algorithm1": (1e-4,)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--resamples", type=int, default=4)
    parser.add_argument("--selection", choices=("top_n", "greedy"), default="top_n")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    task = synthetic_task()
    corrupted = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
    settings = {name: SETTINGS.get(name, (0.8,)) for name in args.methods.split(",")}
    start = time.perf_counter()
    result = compare(task.model, task.val_data, corrupted, settings,
                     EdgeOptions(steps=args.steps, lambda_lr=0.1, progress=False), true_heads=task.true_heads,
                     methods=METHODS, selection=args.selection, resamples=args.resamples)
    print(f"synthetic_task (GPT-2, 3 layers x 4 heads, true heads {task.true_heads}), {len(task.val_data)} prompts "
          f"with rolled counterfactuals, {args.steps} edge-pruning steps (λ lr 0.1), {args.selection} circuits, "
          f"logit_diff, {args.resamples} bootstrap resamples, {torch.get_num_threads()} thread(s), "
          f"{time.perf_counter() - start:.0f} s in all")
    print(result.faithfulness_table())


if __name__ == "__main__":
    main()
