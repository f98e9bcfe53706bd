"""MIB-style faithfulness (CPR/CMD) of every circuit-discovery method on the synthetic task, with a bootstrap.

    python benches/bench_faithfulness.py [--family gpt2|llama] [--methods eap,acdc] [--resamples 4]
        [--selection top_n|greedy] [--write-docs docs/EDGES.md]

Every method comes from the registry (eigenfast.edges.METHODS plus Algorithm 1 as the
`eigenfast edges` command wraps it), so a method added there shows up here. Each runs
at one explicit setting (below), so a change of a method's default search does not
change this table. With --write-docs the table goes into that page (docs/EDGES.md,
"MIB faithfulness") between markers named after the family, with this command line,
the date, the wall time and the load. Both tables are printed: KL, accuracy and the
true heads' recovery (TPR, FPR, ROC AUC over edges) of each method's circuit at its
setting, then CPR/CMD of its scores.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.commands.docs_block import check_page, measured, write_block
from eigenfast.commands.edges import METHODS
from eigenfast.edges.compare import compare
from eigenfast.edges.options import EdgeOptions

# One setting per method: sparsities for the score-ranked methods, KL thresholds for the greedy ones.
SETTINGS = {"acdc": (1e-4,), "algorithm1": (1e-4,)}
SPARSITY = (0.8,)  # every other method (Edge Pruning, cold or warm, EAP, EAP-IG, the ensemble)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("gpt2", "llama"), default="gpt2", help="the synthetic model's family")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--resamples", type=int, default=4)
    parser.add_argument("--selection", choices=("top_n", "greedy"), default="top_n")
    parser.add_argument("--steps", type=int, default=80, help="edge-pruning steps")
    parser.add_argument("--ig-steps", type=int, default=5, help="EAP-IG steps m")
    parser.add_argument("--write-docs", metavar="PAGE", default="", help="write the table into this Markdown page")
    args = parser.parse_args()
    block = f"bench_faithfulness synthetic {args.family}"
    if args.write_docs:
        check_page(args.write_docs, block)
    start = time.perf_counter()
    task = synthetic_task(args.family)
    corrupted = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
    settings = {name: SETTINGS.get(name, SPARSITY) for name in args.methods.split(",")}
    result = compare(task.model, task.val_data, corrupted, settings,
                     EdgeOptions(steps=args.steps, lambda_lr=0.1, ig_steps=args.ig_steps, progress=False),
                     true_heads=task.true_heads, methods=METHODS, selection=args.selection, resamples=args.resamples)
    table = (f"synthetic_task({args.family!r}) (3 layers x 4 heads, true heads {task.true_heads}), "
             f"{len(task.val_data)} prompts with rolled counterfactuals, {args.steps} edge-pruning steps (λ lr 0.1), "
             f"EAP-IG m={args.ig_steps}, {args.selection} circuits, logit_diff, {args.resamples} bootstrap resamples\n"
             f"{result.table()}\n\n{result.faithfulness_table()}")
    print(table)
    if args.write_docs:
        command = ["python", "benches/bench_faithfulness.py", *sys.argv[1:]]
        write_block(args.write_docs, block, measured(command, table, time.perf_counter() - start))
        print(f"wrote the table into {args.write_docs}")


if __name__ == "__main__":
    main()
