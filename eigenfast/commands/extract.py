"""Extract a task's circuit into a smaller model and save it, or sweep the threshold.

Heads (and with --mlps, MLPs) whose ablation raises KL(f||g) by less than the threshold
are cut out. The mean activations (D_a, --n-patch examples) and the KL and accuracy
(D_v, --n-val examples) are disjoint random draws from examples the model never trained
on, when the model records its training (the built-in one does); else from the whole task.
"""
from __future__ import annotations

import argparse

import torch

from ..circuit.extract import extract_circuit
from ..circuit.sweep import sweep
from ..data.splits import Part, task_parts
from ..data.task_data import TaskData
from ..data.tasks import check_task, load_task
from ..errors import DataError
from ..rewrite.position_tables import EXTRAPOLATE
from ..rewrite.removal import ABLATIONS
from ..saving.loading import check_model_name, load_model
from ..saving.serialization import check_writable_directory
from .arguments import (
    TASK_HELP,
    add_model_options,
    add_plain_options,
    check_plain_options,
    comma_list,
    non_negative_float,
    positive_int,
    print_parts,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, batch_size=64)
    parser.add_argument("--task", required=True, help=TASK_HELP)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--threshold", type=non_negative_float,
                      help="alpha: a component stays if ablating it raises KL by at least alpha")
    mode.add_argument("--sweep", type=comma_list(non_negative_float), metavar="A1,A2,...",
                      help="extract at each alpha and write size and accuracy against alpha (sweep.json, sweep.png)")
    parser.add_argument("--ablation", choices=ABLATIONS, default="mean", help="what an ablated component outputs")
    parser.add_argument("--mlps", action="store_true", help="prune MLPs too, not only attention heads")
    parser.add_argument("--extrapolate", choices=EXTRAPOLATE, default="mean",
                        help="what position tables do past the patching data's length")
    add_plain_options(parser, "removed components' means")
    parser.add_argument("--n-patch", type=positive_int, default=250, help="examples for the mean activations (D_a)")
    parser.add_argument("--n-val", type=positive_int, default=250, help="examples for the KL and accuracy (D_v)")
    parser.add_argument("--out", required=True,
                        help="folder for the extracted model (with --sweep: for sweep.json and sweep.png)")


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    check_task(args.task)
    # A sweep writes only sweep.json and sweep.png (replacing an earlier sweep's); a circuit is a full save.
    if args.sweep:
        check_writable_directory(args.out)
    else:
        check_plain_options(args)
    loaded = load_model(args.model)
    unseen = task_parts(args.task, load_task(args.task, loaded.tokenizer), loaded.training, args.seed)["unseen"]
    patch_data, val_data = draw(unseen.data, args.n_patch, args.n_val, args.seed)
    print_parts(
        Part("D_a", patch_data, f"random draw (seed {args.seed}) from {unseen.origin}"),
        Part("D_v", val_data, f"random draw from {unseen.origin}, disjoint from D_a"),
    )
    options = dict(ablation=args.ablation, include_mlps=args.mlps, extrapolate=args.extrapolate, batch_size=args.batch_size,
                   positions=args.positions)
    if args.sweep:
        result = sweep(loaded.model, patch_data, val_data, args.sweep, **options)
        print(result.table())
        table, plot = result.save(args.out)
        print(f"wrote {table} and {plot}")
        return 0
    circuit = extract_circuit(loaded.model, patch_data, val_data, args.threshold, tokenizer=loaded.tokenizer, **options)
    print(circuit.report.table())
    print(f"saved the extracted circuit to {circuit.save(args.out, format=args.format)}")
    return 0


def draw(data: TaskData, n_patch: int, n_val: int, seed: int) -> tuple[TaskData, TaskData]:
    """Disjoint seeded random draws of ``n_patch`` (D_a) and ``n_val`` (D_v) examples of ``data``."""
    if n_patch < 1 or n_val < 1:
        raise DataError(f"--n-patch and --n-val must be >= 1, got {n_patch} and {n_val}")
    if n_patch + n_val > len(data):
        raise DataError(f"--n-patch {n_patch} + --n-val {n_val} exceed the {len(data)} examples available; lower them")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[:n_patch]), data.subset(order[n_patch : n_patch + n_val])
