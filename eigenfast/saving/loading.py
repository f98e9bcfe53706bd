"""A model and its tokenizer from what a user types: a built-in name, an eigenfast save, or a HF folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data.splits import TRAINING_ATTRIBUTE, TrainingRecord, read_training_record
from ..errors import ModelLoadError
from ..rewrite.position_limit import guard_positions
from ..runtime.progress import transformers_bars_off
from . import atomic
from .serialization import SPEC_FILE, load_from, recover_interrupted_resaves

# One of these makes a folder's tokenizer loadable; tokenizer_config.json alone does not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
# What save_pretrained writes for the weights (one file, or an index of shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Pickled weights: loading them would unpickle a file from the folder; eigenfast reads safetensors only.
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_FOLDER = (
    "a model folder holds config.json, the weights (model.safetensors, as save_pretrained writes them; an eigenfast "
    "save also has eigenfast.json) and the tokenizer files (tokenizer.json or vocab.json...)"
)
# Every transformers call on a folder: run none of its code, never ask, never go to the network.
NOTHING_REMOTE = {"trust_remote_code": False, "local_files_only": True}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    training: TrainingRecord | None  # what the model was trained on, if it records it


def check_model_name(name: str) -> Path | None:
    """The folder ``name`` refers to (None for a built-in model); refuse, before any work, names that are neither."""
    from ..builtin import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        return None
    path = Path(name)
    if not path.is_dir():
        raise ModelLoadError(
            f"--model {name!r} is neither a directory nor a built-in model ({', '.join(BUILTIN_MODELS)}); "
            "pass a folder written by save_pretrained or eigenfast, or a built-in name"
        )
    recover_interrupted_resaves(path)
    missing = [what for what, names in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES))
               if not any((path / f).is_file() for f in names)]
    if missing == ["weights"] and any((path / f).is_file() for f in PICKLE_FILES):
        raise ModelLoadError(
            f"{path} holds its weights as pytorch_model.bin, a pickle, which eigenfast never loads (unpickling runs "
            "code from the file); convert it to safetensors where you trust it: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"
        )
    if missing:
        raise ModelLoadError(
            f"{path} is not a model folder: it has no {' and no '.join(missing)}; {MODEL_FOLDER}. "
            f"Pass such a folder, or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} holds a model but no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer beside the model: tokenizer.save_pretrained(folder)"
        )
    return path


def load_model(name: str) -> LoadedModel:
    """Load ``name``; every failure is an :class:`~eigenfast.errors.EigenfastError` naming the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..builtin import builtin_path, load_builtin

    path = check_model_name(name)
    if path is None:
        model, tokenizer = load_builtin(name)
        return LoadedModel(model, tokenizer, remember_training(model, builtin_path(name)))
    with atomic.reading(path) as files:  # the model and its tokenizer from one save, however many are written
        if (files / SPEC_FILE).is_file():
            model = load_from(files, path)
        else:
            try:
                with transformers_bars_off():
                    model = AutoModelForCausalLM.from_pretrained(files, use_safetensors=True, **NOTHING_REMOTE)
            except (OSError, ValueError, TypeError, KeyError) as err:
                raise ModelLoadError(f"cannot load the model in {path}: {str(err)[:500]}") from None
            model = guard_positions(model.eval())
        training = remember_training(model, path)
        try:
            # The model's own config: an eigenfast save's config.json is a stub that transformers would ask about.
            tokenizer = AutoTokenizer.from_pretrained(files, config=model.config, **NOTHING_REMOTE)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ModelLoadError(f"cannot load the tokenizer in {path} ({str(err)[:300]}); save it beside the model") from None
    return LoadedModel(model, tokenizer, training)


def remember_training(model: nn.Module, folder: Path) -> TrainingRecord | None:
    """The model's training record, kept on its config so pruned and extracted saves carry it along."""
    record = read_training_record(folder)
    if record is not None:
        setattr(model.config, TRAINING_ATTRIBUTE, record.as_dict())
    stored = getattr(model.config, TRAINING_ATTRIBUTE, None)
    return None if stored is None else TrainingRecord.from_dict(stored, f"{folder} (config.{TRAINING_ATTRIBUTE})")
