"""Saving and loading pruned models: safetensors + JSON, never pickle.

A saved directory holds the HF ``config.json``, ``model.safetensors`` (the
whole state dict), ``eigenfast.json`` (which modules eigenfast replaced, with
their shapes, plus the run's report) and optionally ``extras.safetensors``
(scores, masks) and the tokenizer. Loading rebuilds the HF model from its
config, puts the recorded eigenfast modules back in, then loads the weights
strictly, so a mismatched or damaged directory fails loudly.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model as save_state
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import get_adapter
from .modules import ATTRIBUTES, MODULE_KINDS, replace_module, set_attributes
from .positional import install

FORMAT = "eigenfast"
VERSION = 2  # 2: positions are arguments of the forward; RemovedAttention lost its cache_argument
SPEC_FILE = "eigenfast.json"
WEIGHTS_FILE = "model.safetensors"
EXTRAS_FILE = "extras.safetensors"


class SavedModelError(RuntimeError):
    """A saved eigenfast directory that is missing, damaged, or does not match its spec."""


def save_model(
    model: nn.Module,
    directory: str | Path,
    *,
    kind: str,
    report: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write everything to a temporary sibling, then move it into place: never half-written."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / SPEC_FILE).is_file():
        raise FileExistsError(
            f"{directory} exists, is not empty and is not an eigenfast save; choose a new or empty directory"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.config.to_json_file(staging / "config.json")
        save_state(model, str(staging / WEIGHTS_FILE))
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / EXTRAS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        spec = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "model_type": model.config.model_type,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "modules": [
                {"path": path, "kind": module.kind, "spec": module.spec()}
                for path, module in model.named_modules()
                if type(module) in MODULE_KINDS.values()
            ],
            "attributes": {
                path: getattr(module, ATTRIBUTES)
                for path, module in model.named_modules()
                if hasattr(module, ATTRIBUTES)
            },
            "report": report or {},
        }
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_spec(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise SavedModelError(f"{directory} is not a directory; pass the folder written by result.save()")
    path = directory / SPEC_FILE
    if not path.is_file():
        raise SavedModelError(f"{directory} has no {SPEC_FILE}: it was not written by eigenfast's result.save()")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SavedModelError(f"{path} is corrupted ({err}); save the model again") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("modules"), list):
        raise SavedModelError(f"{path} is not an eigenfast spec; save the model again")
    if spec.get("version") != VERSION:
        raise SavedModelError(
            f"{path} has format version {spec.get('version')}, this eigenfast reads version {VERSION}; "
            "save it again with this version"
        )
    return spec


def load(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``result.save(directory)``; its logits equal the saved model's."""
    directory = Path(directory)
    spec = read_spec(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise SavedModelError(f"{directory} has no {WEIGHTS_FILE}; the save is incomplete, save the model again")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise SavedModelError(f"{directory}/config.json cannot be read ({err}); save the model again") from None
    if config.model_type != spec.get("model_type"):
        raise SavedModelError(
            f"config.json says model type {config.model_type!r} but {SPEC_FILE} says {spec.get('model_type')!r}: "
            "the files come from different saves"
        )
    dtype = getattr(torch, spec.get("dtype", "float32"), torch.float32)
    extra = {"attn_implementation": spec["attn_implementation"]} if spec.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    get_adapter(model)
    for record in spec["modules"]:
        cls = MODULE_KINDS.get(record.get("kind"))
        if cls is None:
            raise SavedModelError(f"{SPEC_FILE} names an unknown module kind {record.get('kind')!r}")
        try:
            model.get_submodule(record["path"])
            replace_module(model, record["path"], cls.from_spec(record["spec"]).to(dtype))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise SavedModelError(f"{SPEC_FILE} entry {record.get('path')!r} does not fit the model: {err}") from None
    for path, values in spec.get("attributes", {}).items():
        try:
            set_attributes(model.get_submodule(path), values)
        except (AttributeError, TypeError) as err:
            raise SavedModelError(f"{SPEC_FILE} attributes of {path!r} do not fit the model: {err}") from None
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise SavedModelError(
            f"{weights} does not match {SPEC_FILE} or is corrupted: {str(err)[:500]}; save the model again"
        ) from None
    if spec["modules"]:
        install(model)
    return model.eval()


def load_extras(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors saved beside the model (scores, frozen masks...), or {} if none."""
    path = Path(directory) / EXTRAS_FILE
    return load_file(str(path)) if path.is_file() else {}
