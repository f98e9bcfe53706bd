"""The ``eigenfast`` command: demo, prune, eval (and extract, from eigenfast.circuit)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .adapters import COMPONENTS
from .data import DataError, TaskData, load_task
from .forward import evaluate
from .serialization import SPEC_FILE, SavedModelError, load


def load_model(name: str) -> tuple[nn.Module, Any]:
    """A model and its tokenizer from a built-in name, an eigenfast save, or a HF model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .builtin import BUILTIN_MODELS, load_builtin

    if name in BUILTIN_MODELS:
        return load_builtin(name)
    path = Path(name)
    if not path.is_dir():
        raise SystemExit(
            f"error: --model {name!r} is neither a directory nor a built-in model ({', '.join(BUILTIN_MODELS)})"
        )
    model = load(path) if (path / SPEC_FILE).is_file() else AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: no tokenizer in {path} ({err}); save the tokenizer beside the model") from None
    return model, tokenizer


def task_splits(task: str, tokenizer: Any, seed: int) -> tuple[TaskData, TaskData]:
    """The task's seeded 80/20 (train, test) split."""
    return load_task(task, tokenizer).split(0.8, seed=seed)


def parse_p(text: str) -> "float | str":
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--p must be a number in [0, 1] or 'auto', got {text!r}") from None


def parse_components(text: str) -> tuple[str, ...]:
    parts = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in parts if c not in COMPONENTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    return parts


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.model, args.components, args.candidates, args.batch_size, args.seed)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .prune import prune

    model, tokenizer = load_model(args.model)
    train, test = task_splits(args.task, tokenizer, args.seed)
    result = prune(
        model,
        train,
        p=args.p,
        components=args.components,
        pairs=args.pairs,
        batch_size=args.batch_size,
        extrapolate=args.extrapolate,
        candidates=args.candidates,
        test_data=test,
        seed=args.seed,
        tokenizer=tokenizer,
    )
    print(result.report.table())
    out = result.save(args.out)
    print(f"saved the pruned model (p={result.report.p:g}) to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model)
    train, test = task_splits(args.task, tokenizer, args.seed)
    data = {"train": train, "test": test}.get(args.split) or load_task(args.task, tokenizer)
    result = evaluate(model, data, args.batch_size, desc=f"evaluate ({args.split})")
    print(json.dumps({"model": args.model, "task": args.task, "split": args.split, **result.as_dict()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigenfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, model_default: str | None = None) -> None:
        p.add_argument("--model", default=model_default, required=model_default is None,
                       help="built-in model name, eigenfast save, or HF model directory")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--seed", type=int, default=0, help="seed of the 80/20 train/test split")

    demo = sub.add_parser("demo", help="eigenprune the built-in model on int_sum and print what happened")
    common(demo, "int_sum_gpt2")
    demo.add_argument("--components", type=parse_components, default=("k",))
    demo.add_argument("--candidates", type=parse_floats, default=(0.01, 0.05, 0.10, 0.30))
    demo.set_defaults(func=cmd_demo)

    prune = sub.add_parser("prune", help="eigenprune a model for a task and save it")
    common(prune)
    prune.add_argument("--task", required=True, help="int_sum, int_mult, or a .jsonl file of {prompt, target}")
    prune.add_argument("--p", type=parse_p, default="auto", help="fraction of singular values to freeze, or 'auto'")
    prune.add_argument("--components", type=parse_components, default=("k",), help="comma-separated, e.g. k,q,mlp_in")
    prune.add_argument("--pairs", choices=("all", "shift"), default="all")
    prune.add_argument("--extrapolate", choices=("mean", "last", "error"), default="mean")
    prune.add_argument("--candidates", type=parse_floats, default=(0.01, 0.05, 0.10, 0.30),
                       help="p values tried by --p auto")
    prune.add_argument("--out", required=True, help="directory to save the pruned model in")
    prune.set_defaults(func=cmd_prune)

    ev = sub.add_parser("eval", help="accuracy and loss of a model on a task")
    common(ev)
    ev.add_argument("--task", required=True)
    ev.add_argument("--split", choices=("train", "test", "all"), default="test")
    ev.set_defaults(func=cmd_eval)

    from .circuit.cli import register  # here, not at the top: circuit.cli imports this module

    register(sub)
    from .edges import cli as edges_cli  # temporary: the lead registers it in eigenfast/commands/

    edges_cli.add_arguments(sub.add_parser("edges", help="circuit discovery at edge level, methods side by side"))
    sub.choices["edges"].set_defaults(func=edges_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, SavedModelError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
