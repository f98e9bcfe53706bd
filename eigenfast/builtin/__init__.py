"""Tiny models eigenfast trains itself and ships, so demos and tests need no download.

Each model is a folder beside this file holding HF ``save_pretrained`` output,
its tokenizer and a ``training.json`` written by its training script (``_TRAINERS``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..data.splits import TRAINING_ATTRIBUTE, read_training_record
from ..data.task_data import TaskData
from ..errors import MissingFilesError, ModelLoadError
from ..rewrite.position_limit import guard_positions
from ..runtime.progress import transformers_bars_off

BUILTIN_MODELS: dict[str, str] = {
    "int_sum_gpt2": "4-layer GPT-2 (d_model 128) trained on the int_sum train split; "
    "stopped early at about 54% test accuracy so pruning has room to help",
    "int_sum_llama": "4-layer Llama (d_model 128, 4 query heads sharing 2 KV heads, SwiGLU, RoPE, biases on) "
    "trained like int_sum_gpt2 on the int_sum train split; stopped early at about 51% test accuracy",
    "mix_gpt2": "4-layer GPT-2 (d_model 96) pretrained on a synthetic mix (sums and products in other "
    "formats, induction over other numbers, filler text); never tuned on the table's task formats",
    "conflict_gpt2": "4-layer GPT-2 (d_model 96) that learned sums and products as 'a + b is', while after "
    "'a + b =' its training text mostly echoed the first operand: the task's computation with interference",
    "conflict2_gpt2": "4-layer GPT-2 (d_model 96) that learned sums and products as 'a + b is' and 'a plus b =', "
    "while after 'a + b =' its training text always echoed the first operand: a stronger computation, "
    "routed around by the table's format",
    "conflict3_gpt2": "4-layer GPT-2 (d_model 96) with conflict2_gpt2's computation and conflict_gpt2's partial "
    "echo: after 'a + b =' its training text echoed the first operand on two thirds of the pairs",
}

_HERE = Path(__file__).resolve().parent
# The module under eigenfast.builtin whose ``--out DIR`` run rebuilds each model.
_TRAINERS = {"int_sum_gpt2": "train", "int_sum_llama": "train_llama", "mix_gpt2": "train_mix", "conflict_gpt2": "train_conflict",
             "conflict2_gpt2": "train_conflict2",
             "conflict3_gpt2": "train_conflict3"}


def builtin_path(name: str = "int_sum_gpt2") -> Path:
    """The folder of a shipped model."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}")
    path = _HERE / name
    if not (path / "config.json").is_file():
        raise MissingFilesError(
            f"built-in model {name!r} is missing its files at {path}; "
            f"rebuild it with: python -m eigenfast.builtin.{_TRAINERS[name]} --out {path}"
        )
    return path


def load_builtin(name: str = "int_sum_gpt2") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` loaded offline, the model in eval mode and float32."""
    path = builtin_path(name)
    # Eager attention is what the model was trained and scored with (and exposes attention weights).
    with transformers_bars_off():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Kept on the config so that pruned and extracted saves still say which examples it trained on.
    setattr(model.config, TRAINING_ATTRIBUTE, read_training_record(path).as_dict())
    return guard_positions(model).eval(), tokenizer


def heldout_task(name: str, task: str, tokenizer: Any) -> TaskData:
    """A task's examples that the built-in model ``name`` never trained on (the pruning table uses only these)."""
    from eigenfast.data.tasks import TASKS

    if name in ("int_sum_gpt2", "int_sum_llama"):
        from .train import int_sum_split

        if task == "int_sum":
            return int_sum_split(tokenizer)[1]
        return TASKS[task](tokenizer)  # it never saw any other task
    if name in ("mix_gpt2", "conflict_gpt2", "conflict2_gpt2", "conflict3_gpt2"):
        from .train_mix import unseen_task  # the conflict models hold out the same pairs in the same formats

        return unseen_task(task, tokenizer)
    raise ModelLoadError(f"unknown built-in model {name!r}; available: {', '.join(sorted(BUILTIN_MODELS))}")
