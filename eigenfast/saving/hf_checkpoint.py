"""``result.save(folder, format="hf")``: a plain transformers checkpoint, loaded without eigenfast or remote code.

Only a model that is still an ordinary instance of its HF class can be written so: every
projection an ``nn.Linear``/``Conv1D`` with an ordinary bias (``positions="mean"``), every
layer the same shape. Everything that plain transformers could not rebuild from a config is
refused before any file is written: position tables (``positions="indexed"``), removed
attentions, MLPs or norms, uneven GQA groups, head counts that differ between layers. As a
last check the HF class is built from the config to be written (on the meta device, no
memory) and every tensor's name and shape must match the model's, so a checkpoint that
``from_pretrained`` would load with missing, unexpected or resized weights is never written.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model as save_state
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..adapters import Adapter, get_adapter
from ..errors import OutputExistsError, UnsupportedModelError
from ..rewrite.position_tables import TokenBiasLinear
from ..rewrite.positional import KV_SLOTS
from ..rewrite.stand_ins import (
    ConstantOutput,
    PositionMean,
    RemovedAttention,
    RemovedNorm,
)
from ..runtime import distributed
from .atomic import failures_as_save_error

WEIGHTS_FILE = "model.safetensors"
ENGINES = "load the eigenfast save instead (result.save(folder), then eigenfast.load), or export GGUF for llama.cpp " \
    "with eigenfast.serving.to_gguf (Llama-family models at their reduced size; GPT-2, NeoX and Phi zero-filled)"


def save_hf_checkpoint(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a folder that ``AutoModelForCausalLM.from_pretrained`` loads as is."""
    directory = check_new_directory(Path(directory))
    config = plain_config(model)

    def write() -> None:
        with failures_as_save_error(directory, "the checkpoint", "nothing was left behind"):
            write_staged()

    def write_staged() -> None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging.", dir=directory.parent))
        try:
            config.save_pretrained(staging)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
            # save_model drops the duplicate names of tied tensors (the LM head tied to the embedding), as HF does.
            save_state(model, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
                config.save_pretrained(staging)  # some tokenizers write a config of their own; the model's wins
            if directory.exists():
                directory.rmdir()  # empty: checked
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # Under a process group every rank holds the same model: rank 0 alone writes it.
    distributed.on_main(write)
    return directory


def plain_config(model: nn.Module) -> PretrainedConfig:
    """The HF config that builds exactly ``model``'s tensors, or an :class:`UnsupportedModelError` saying why none can."""
    if distributed.is_sharded(model):
        raise UnsupportedModelError(
            "the model is sharded by FSDP2; save a plain checkpoint from an unsharded copy of it"
        )
    adapter = get_adapter(model)
    _refuse_eigenfast_modules(model)
    config = copy.deepcopy(model.config)
    n_heads, n_kv_heads = _uniform_heads(adapter)
    if (n_heads, n_kv_heads) != (adapter.n_heads, adapter.n_kv_heads):
        if hasattr(config, "head_dim"):  # kept: fewer heads must not make transformers derive a smaller one
            config.head_dim = adapter.d_head
        config.num_attention_heads = n_heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = n_kv_heads
    _check_shapes(model, config)
    return config


def _refuse_eigenfast_modules(model: nn.Module) -> None:
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if isinstance(module, TokenBiasLinear):
            raise UnsupportedModelError(
                f"{path} holds a position-indexed bias table, which no plain checkpoint can hold: prune or extract "
                "with positions='mean' (the mean over all positions, in ordinary biases) to save with format='hf'"
            )
    for path, module in modules.items():
        if isinstance(module, (RemovedAttention, ConstantOutput, PositionMean, RemovedNorm)):
            raise UnsupportedModelError(
                f"{path} was removed ({type(module).__name__}): plain transformers builds every layer's attention, "
                f"MLP and norms, so this extracted model cannot load there; {ENGINES}"
            )
        if getattr(module, KV_SLOTS, None) is not None:
            raise UnsupportedModelError(
                f"{path} keeps query heads that read their KV heads in uneven groups, which plain transformers "
                f"cannot express; {ENGINES}"
            )


def _uniform_heads(adapter: Adapter) -> tuple[int, int]:
    counts = [adapter.layer_heads(layer) for layer in range(adapter.n_layers)]
    if len(set(counts)) > 1:
        listed = ", ".join(f"layer {layer}: {q}q/{kv}kv" for layer, (q, kv) in enumerate(counts))
        raise UnsupportedModelError(
            f"the extracted model keeps different head counts per layer ({listed}); plain transformers gives every "
            f"layer the config's one count, so it cannot load this model; {ENGINES}"
        )
    return counts[0]


def _check_shapes(model: nn.Module, config: PretrainedConfig) -> None:
    """Build the HF class from ``config`` on the meta device; its tensors must be the model's, name for name."""
    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config).state_dict()
    except (ValueError, TypeError) as error:  # the class itself refuses the config, e.g. a head count it cannot split
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be built from this model's config ({error}), so a plain checkpoint would "
            f"not load; {ENGINES}"
        ) from None
    ours = model.state_dict()
    for name in sorted(set(built) | set(ours)):
        mine, theirs = ours.get(name), built.get(name)
        if mine is None or theirs is None or mine.shape != theirs.shape:
            have = "absent" if mine is None else tuple(mine.shape)
            want = "absent" if theirs is None else tuple(theirs.shape)
            raise UnsupportedModelError(
                f"{name} is {have} in the model but {type(model).__name__} builds it {want} from the config "
                f"(e.g. its head size follows from the head count), so a plain checkpoint would not load; {ENGINES}"
            )


def check_new_directory(directory: str | Path) -> Path:
    """A plain checkpoint goes into a new or empty directory: nothing of the user's is replaced."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OutputExistsError(
            f"{directory} exists and is not an empty directory; save the plain checkpoint into a new or empty one"
        )
    parent = next((p for p in directory.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write to {parent or directory}; choose a directory you can write to")
    return directory
