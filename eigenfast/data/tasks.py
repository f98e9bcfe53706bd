"""The named tasks every command accepts, and the one that is not arithmetic.

``int_sum`` and ``int_mult`` live in :mod:`eigenfast.data`. ``induction``: a list of
distinct numbers, then one of them again; the answer is the number that followed it
the first time ("3 17 42 8 5 17" -> " 42"). It needs only number tokens, so every
built-in tokenizer can express it, and it is solved by copying (an induction head),
not by arithmetic.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from .task_data import TaskData, from_jsonl, from_pairs, int_mult, int_sum

INDUCTION_LENGTH = 5
INDUCTION_EXAMPLES = 3000


def induction_pairs(
    n: int = INDUCTION_EXAMPLES, length: int = INDUCTION_LENGTH, low: int = 0, high: int = 100, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``n`` distinct seeded prompts of ``length`` distinct numbers in [low, high) plus one repeat."""
    if length < 2:
        raise DataError(f"induction length must be >= 2 (a repeat needs a successor), got {length}")
    if high - low < length:
        raise DataError(f"induction needs at least {length} distinct numbers, the range [{low}, {high}) has {high - low}")
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts, targets = [], []
    # Rejection of duplicates keeps every prompt unique, so a split never puts one prompt on both sides.
    for _ in range(50 * n):
        if len(prompts) == n:
            break
        items = rng.sample(range(low, high), length)
        cue = rng.randrange(length - 1)
        prompt = " ".join(str(v) for v in [*items, items[cue]])
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
            targets.append(f" {items[cue + 1]}")
    if len(prompts) < n:
        raise DataError(f"could not draw {n} distinct induction prompts from [{low}, {high}); lower n")
    return prompts, targets


def induction(tokenizer: Any) -> TaskData:
    return from_pairs(*induction_pairs(), tokenizer)


TASKS: dict[str, Callable[[Any], TaskData]] = {"int_sum": int_sum, "int_mult": int_mult, "induction": induction}


def check_task(task: str) -> None:
    """Refuse, before any work, a task that is neither built in nor an existing file."""
    if task in TASKS or Path(task).is_file():
        return
    if task.endswith(".jsonl"):
        raise DataError(f"no such data file: {task}")
    raise DataError(f"unknown task {task!r}: use one of {', '.join(TASKS)} or a path to a .jsonl file")


def load_task(task: str, tokenizer: Any) -> TaskData:
    """A built-in task by name, or a JSONL file path."""
    check_task(task)
    if task in TASKS:
        return TASKS[task](tokenizer)
    return from_jsonl(task, tokenizer)
