"""``eigenfast extract``: extract a task's circuit and save it, or sweep the threshold and plot size/accuracy."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from ..cli import load_model, parse_floats
from ..data import DataError, TaskData, load_task
from ..modules import EXTRAPOLATE
from .ablation import ABLATIONS
from .extract import extract_circuit
from .sweep import sweep


def register(subparsers: Any) -> None:
    """Add the ``extract`` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "extract",
        help="extract a task's circuit (heads, optionally MLPs) into a smaller model, or sweep the threshold",
        description=__doc__,
    )
    p.add_argument("--model", required=True, help="built-in model name, eigenfast save, or HF model directory")
    p.add_argument("--task", required=True, help="int_sum, int_mult, or a .jsonl file of {prompt, target}")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--threshold", type=float, help="α: a component stays if ablating it raises KL by at least α")
    mode.add_argument("--sweep", type=parse_floats, metavar="A1,A2,...",
                      help="extract at each α and print/plot size and accuracy against α")
    p.add_argument("--ablation", choices=ABLATIONS, default="mean")
    p.add_argument("--mlps", action="store_true", help="prune MLPs too, not only attention heads")
    p.add_argument("--extrapolate", choices=EXTRAPOLATE, default="mean",
                   help="what position tables do past the patching data's length")
    p.add_argument("--n-patch", type=int, default=250, help="examples for the mean activations (D_a)")
    p.add_argument("--n-val", type=int, default=250, help="examples for the KL and accuracy (D_v)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random D_a / D_v draw")
    p.add_argument("--out", required=True, help="directory for the extracted model (sweep: for sweep.json and sweep.png)")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model)
    patch, val = draw(load_task(args.task, tokenizer), args.n_patch, args.n_val, args.seed)
    options = dict(ablation=args.ablation, include_mlps=args.mlps, extrapolate=args.extrapolate, batch_size=args.batch_size)
    if args.sweep:
        result = sweep(model, patch, val, args.sweep, **options)
        print(result.table())
        table, plot = result.save(args.out)
        print(f"wrote {table} and {plot}")
        return 0
    circuit = extract_circuit(model, patch, val, args.threshold, tokenizer=tokenizer, **options)
    print(circuit.report.table())
    print(f"saved the extracted circuit to {circuit.save(args.out)}")
    return 0


def draw(data: TaskData, n_patch: int, n_val: int, seed: int) -> tuple[TaskData, TaskData]:
    """Disjoint seeded random draws of ``n_patch`` (D_a) and ``n_val`` (D_v) examples."""
    if n_patch < 1 or n_val < 1:
        raise DataError(f"--n-patch and --n-val must be >= 1, got {n_patch} and {n_val}")
    if n_patch + n_val > len(data):
        raise DataError(f"--n-patch {n_patch} + --n-val {n_val} exceed the task's {len(data)} examples")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[:n_patch]), data.subset(order[n_patch : n_patch + n_val])

