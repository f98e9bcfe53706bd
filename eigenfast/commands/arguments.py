"""Argument types and options shared by the commands; a bad value is a usage error (exit status 2)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

from ..adapters import COMPONENTS
from ..data.splits import Part
from ..data.tasks import TASKS
from ..eigenprune.significance import validate_significance
from ..errors import ArgumentError
from ..rewrite.plain_bias import POSITIONS
from ..saving.hf_checkpoint import check_new_directory
from ..saving.serialization import FORMATS as SAVE_FORMATS
from ..saving.serialization import prepare_output_directory

MODEL_HELP = "built-in model name (int_sum_gpt2), eigenfast save, or Hugging Face model folder with its tokenizer"
T = TypeVar("T")
TASK_HELP = f"{', '.join(TASKS)}, or a .jsonl file of {{\"prompt\": ..., \"target\": ...}} lines"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, except for required options, which have none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def significance(text: str) -> float:
    """The level of p="auto"'s sign-test gate; 0 turns the gate off (the API's rule, in the option's words)."""
    try:
        value = float(text)
        validate_significance(value)  # an ArgumentError is a ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--significance must be a level in [0, 1), e.g. 0.05 (0: keep the p most accurate on validation, "
            f"whatever its margin over the unpruned model), got {text!r}"
        ) from None
    return value


SELECT_HELP = ("what --p auto ranks candidates by: accuracy on val, or pooled over both folds of a 2-fold cross-fit "
               "(each p also scored on val and judged on the scoring data: twice the evidence, twice the scoring)")
SIGNIFICANCE_HELP = ("keep a pruned p only if it beats the unpruned model on the validation examples at this level "
                     "(exact one-sided sign test, family-wise over the candidates); 0 turns the test off")


def p_or_auto(text: str) -> "float | str":
    if text == "auto":
        return text
    try:
        return fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--p must be a number in [0, 1] or 'auto', got {text!r}") from None


def comma_list(item: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """A type for ``A,B,...``: each item parsed by ``item``; at least one."""

    def parse(text: str) -> tuple[T, ...]:
        values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    parse.__name__ = f"list of {getattr(item, '__name__', 'values')}"
    return parse


def component(text: str) -> str:
    if text not in COMPONENTS:
        raise argparse.ArgumentTypeError(f"unknown component {text!r}; choose from {', '.join(COMPONENTS)}")
    return text


def add_model_options(parser: argparse.ArgumentParser, model_default: str | None = None, batch_size: int = 256) -> None:
    parser.add_argument("--model", default=model_default, required=model_default is None, help=MODEL_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="examples per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random splits and draws")


def print_parts(*parts: Part) -> None:
    """Say where every number printed after this comes from."""
    print("data (every number below names one of these):")
    for part in parts:
        print(f"  {part.describe()}")


def add_plain_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--positions and --format: whether the result is a plain transformers checkpoint (docs/SERVING.md)."""
    parser.add_argument("--positions", choices=POSITIONS, default="indexed",
                        help=f"what {what} become: their mean at each token position (a table eigenfast serves), or "
                             "their mean over all positions (ordinary biases: a plain HF model)")
    parser.add_argument("--format", choices=SAVE_FORMATS, default="eigenfast",
                        help="how --out is written: an eigenfast save (eigenfast.load), or a plain transformers "
                             "checkpoint (needs --positions mean; --out must be new or empty)")


def check_plain_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, a plain checkpoint of a model that would hold position tables, or an --out it cannot use."""
    if args.format == "hf":
        if args.positions != "mean":
            raise ArgumentError("--format hf writes a plain checkpoint, which cannot hold position tables: add --positions mean")
        check_new_directory(args.out)
    else:
        prepare_output_directory(args.out)
