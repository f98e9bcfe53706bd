"""Eigenprune a model for a task and save it.

Scores every selected matrix on the train part of the task, chooses p on the val part
(with --p auto), reports accuracy on the test part, and saves the pruned model.
For a model that records its training (the built-in one does), train is exactly what it
was trained on, and val and test are halves of the examples it never saw.
"""
from __future__ import annotations

import argparse

from ..data.splits import task_parts
from ..data.tasks import check_task, load_task
from ..eigenprune.attribution import REDUCE
from ..eigenprune.options import DEFAULT_SIGNIFICANCE, SELECTIONS
from ..eigenprune.prune import DEFAULT_CANDIDATES, prune
from ..eigenprune.scoring import ESTIMATES
from ..rewrite.position_tables import EXTRAPOLATE
from ..saving.loading import check_model_name, load_model
from .arguments import (
    SELECT_HELP,
    SIGNIFICANCE_HELP,
    TASK_HELP,
    add_model_options,
    add_plain_options,
    check_plain_options,
    comma_list,
    component,
    fraction,
    p_or_auto,
    positive_int,
    print_parts,
    significance,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--task", required=True, help=TASK_HELP)
    # --fraction is the same option under a name torchrun's own parser cannot take for an abbreviation of its
    # --print-completion (torch 2.14 and later refuse `torchrun ... -m eigenfast.cli prune --p 0.1` as ambiguous).
    parser.add_argument("--p", "--fraction", dest="p", type=p_or_auto, default="auto",
                        help="fraction of each component type's singular values to freeze, or 'auto' to try --candidates")
    parser.add_argument("--components", type=comma_list(component), default="k",
                        help="comma-separated components to prune, e.g. k,q,mlp_in")
    parser.add_argument("--pairs", choices=("all", "shift"), default="all",
                        help="partners of each example in the score: every example, or the previous one in the batch")
    parser.add_argument("--reduce", choices=REDUCE, default="max",
                        help="how a term's score pools over pairs: the paper's max, or the mean")
    parser.add_argument("--estimate", choices=ESTIMATES, default="linear",
                        help="how a term's effect is estimated: first-order (linear), integrated gradients (ig: "
                             "needs --reduce mean --pairs all), or checked by exact forwards (verified)")
    parser.add_argument("--steps", type=positive_int, default=8,
                        help="points on the integrated-gradients path (--estimate ig); 1 is the linear estimate")
    parser.add_argument("--extrapolate", choices=EXTRAPOLATE, default="mean",
                        help="what the position-indexed biases do past the scoring data's length")
    parser.add_argument("--candidates", type=comma_list(fraction), default=",".join(map(str, DEFAULT_CANDIDATES)),
                        help="p values tried by --p auto")
    parser.add_argument("--significance", type=significance, default=DEFAULT_SIGNIFICANCE, help=SIGNIFICANCE_HELP)
    parser.add_argument("--select", choices=SELECTIONS, default="val", help=SELECT_HELP)
    add_plain_options(parser, "frozen terms")
    parser.add_argument("--out", required=True, help="folder to save the pruned model in (new, empty, or an earlier save)")


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    check_task(args.task)
    check_plain_options(args)
    loaded = load_model(args.model)
    parts = task_parts(args.task, load_task(args.task, loaded.tokenizer), loaded.training, args.seed)
    print_parts(parts["train"], parts["val"], parts["test"])
    result = prune(
        loaded.model,
        parts["train"].data,
        p=args.p,
        components=args.components,
        pairs=args.pairs,
        reduce=args.reduce,
        estimate=args.estimate,
        steps=args.steps,
        batch_size=args.batch_size,
        extrapolate=args.extrapolate,
        candidates=args.candidates,
        significance=args.significance,
        select=args.select,
        val_data=parts["val"].data,
        test_data=parts["test"].data,
        seed=args.seed,
        tokenizer=loaded.tokenizer,
        positions=args.positions,
    )
    print(result.report.table())
    out = result.save(args.out, format=args.format)
    print(f"saved the pruned model (p={result.report.p:g}) to {out}")
    return 0
