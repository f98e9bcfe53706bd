"""Accuracy and loss of a model on a task, as one JSON line.

--split picks the examples: train, val and test are the parts prune uses (for a model
that records its training, test holds only examples it never trained on); unseen is
every example the model never trained on; all is every example.
"""
from __future__ import annotations

import argparse
import json

from ..data.splits import task_parts
from ..data.tasks import check_task, load_task
from ..runtime.forward import evaluate
from ..saving.loading import check_model_name, load_model
from .arguments import TASK_HELP, add_model_options

SPLITS = ("train", "val", "test", "unseen", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--task", required=True, help=TASK_HELP)
    parser.add_argument("--split", choices=SPLITS, default="test", help="which examples to evaluate on")


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    check_task(args.task)
    loaded = load_model(args.model)
    part = task_parts(args.task, load_task(args.task, loaded.tokenizer), loaded.training, args.seed)[args.split]
    result = evaluate(loaded.model, part.data, args.batch_size, desc=f"evaluate ({args.split})")
    print(json.dumps({
        "model": args.model, "task": args.task, "split": args.split, "examples": part.origin, **result.as_dict(),
    }))
    return 0
