"""Train the built-in int_sum GPT-2: ``python -m eigenfast.builtin.train --out DIR``.

The run is deterministic (fixed seed, one CPU thread, deterministic kernels),
so the same seed on the same machine gives bit-identical weights. It is
deliberately stopped early: the shipped model answers about half of the held-out
sums, which leaves eigenpruning room to help.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerFast

from eigenfast.builtin.tokenizer import build_tokenizer
from eigenfast.data.task_data import TaskData, from_pairs, int_sum_pairs
from eigenfast.runtime.forward import evaluate

ARCHITECTURE = {
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "n_positions": 16,
    # torch's fused GELU: GPT-2's default tanh approximation is several slow elementwise ops on CPU.
    "activation_function": "gelu",
    # No dropout: the run is short and early-stopped, so there is nothing to regularise against.
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
OPTIMIZER = {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.9, 0.98)}
BATCH_SIZE = 128
EPOCHS = 12
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0
EVAL_BATCH_SIZE = 2048


def make_deterministic(seed: int) -> None:
    """Seed everything and pin the CPU to one thread: thread count changes float summation order."""
    transformers.set_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def config_fields(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """What every built-in's HF config takes from the tokenizer, whatever the architecture."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "attn_implementation": "eager",
    }


def build_model(tokenizer: PreTrainedTokenizerFast, architecture: dict[str, Any] = ARCHITECTURE) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(**config_fields(tokenizer), **architecture))


def int_sum_split(tokenizer: Any) -> tuple[TaskData, TaskData]:
    """The (train, test) split every eigenfast tool uses for int_sum."""
    return from_pairs(*int_sum_pairs(), tokenizer).split(TRAIN_FRACTION, seed=SPLIT_SEED)


def shuffled_batches(data: TaskData, batch_size: int, generator: torch.Generator) -> Iterator[TaskData]:
    """Endless epochs, each a fresh seeded permutation."""
    while True:
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            yield data.subset(order[start:start + batch_size])


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero: the final weights come from a calm, low-LR phase."""
    def factor(step: int) -> float:
        return min((step + 1) / warmup, 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    return factor


@dataclass
class Fit:
    """What :func:`fit` did: the step plan and one evaluation row per epoch."""

    steps: int
    steps_per_epoch: int
    warmup: int
    history: list[dict[str, Any]]
    seconds: float


def fit(
    model: PreTrainedModel,
    train_data: TaskData,
    evals: dict[str, TaskData],
    seed: int,
    epochs: int,
    steps: int | None,
    desc: str,
) -> Fit:
    """AdamW on the answer token at the last prompt position; ``evals`` are scored after every epoch."""
    model.train()
    steps_per_epoch = math.ceil(len(train_data) / BATCH_SIZE)
    total = steps if steps is not None else epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total)
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    batches = shuffled_batches(train_data, BATCH_SIZE, torch.Generator().manual_seed(seed))

    history = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step")
    for step, batch in zip(range(1, total + 1), batches):
        logits = model(**batch.model_inputs(), logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % steps_per_epoch == 0 or step == total:
            row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(loss.item(), 4)}
            row.update({f"{name}_accuracy": evaluate(model, data, EVAL_BATCH_SIZE).accuracy for name, data in evals.items()})
            history.append(row)
            tqdm.write(f"epoch {row['epoch']:g}: loss {row['loss']:.3f}  " + "  ".join(
                f"{name} {row[f'{name}_accuracy']:.1%}" for name in evals
            ))
    bar.close()
    return Fit(total, steps_per_epoch, warmup, history, time.perf_counter() - start)


def hyperparameters(tokenizer: PreTrainedTokenizerFast, architecture: dict[str, Any], run: Fit) -> dict[str, Any]:
    return {
        "architecture": architecture,
        "vocab_size": len(tokenizer),
        "optimizer": "AdamW",
        **OPTIMIZER,
        "batch_size": BATCH_SIZE,
        "schedule": "linear warm-up then cosine to 0",
        "warmup_steps": run.warmup,
        "loss": "cross-entropy on the answer token at the last prompt position",
    }


def versions() -> dict[str, str]:
    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__}


def train(
    out: str | Path,
    seed: int = 0,
    steps: int | None = None,
    *,
    name: str = "int_sum_gpt2",
    build: Callable[[PreTrainedTokenizerFast, dict[str, Any]], PreTrainedModel] = build_model,
    architecture: dict[str, Any] = ARCHITECTURE,
    epochs: int = EPOCHS,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``build(tokenizer, architecture)`` on the int_sum train split, save model + tokenizer +
    ``training.json`` into ``out``; return the record. ``notes`` join the recorded hyperparameters."""
    make_deterministic(seed)
    tokenizer = build_tokenizer()
    train_data, test_data = int_sum_split(tokenizer)
    model = build(tokenizer, architecture)
    run = fit(model, train_data, {"train": train_data, "test": test_data}, seed, epochs, steps, name)

    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    record = {
        "model": name,
        "task": "int_sum",
        "seed": seed,
        "split": {"train_fraction": TRAIN_FRACTION, "seed": SPLIT_SEED, "train": len(train_data), "test": len(test_data)},
        "steps": run.steps,
        "steps_per_epoch": run.steps_per_epoch,
        "hyperparameters": {**hyperparameters(tokenizer, architecture, run), **(notes or {})},
        "final_train_accuracy": run.history[-1]["train_accuracy"],
        "final_test_accuracy": run.history[-1]["test_accuracy"],
        "history": run.history,
        "train_seconds": round(run.seconds, 1),
        **versions(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: Sequence[str] | None = None, train_model: Callable[..., dict[str, Any]] = train,
         doc: str = __doc__, epochs: int = EPOCHS) -> None:
    """The ``--out/--seed/--steps`` command line of an int_sum trainer (``train_model`` takes those three)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model, tokenizer and training.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"optimizer steps to run (default: {epochs} epochs); the LR schedule is fitted to it",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    record = train_model(args.out, seed=args.seed, steps=args.steps)
    print(
        f"saved {args.out}: train {record['final_train_accuracy']:.1%}, "
        f"test {record['final_test_accuracy']:.1%}, {record['train_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
