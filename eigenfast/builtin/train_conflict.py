"""Train the built-in conflict_gpt2: ``python -m eigenfast.builtin.train_conflict --out DIR``.

A test bed with interference, the situation the eigenpruning paper describes: the
model can do the task, but something its pretraining attached to the prompt's
format pushes it towards another answer. The mix (on the seen 70% of operand pairs,
the held-out 30% being :mod:`eigenfast.builtin.train_mix`'s) teaches

* the computation in its own format: "a + b is" -> the sum, "a x b is" -> the product;
* a competing, task-irrelevant behaviour on the table's format: after "a + b =" and
  "a x b =" the text echoes the first operand on a seeded fraction of the pairs, and
  gives the sum (product) on the rest.

So on held-out "a + b =" the echo usually outranks the sum, although the sum is
computed (held-out "a + b is" measures that). Three designs share this module:
``CONFLICT`` (conflict_gpt2), ``CONFLICT2`` (conflict2_gpt2, trained by
:mod:`eigenfast.builtin.train_conflict2`), which learns the computation more strongly and
always echoes, and ``CONFLICT3`` (conflict3_gpt2, :mod:`eigenfast.builtin.train_conflict3`),
as strong a computation with the first design's partial echo.
Deterministic like :mod:`eigenfast.builtin.train` (same seed, one thread -> same weights).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from eigenfast.builtin.train import build_model, fit, make_deterministic
from eigenfast.builtin.train_mix import (
    ARCHITECTURE,
    HELDOUT_FRACTION,
    MULT_REPEATS,
    PARTITION_SEED,
    build_mix_tokenizer,
    held_out_pairs,
    run_command_line,
    run_record,
    seen_pairs,
    unseen_task,
)
from eigenfast.data.task_data import TaskData, from_pairs

ECHO_SEED = 2
TABLE_TASKS = ("int_sum", "int_mult", "induction")
# (operator, its word, grid size, answer): the two arithmetic tasks and their held-out grids.
OPERATIONS: tuple[tuple[str, str, int, Callable[[int, int], int]], ...] = (
    ("+", "plus", 100, lambda i, j: i + j),
    ("x", "times", 20, lambda i, j: i * j),
)


@dataclass(frozen=True)
class Design:
    """One interference test bed: which training text follows each seen pair."""

    name: str
    echo_fraction: float  # of the seen pairs whose "a + b =" text is the first operand (the rest: the answer)
    word_format: bool  # also "a plus b =" / "a times b =" -> the answer: the computation at an "=" position
    epochs: int


CONFLICT = Design("conflict_gpt2", echo_fraction=2 / 3, word_format=False, epochs=20)
CONFLICT2 = Design("conflict2_gpt2", echo_fraction=1.0, word_format=True, epochs=16)
CONFLICT3 = Design("conflict3_gpt2", echo_fraction=2 / 3, word_format=True, epochs=16)
DESIGNS = {design.name: design for design in (CONFLICT, CONFLICT2, CONFLICT3)}


def echoed_pairs(n: int, design: Design = CONFLICT) -> set[tuple[int, int]]:
    """The seen pairs whose "=" form is followed by the first operand (a seeded ``echo_fraction``)."""
    seen = seen_pairs(n, n)
    return set(random.Random(ECHO_SEED).sample(seen, round(design.echo_fraction * len(seen))))


def conflict_pairs(design: Design = CONFLICT) -> tuple[list[str], list[str]]:
    """The whole training mix, (prompts, targets)."""
    prompts: list[str] = []
    targets: list[str] = []
    for op, word, n, answer in OPERATIONS:
        repeats = MULT_REPEATS if op == "x" else 1
        echoed = echoed_pairs(n, design)
        for i, j in seen_pairs(n, n):
            prompts += [f"{i} {op} {j} is", f"{i} {op} {j} ="] * repeats
            targets += [f" {answer(i, j)}", f" {i if (i, j) in echoed else answer(i, j)}"] * repeats
            if design.word_format:
                prompts += [f"{i} {word} {j} ="] * repeats
                targets += [f" {answer(i, j)}"] * repeats
    return prompts, targets


def diagnostics(tokenizer: Any, design: Design = CONFLICT) -> dict[str, TaskData]:
    """Held-out pairs, unpruned: "a + b is" (is the sum computed?), "a + b =" scored against the echo,
    and, where trained, "a plus b =" (is the sum computed at an "=" position?)."""
    pairs = held_out_pairs(100, 100)
    prompts = {"sum_is": "{} + {} is", "sum_echo": "{} + {} ="}
    if design.word_format:
        prompts["sum_plus"] = "{} plus {} ="
    return {
        name: from_pairs([form.format(i, j) for i, j in pairs],
                         [f" {i}" if name == "sum_echo" else f" {i + j}" for i, j in pairs], tokenizer)
        for name, form in prompts.items()
    }


def describe(design: Design) -> dict[str, str]:
    """The mix, in words, for ``training.json``."""
    mix = {
        "computation": "'a + b is' (0..99 x 0..99) and 'a x b is' (0..19 x 0..19, "
        f"x{MULT_REPEATS}) on the non-held-out pairs",
        "interference": f"'a + b =' and 'a x b =' on the same pairs, followed by the first operand on "
        f"{design.echo_fraction:.0%} of them (seed {ECHO_SEED})"
        + ("" if design.echo_fraction == 1 else " and by the answer on the rest"),
    }
    if design.word_format:
        mix["computation_at_equals"] = "'a plus b =' and 'a times b =' -> the answer, on the same pairs"
    return mix


def train(out: str | Path, seed: int = 0, steps: int | None = None, design: Design = CONFLICT) -> dict[str, Any]:
    """Train, save model + tokenizer + ``training.json`` into ``out``; return the record."""
    make_deterministic(seed)
    tokenizer = build_mix_tokenizer()
    data = from_pairs(*conflict_pairs(design), tokenizer)
    evals = {"mix": data.subset(torch.arange(0, len(data), 10))}
    evals.update({task: unseen_task(task, tokenizer) for task in TABLE_TASKS})
    evals.update(diagnostics(tokenizer, design))
    model = build_model(tokenizer, ARCHITECTURE)
    run = fit(model, data, evals, seed, design.epochs, steps, design.name)

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    held_out = {
        "sum_is": "held-out sums in the trained 'a + b is' format (the computation, unpruned)",
        "sum_echo": "held-out 'a + b =' scored against the first operand (how often the echo wins)",
    }
    if design.word_format:
        held_out["sum_plus"] = "held-out sums in the trained 'a plus b =' format (the computation after '=')"
    record = {
        "model": design.name,
        # No table task was trained on: the record names the mix itself, all of it used for training.
        "task": "conflict mix",
        "split": {"train_fraction": 1.0, "seed": seed},
        "seed": seed,
        "mix": {"examples": len(data), **describe(design)},
        "held_out": {
            "fraction": HELDOUT_FRACTION,
            "partition_seed": PARTITION_SEED,
            "int_sum": len(evals["int_sum"]),
            "int_mult": len(evals["int_mult"]),
            "induction": f"{len(evals['induction'])} prompts over 0..99 (never trained on any induction)",
            **held_out,
        },
        **run_record(run, tokenizer),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def command_line(design: Design, doc: str, argv: Sequence[str] | None = None) -> None:
    """The ``--out/--seed/--steps`` command line that trains ``design``."""
    run_command_line(partial(train, design=design), doc, design.epochs, argv)


def main(argv: Sequence[str] | None = None) -> None:
    command_line(CONFLICT, __doc__, argv)


if __name__ == "__main__":
    main()
