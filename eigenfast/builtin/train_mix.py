"""Train the built-in mix_gpt2: ``python -m eigenfast.builtin.train_mix --out DIR``.

A small LM "pretrained" on a broad synthetic mix, then prompted in forms it was
never tuned on, like the paper's pretrained LMs:

* sums as "a + b is" and "a plus b =", products as "a x b is" and "a times b =",
  on 70% of the operand pairs (the rest are held out, in every format);
* induction (copy what followed a repeated number) over the numbers 100..400 only;
* text-like filler: word sequences from a fixed random bigram chain.

The table's tasks use the paper's formats "a + b =" and "a x b =" on held-out pairs,
and induction over 0..99: each combines pieces the model learned, never seen together.
Deterministic like :mod:`eigenfast.builtin.train` (same seed, one thread -> same weights).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from eigenfast.builtin.tokenizer import build_tokenizer
from eigenfast.builtin.train import build_model, fit, hyperparameters, make_deterministic, versions
from eigenfast.data.task_data import TaskData, from_pairs
from eigenfast.data.tasks import INDUCTION_LENGTH, induction_pairs
from eigenfast.errors import DataError

NAME = "mix_gpt2"
ARCHITECTURE = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 96,
    "n_positions": 16,
    "activation_function": "gelu",
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
FILLER_WORDS = tuple(
    "the a of and to in on at it we you they see go make take red blue big small cat dog tree house".split()
)
EXTRA_WORDS = ("plus", "times", "is", *FILLER_WORDS)
HELDOUT_FRACTION = 0.3
PARTITION_SEED = 0
MIX_SEED = 1
MULT_REPEATS = 4  # products have 20x20 pairs against 100x100 sums: repeat them so they are not drowned
INDUCTION_PRETRAIN = 6000
FILLER_DOCS = 4000
EPOCHS = 15


def held_out_pairs(n_left: int, n_right: int) -> list[tuple[int, int]]:
    """The operand pairs no pretraining example uses: a seeded ``HELDOUT_FRACTION`` of the grid."""
    grid = [(i, j) for i in range(n_left) for j in range(n_right)]
    random.Random(PARTITION_SEED).shuffle(grid)
    return sorted(grid[: round(HELDOUT_FRACTION * len(grid))])


def seen_pairs(n_left: int, n_right: int) -> list[tuple[int, int]]:
    held = set(held_out_pairs(n_left, n_right))
    return [(i, j) for i in range(n_left) for j in range(n_right) if (i, j) not in held]


def filler_pairs(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Word sequences of a fixed random bigram chain; the answer is the chain's next word."""
    successor = {w: rng.sample(FILLER_WORDS, 2) for w in FILLER_WORDS}
    prompts, targets = [], []
    for _ in range(n):
        words = [rng.choice(FILLER_WORDS)]
        for _ in range(rng.randrange(2, 7)):
            words.append(rng.choice(successor[words[-1]]))
        prompts.append(" ".join(words[:-1]))
        targets.append(f" {words[-1]}")
    return prompts, targets


def mix_pairs() -> tuple[list[str], list[str]]:
    """The whole pretraining mix, (prompts, targets)."""
    rng = random.Random(MIX_SEED)
    prompts: list[str] = []
    targets: list[str] = []
    for i, j in seen_pairs(100, 100):
        prompts += [f"{i} + {j} is", f"{i} plus {j} ="]
        targets += [f" {i + j}"] * 2
    for i, j in seen_pairs(20, 20):
        prompts += [f"{i} x {j} is", f"{i} times {j} ="] * MULT_REPEATS
        targets += [f" {i * j}"] * (2 * MULT_REPEATS)
    for more in (induction_pairs(INDUCTION_PRETRAIN, INDUCTION_LENGTH, low=100, high=401, seed=MIX_SEED),
                 filler_pairs(FILLER_DOCS, rng)):
        prompts += more[0]
        targets += more[1]
    return prompts, targets


def build_mix_tokenizer() -> Any:
    return build_tokenizer(EXTRA_WORDS)


def unseen_task(task: str, tokenizer: Any) -> TaskData:
    """The table's task data for this model: the paper's prompt formats, on nothing the mix contains."""
    from eigenfast.data.tasks import induction

    if task == "int_sum":
        pairs = held_out_pairs(100, 100)
        return from_pairs([f"{i} + {j} =" for i, j in pairs], [f" {i + j}" for i, j in pairs], tokenizer)
    if task == "int_mult":
        pairs = held_out_pairs(20, 20)
        return from_pairs([f"{i} x {j} =" for i, j in pairs], [f" {i * j}" for i, j in pairs], tokenizer)
    if task == "induction":
        return induction(tokenizer)  # numbers 0..99; the mix's induction uses 100..400 only
    raise DataError(f"{NAME} has no held-out data for task {task!r}; use int_sum, int_mult or induction")


def train(out: str | Path, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
    """Train, save model + tokenizer + ``training.json`` into ``out``; return the record."""
    make_deterministic(seed)
    tokenizer = build_mix_tokenizer()
    data = from_pairs(*mix_pairs(), tokenizer)
    evals = {"mix": data.subset(torch.arange(0, len(data), 10))}
    evals.update({task: unseen_task(task, tokenizer) for task in ("int_sum", "int_mult", "induction")})
    model = build_model(tokenizer, ARCHITECTURE)
    run = fit(model, data, evals, seed, EPOCHS, steps, NAME)

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {
        "model": NAME,
        # No table task was trained on: the whole record names the mix itself, all of it used for training.
        "task": "mix",
        "split": {"train_fraction": 1.0, "seed": seed},
        "seed": seed,
        "mix": {
            "examples": len(data),
            "mix_seed": MIX_SEED,
            "sum": "'a + b is', 'a plus b =' on the non-held-out pairs of 0..99 x 0..99",
            "mult": f"'a x b is', 'a times b =' on the non-held-out pairs of 0..19 x 0..19, x{MULT_REPEATS}",
            "induction": f"{INDUCTION_PRETRAIN} prompts over the numbers 100..400",
            "filler": f"{FILLER_DOCS} bigram-chain word sequences",
        },
        "held_out": {
            "fraction": HELDOUT_FRACTION,
            "partition_seed": PARTITION_SEED,
            "int_sum": len(evals["int_sum"]),
            "int_mult": len(evals["int_mult"]),
            "induction": f"{len(evals['induction'])} prompts over 0..99 (eigenfast.data.tasks.induction)",
        },
        **run_record(run, tokenizer),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def run_record(run: Any, tokenizer: Any) -> dict[str, Any]:
    """The training.json fields every mix-style model records about its run (after its own data fields)."""
    return {
        "steps": run.steps,
        "steps_per_epoch": run.steps_per_epoch,
        "hyperparameters": hyperparameters(tokenizer, ARCHITECTURE, run),
        "final": {k: v for k, v in run.history[-1].items() if k.endswith("_accuracy")},
        "history": run.history,
        "train_seconds": round(run.seconds, 1),
        **versions(),
    }


def run_command_line(train_model: Callable[..., dict[str, Any]], doc: str, epochs: int,
                     argv: Sequence[str] | None) -> None:
    """The ``--out/--seed/--steps`` command line shared by the mix-style training scripts."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model, tokenizer and training.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {epochs} epochs)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    record = train_model(args.out, seed=args.seed, steps=args.steps)
    print(f"saved {args.out}: " + ", ".join(f"{k} {v:.1%}" for k, v in record["final"].items())
          + f", {record['train_seconds']:.0f} s")


def main(argv: Sequence[str] | None = None) -> None:
    run_command_line(train, __doc__, EPOCHS, argv)


if __name__ == "__main__":
    main()
