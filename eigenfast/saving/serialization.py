"""Saving and loading pruned models: safetensors + JSON, never pickle.

A saved directory holds ``model.safetensors`` (the whole state dict),
``eigenfast.json`` (the HF config, which modules eigenfast replaced with their
shapes, the run's report, and the size of every file the save wrote),
optionally ``extras.safetensors`` (scores, masks) and the tokenizer, and a
``config.json`` + ``modeling_eigenfast.py`` pair that makes transformers either
load the folder through eigenfast (``trust_remote_code=True``) or refuse it
(see :mod:`eigenfast.saving.hub_module`); a plain ``from_pretrained`` never loads
these weights into an unmodified model. Loading rebuilds the HF model from its
config, puts the recorded eigenfast modules back in, then loads the weights
strictly, so a mismatched, truncated or damaged directory fails loudly.
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
from safetensors.torch import load_file, load_model, save_file
from safetensors.torch import save_model as save_state
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import get_adapter
from ..errors import OutputExistsError, SavedModelError
from ..rewrite.kinds import MODULE_KINDS
from ..rewrite.position_limit import guard_positions
from ..rewrite.positional import install
from ..rewrite.surgery import ATTRIBUTES, replace_module, set_attributes
from ..runtime import distributed

FORMAT = "eigenfast"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 kept the HF config in config.json
SPEC_FILE = "eigenfast.json"
WEIGHTS_FILE = "model.safetensors"
EXTRAS_FILE = "extras.safetensors"
CONFIG_FILE = "config.json"
HUB_MODULE_FILE = "modeling_eigenfast.py"
VERSION_1_FILES = (CONFIG_FILE, WEIGHTS_FILE, EXTRAS_FILE, SPEC_FILE)

__all__ = ["SavedModelError", "load", "load_extras", "read_spec", "save_model"]


def check_writable_directory(directory: str | Path) -> Path:
    """Refuse, before any work, an output path that is a file or that cannot be created or written."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} is a file; choose a directory to save into")
    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write to {existing or directory}; choose a directory you can write to")
    return directory


def check_output_directory(directory: str | Path) -> Path:
    """Refuse, before any work, a directory that a save could not write or that holds someone else's files."""
    directory = check_writable_directory(directory)
    if directory.is_dir() and any(directory.iterdir()) and not (directory / SPEC_FILE).is_file():
        raise OutputExistsError(
            f"{directory} exists, is not empty and is not an eigenfast save; choose a new or empty directory"
        )
    return directory


def save_model(
    model: nn.Module,
    directory: str | Path,
    *,
    kind: str,
    report: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a save into ``directory``, replacing only the files of an earlier eigenfast save there.

    Everything is first written to a staging folder beside ``directory``; then each
    file is moved into place with an atomic rename, the files it replaces being kept
    aside until every rename succeeded (and put back if one fails). Files eigenfast
    did not write are never touched.
    """
    directory = check_output_directory(directory)
    # FSDP2 holds a sharded model's weights in shards: gather them whole (a collective on every rank) first.
    state = _gathered_state(model) if distributed.is_sharded(model) else None

    def write() -> None:
        previous = _files_of_previous_save(directory)
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging.", dir=directory.parent))
        try:
            _write_save(staging, model, kind, report, tensors, tokenizer, state)
            _move_into_place(staging, directory, previous)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # Under a process group every rank holds the same result: rank 0 alone writes it.
    distributed.on_main(write)
    return directory


def _gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2-sharded model, on rank 0's host (empty on the other ranks).

    Gathered one tensor at a time, in the same order on every rank, so no rank holds more
    than one whole tensor beyond what rank 0 keeps.
    """
    state = {}
    distributed.reshard(model)  # a forward may have left some units whole; gather from the shards alike
    for name, value in model.state_dict().items():
        whole = distributed.full_tensor(value.detach())
        if distributed.is_main_process():
            state[name] = whole.cpu().contiguous()
    return state


def _write_save(
    staging: Path, model: nn.Module, kind: str, report: dict[str, Any] | None,
    tensors: dict[str, torch.Tensor] | None, tokenizer: Any, state: dict[str, torch.Tensor] | None = None,
) -> None:
    if state is None:
        save_state(model, str(staging / WEIGHTS_FILE))
    else:  # gathered from shards; shard_model refuses tied weights, so no tensor is shared
        save_file(state, str(staging / WEIGHTS_FILE))
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / EXTRAS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
        # The tokenizer writes its own copy of the model config on some versions; ours wins.
        (staging / CONFIG_FILE).unlink(missing_ok=True)
    shutil.copyfile(Path(__file__).with_name("hub_module.py"), staging / HUB_MODULE_FILE)
    stub = {
        "model_type": "eigenfast",
        "base_model_type": model.config.model_type,
        "auto_map": {
            "AutoConfig": "modeling_eigenfast.EigenfastConfig",
            "AutoModelForCausalLM": "modeling_eigenfast.EigenfastForCausalLM",
        },
        "note": "saved by eigenfast: load with eigenfast.load(folder), or "
        "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) with eigenfast installed",
    }
    (staging / CONFIG_FILE).write_text(json.dumps(stub, indent=2))
    files = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
    files[SPEC_FILE] = None  # written last, its own size is not recorded
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model_type": model.config.model_type,
        "config": model.config.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "files": files,
        "modules": [
            {"path": path, "kind": module.kind, "spec": module.spec()}
            for path, module in model.named_modules()
            if type(module) in MODULE_KINDS.values()
        ],
        "attributes": {
            path: getattr(module, ATTRIBUTES) for path, module in model.named_modules() if hasattr(module, ATTRIBUTES)
        },
        "report": report or {},
    }
    (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def _files_of_previous_save(directory: Path) -> set[str]:
    """The files an earlier eigenfast save wrote in ``directory`` (only those may be replaced or removed)."""
    if not (directory / SPEC_FILE).is_file():
        return set()
    try:
        spec = json.loads((directory / SPEC_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {SPEC_FILE}
    files = spec.get("files") if isinstance(spec, dict) else None
    if isinstance(files, dict):
        return {name for name in files if isinstance(name, str) and "/" not in name and name not in ("", ".", "..")}
    return set(VERSION_1_FILES)


def _move_into_place(staging: Path, directory: Path, previous: set[str]) -> None:
    # eigenfast.json goes last: until it is in place, the old spec (with the old sizes) names the save,
    # so an interrupted replacement is refused on load instead of loading a mix.
    names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == SPEC_FILE)
    backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.previous.", dir=directory.parent))
    moved: list[str] = []
    try:
        for name in names:
            if (directory / name).exists():
                os.replace(directory / name, backup / name)
            moved.append(name)
            os.replace(staging / name, directory / name)
    except BaseException:
        for name in reversed(moved):
            if (backup / name).exists():
                os.replace(backup / name, directory / name)
            else:
                (directory / name).unlink(missing_ok=True)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    for name in previous - set(names):
        if (directory / name).is_file():
            (directory / name).unlink()
    shutil.rmtree(backup, ignore_errors=True)


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
    if spec.get("version") not in READABLE_VERSIONS:
        raise SavedModelError(
            f"{path} has format version {spec.get('version')}, this eigenfast reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; save it again with this version"
        )
    return spec


def _check_size(directory: Path, spec: dict[str, Any], name: str) -> None:
    """A file shorter or longer than the save wrote it: truncated copy, or a file from another save."""
    expected = (spec.get("files") or {}).get(name)
    if expected is None:
        return
    actual = (directory / name).stat().st_size
    if actual != expected:
        raise SavedModelError(
            f"{directory / name} is {actual} bytes but the save wrote {expected}: it is truncated or comes "
            "from another save; copy the folder again or save the model again"
        )


def _base_config(directory: Path, spec: dict[str, Any]) -> Any:
    if spec["version"] == 1:
        try:
            return AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise SavedModelError(f"{directory}/{CONFIG_FILE} cannot be read ({err}); save the model again") from None
    values = spec.get("config")
    if not isinstance(values, dict) or values.get("model_type") != spec.get("model_type"):
        raise SavedModelError(f"{directory / SPEC_FILE} holds no config of model type {spec.get('model_type')!r}; "
                              "save the model again")
    values = dict(values)
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (KeyError, TypeError, ValueError) as err:
        raise SavedModelError(f"the config in {directory / SPEC_FILE} cannot be used ({err}); save the model again") from None


def load(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``result.save(directory)``; its logits equal the saved model's."""
    directory = Path(directory)
    spec = read_spec(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise SavedModelError(f"{directory} has no {WEIGHTS_FILE}; the save is incomplete, save the model again")
    _check_size(directory, spec, WEIGHTS_FILE)
    config = _base_config(directory, spec)
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
    return guard_positions(model).eval()


def load_extras(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors saved beside the model (scores, frozen masks...), or {} if none."""
    directory = Path(directory)
    path = directory / EXTRAS_FILE
    if not path.is_file():
        return {}
    _check_size(directory, read_spec(directory), EXTRAS_FILE)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise SavedModelError(f"{path} is corrupted ({str(err)[:300]}); save the model again") from None
