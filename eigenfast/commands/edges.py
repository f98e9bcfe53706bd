"""Edge Pruning, EAP, ACDC and Algorithm 1 side by side on a task: KL and MIB faithfulness (CPR/CMD) tables, PNGs."""
from __future__ import annotations

import argparse
import time

import torch

from ..circuit.discovery import discover
from ..data.splits import task_parts
from ..data.tasks import check_task, load_task
from ..edges import registry
from ..edges.compare import compare
from ..edges.corrupt import corrupt_by_shuffling
from ..edges.evaluate import PreparedTask
from ..edges.faithfulness import METRICS
from ..edges.options import EdgeOptions
from ..edges.runner import EdgeMethod, Found
from ..edges.selection import SELECTIONS
from ..edges.stability import check_resamples
from ..errors import DataError
from ..runtime import distributed
from ..saving.loading import check_model_name, load_model
from ..saving.serialization import check_writable_directory
from .arguments import MODEL_HELP, TASK_HELP, positive_int
from .docs_block import check_page, measured, write_block


def _algorithm_1(task: PreparedTask, options: EdgeOptions) -> Found:
    """Algorithm 1's heads and MLPs as the edges out of them (it has no edge scores: the kept flags rank)."""
    # Its means come from the corrupted inputs: the same counterfactual as the edge methods'.
    found = discover(task.model, task.corrupted, task.clean, options.threshold, ablation="mean", include_mlps=True,
                     batch_size=options.batch_size, progress=options.progress)
    kept = task.graph.edges_of_nodes(found.heads, found.mlps)
    return Found(kept, kept.float())


# Algorithm 1 (a node-level method of eigenfast.circuit) joins the edge methods' registry here, in the
# command layer, so eigenfast.edges never imports another feature.
ALGORITHM_1 = EdgeMethod("algorithm1", "Algorithm 1", "threshold", "α", _algorithm_1, reads_batches=False)
METHODS = {**registry.METHODS, ALGORITHM_1.name: ALGORITHM_1}
# Which option lists each method's settings: the edge sparsities are shared, the KL thresholds are each method's own.
SETTINGS = {"edge_prune": "sparsities", "eap": "sparsities", "eap_ig_inputs": "sparsities",
            "eap_ig_activations": "sparsities", "ensemble": "sparsities", "edge_prune_warm": "sparsities",
            "acdc": "acdc_thresholds", "algorithm1": "alg1_thresholds"}
# The options that decide the numbers, spelled out in the command line written beside a table (defaults included,
# so the line still reproduces the table after a default changes).
MEASURED_OPTIONS = ("model", "task", "methods", "n", "sparsities", "steps", "ig_steps", "acdc_thresholds",
                    "alg1_thresholds", "batch_size", "seed", "selection", "metric", "resamples")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (the CLI registers the command itself)."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--task", required=True, help=TASK_HELP)
    parser.add_argument("--methods", type=_methods, default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--n", type=positive_int, default=64,
                        help="examples drawn from the task; each is paired with a shuffled same-length counterfactual")
    parser.add_argument("--sparsities", type=_floats, default="0.9,0.95", help="edge sparsities for edge pruning, EAP, EAP-IG and the ensemble")
    parser.add_argument("--steps", type=positive_int, default=300, help="edge-pruning optimisation steps")
    parser.add_argument("--ig-steps", type=positive_int, default=5,
                        help="EAP-IG's integrated-gradients steps m (also the ensemble's and the warm start's)")
    parser.add_argument("--acdc-thresholds", type=_floats, default="0.01", help="ACDC's KL thresholds τ")
    parser.add_argument("--alg1-thresholds", type=_floats, default="0.01", help="Algorithm 1's KL thresholds α")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="examples per forward")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example draw and the shuffling")
    parser.add_argument("--selection", choices=SELECTIONS, default="top_n",
                        help="how the faithfulness curve builds each size's circuit from a method's edge scores")
    parser.add_argument("--metric", choices=METRICS, default="logit_diff",
                        help="faithfulness metric: the answer's logit minus the counterfactual answer's, or its probability")
    parser.add_argument("--resamples", type=int, default=0,
                        help="bootstrap draws of the examples (0: none, else >= 2): CPR/CMD intervals and circuit IoU")
    parser.add_argument("--out", default="edges-out", help="directory for edges.json, edges.png and faithfulness.png")
    parser.add_argument("--write-docs", metavar="PAGE", default="",
                        help="also write both tables, with this command line, the date and the load, into the Markdown "
                             "PAGE (e.g. docs/EDGES.md), replacing the block this model and task wrote there before")


def command_line(args: argparse.Namespace) -> list[str]:
    """``eigenfast edges`` with every option that decides the numbers, as given or defaulted."""
    line = ["eigenfast", "edges"]
    for name in MEASURED_OPTIONS:
        value = getattr(args, name)
        if isinstance(value, tuple):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        line += [f"--{name.replace('_', '-')}", str(value)]
    return line


def docs_block_name(args: argparse.Namespace) -> str:
    return f"eigenfast edges {args.model} {args.task}"


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    options = EdgeOptions(batch_size=args.batch_size, steps=args.steps, ig_steps=args.ig_steps)
    settings = {m: getattr(args, SETTINGS[m]) for m in args.methods}
    check_resamples(args.resamples)
    if args.n < 2:
        raise DataError(f"--n must be >= 2 (examples need counterfactual partners), got {args.n}")
    check_model_name(args.model)
    check_task(args.task)
    check_writable_directory(args.out)
    if args.write_docs:
        check_page(args.write_docs, docs_block_name(args))
    loaded = load_model(args.model)
    model = loaded.model
    # Only examples the model never trained on (the built-in models record their training split).
    unseen = task_parts(args.task, load_task(args.task, loaded.tokenizer), loaded.training, args.seed)["unseen"]
    data = unseen.data
    if args.n > len(data):
        raise DataError(f"--n {args.n} exceeds the {len(data)} examples of {unseen.origin}")
    print(f"data    {args.n} examples drawn (seed {args.seed}) from {unseen.origin}")
    clean = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.n])
    corrupted = corrupt_by_shuffling(clean, args.seed)
    result = compare(model, clean, corrupted, settings, options, methods=METHODS, selection=args.selection,
                     metric=args.metric, resamples=args.resamples, seed=args.seed)
    tables = (f"{result.table()}\n\nfaithfulness ({args.selection} circuits of 0.1%-100% of the edges, "
              f"{args.metric}; docs/EDGES.md)\n{result.faithfulness_table()}")
    print(tables)
    table, plot, curves = result.save(args.out)
    print(f"wrote {table}, {plot} and {curves}")
    if args.write_docs:
        distributed.on_main(lambda: write_block(args.write_docs, docs_block_name(args),
                                                measured(command_line(args), tables, time.perf_counter() - start,
                                                         next(model.parameters()).device.type)))
        print(f"wrote the tables into {args.write_docs}")
    return 0
