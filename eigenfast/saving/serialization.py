"""Saving and loading pruned models: safetensors + JSON, never pickle.

A save holds ``model.safetensors`` (the whole state dict), ``eigenfast.json`` (the HF
config, which modules eigenfast replaced with their shapes, the run's report, and the
size and SHA-256 of every other file of the save), optionally ``extras.safetensors``
(scores, masks) and the tokenizer, and a ``config.json`` + ``modeling_eigenfast.py``
pair that makes transformers either load the folder through eigenfast
(``trust_remote_code=True``) or refuse it (see :mod:`eigenfast.saving.hub_module`); a
plain ``from_pretrained`` never loads these weights into an unmodified model.

The files of one save are written together and switched in at once
(:mod:`eigenfast.saving.atomic`). Loading trusts nothing in the folder: it checks every
field of the spec (:mod:`eigenfast.saving.spec_schema`) and every file's hash, builds
the model on the meta device and compares it with the weights file's header before
allocating anything, runs no code from the folder and asks transformers for nothing
beyond its own classes, then loads the weights strictly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from safetensors.torch import save_model as save_state
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import get_adapter
from ..errors import ArgumentError, EigenfastError, OutputExistsError, SavedModelError
from ..rewrite.kinds import MODULE_KINDS
from ..rewrite.position_limit import guard_positions
from ..rewrite.positional import install
from ..rewrite.surgery import ATTRIBUTES, replace_module, set_attributes
from ..runtime import distributed
from . import atomic, checksums, interrupted_resaves
from .hf_checkpoint import save_hf_checkpoint
from .spec_schema import check_spec

log = logging.getLogger(__name__)

PROBE_PREFIX = ".eigenfast-probe."  # the empty folder check_writable_directory makes to test for write access

FORMAT = "eigenfast"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1 kept the HF config in config.json; 1 and 2 were written flat, without hashes
FORMATS = ("eigenfast", "hf")  # what save_model(format=...) writes: this save, or a plain transformers checkpoint
SPEC_FILE = "eigenfast.json"
WEIGHTS_FILE = "model.safetensors"
EXTRAS_FILE = "extras.safetensors"
CONFIG_FILE = "config.json"
HUB_MODULE_FILE = "modeling_eigenfast.py"
VERSION_1_FILES = (CONFIG_FILE, WEIGHTS_FILE, EXTRAS_FILE, SPEC_FILE)
# Every name a version 1 or 2 save could write: only files of these names are ever taken over from one,
# whatever its spec lists (a spec is the folder's, not eigenfast's, word).
FLAT_SAVE_NAMES = frozenset({
    *VERSION_1_FILES, HUB_MODULE_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
})
LARGEST_SPEC = 1 << 28  # bytes; a spec is kilobytes, a report at most megabytes

__all__ = ["SavedModelError", "load", "load_extras", "read_spec", "save_model"]


def check_writable_directory(directory: str | Path) -> Path:
    """Refuse, before any work, an output path that is a file or where nothing can be created.

    Tried for real (a folder made and removed where the save would go): permissions,
    read-only file systems and the superuser's rights all answer as they will for the save.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} is a file; choose a directory to save into")
    existing = next((p for p in [directory, *directory.parents] if p.exists()), Path("."))
    try:
        probe = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as err:
        raise OutputExistsError(
            f"cannot write to {directory}: {existing} refuses new files ({err.strerror or err}); "
            "choose a directory you can write to"
        ) from None
    # A process killed between making its probe and removing it leaves the empty folder behind: the next
    # check removes every empty probe there, and another check running at once may remove this one first.
    for leftover in {Path(probe), *existing.glob(PROBE_PREFIX + "*")}:
        with contextlib.suppress(OSError):  # gone already, or not an empty folder: not ours to remove
            os.rmdir(leftover)
    return directory


def is_save_folder(directory: Path) -> bool:
    return (directory / SPEC_FILE).is_file() or atomic.has_state(directory)


def prepare_output_directory(directory: str | Path) -> Path:
    """Make ``directory`` ready for a save, before any work: finish or roll back a re-save that older eigenfast
    releases left half-done there (the one change this may make), then refuse a directory that a save could not
    write or that holds someone else's files."""
    directory = check_writable_directory(directory)
    recover_interrupted_resaves(directory)
    if directory.is_dir() and not is_save_folder(directory) and any(directory.iterdir()):
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
    format: str = "eigenfast",
) -> Path:
    """Write a save into ``directory``: all its files appear at once, replacing those of an earlier save there.

    ``format`` names what is written (``"eigenfast"``: the spec, weights and extras that
    :func:`load` reads). The user's files in ``directory`` are never moved or deleted; on
    any failure (a full disk, say) the folder keeps its previous save and a
    :class:`~eigenfast.errors.SaveError` says why.
    """
    if format not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if format == "hf":
        return save_hf_checkpoint(model, directory, tokenizer)
    directory = prepare_output_directory(directory)
    # FSDP2 holds a sharded model's weights in shards: gather them whole (a collective on every rank) first.
    state = _gathered_state(model) if distributed.is_sharded(model) else None

    def files(generation: Path) -> None:
        _write_save(generation, model, kind, report, tensors, tokenizer, state)

    def write() -> None:
        with atomic.failures_as_save_error(directory, "the save", "the folder keeps its previous save, if it had one"):
            atomic.write_atomically(directory, files, _flat_save_files)

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
    folder: Path, model: nn.Module, kind: str, report: dict[str, Any] | None,
    tensors: dict[str, torch.Tensor] | None, tokenizer: Any, state: dict[str, torch.Tensor] | None = None,
) -> None:
    if state is None:
        save_state(model, str(folder / WEIGHTS_FILE))
    else:  # gathered from shards; shard_model refuses tied weights, so no tensor is shared
        save_file(state, str(folder / WEIGHTS_FILE))
    atomic.step("weights")
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / EXTRAS_FILE))
        atomic.step("extras")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        # The tokenizer writes its own copy of the model config on some versions; ours wins.
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        atomic.step("tokenizer")
    shutil.copyfile(Path(__file__).with_name("hub_module.py"), folder / HUB_MODULE_FILE)
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
    (folder / CONFIG_FILE).write_text(json.dumps(stub, indent=2))
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model_type": model.config.model_type,
        "config": model.config.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "files": checksums.record(folder, sorted(p.name for p in folder.iterdir())),
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
    atomic.step("hashed")
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def _flat_save_files(directory: Path) -> list[str]:
    """The files of a version 1 or 2 save (written flat into ``directory``), to be adopted before a new save."""
    listed = _listed_files(directory / SPEC_FILE)
    if not listed:  # no spec, or not one eigenfast could have written: nothing to adopt
        return []
    return [SPEC_FILE] + [name for name, size in listed.items() if name in FLAT_SAVE_NAMES and name != SPEC_FILE
                          and (directory / name).is_file() and size in (None, (directory / name).stat().st_size)]


def read_spec(directory: str | Path) -> dict[str, Any]:
    """The checked ``eigenfast.json`` of the save in ``directory``."""
    directory = _save_folder(directory)
    with atomic.reading(directory) as files:
        return _read_spec(files, directory)


def _save_folder(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise SavedModelError(f"{directory} is not a directory; pass the folder written by result.save()")
    recover_interrupted_resaves(directory)
    return directory


def recover_interrupted_resaves(directory: Path) -> None:
    """Finish or roll back a re-save that eigenfast before version 3 left half-done in ``directory``
    (saving/interrupted_resaves.py), so the folder holds one whole save again."""
    if not any(interrupted_resaves.leftovers(directory, kind)
               for kind in (interrupted_resaves.BACKUP, interrupted_resaves.STAGING)):
        return
    with atomic.write_lock(directory) as mine:
        if not mine:
            return  # read-only, or a save is writing: the load reports what it finds
        for line in interrupted_resaves.undo_interrupted_resaves(
                directory, spec_file=SPEC_FILE, save_names=FLAT_SAVE_NAMES, listed=_listed_files):
            log.warning(line)


def _listed_files(spec_path: Path) -> dict[str, int | None]:
    """The files a version 1 or 2 spec lists, with the sizes version 2 records (nothing for a spec that cannot be
    read or is not one an older eigenfast wrote)."""
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") not in (1, 2):
        return {}
    files = spec.get("files") if spec["version"] == 2 else dict.fromkeys(VERSION_1_FILES)
    return {n: s for n, s in files.items() if isinstance(n, str) and isinstance(s, (int, type(None)))} \
        if isinstance(files, dict) else {}


def _read_spec(files: Path, directory: Path) -> dict[str, Any]:
    path = files / SPEC_FILE
    if not path.is_file():
        raise SavedModelError(f"{directory} has no {SPEC_FILE}: it was not written by eigenfast's result.save(), "
                              "or its first save did not finish; save the model again")
    if path.stat().st_size > LARGEST_SPEC:
        raise SavedModelError(f"{directory / SPEC_FILE} is {path.stat().st_size} bytes, no spec eigenfast writes; "
                              "save the model again")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SavedModelError(f"{directory / SPEC_FILE} is corrupted ({str(err)[:200]}); save the model again") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("modules"), list):
        raise SavedModelError(f"{directory / SPEC_FILE} is not an eigenfast spec; save the model again")
    if spec.get("version") not in READABLE_VERSIONS:
        raise SavedModelError(
            f"{directory / SPEC_FILE} has format version {spec.get('version')!r}, this eigenfast reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; save it again with this version"
        )
    check_spec(spec, str(directory / SPEC_FILE))
    return spec


def _verify(files: Path, spec: dict[str, Any], directory: Path, names: list[str] | None = None) -> None:
    """Every file of the save (or those of ``names`` it wrote) as the save wrote it."""
    recorded = spec.get("files") or {}
    if spec["version"] >= 3:
        chosen = recorded if names is None else {n: recorded[n] for n in names if n in recorded}
        checksums.verify(files, chosen, directory)
        return
    for name in [WEIGHTS_FILE, EXTRAS_FILE] if names is None else names:  # older saves recorded sizes only
        expected = recorded.get(name)
        if expected is not None and (files / name).is_file() and (files / name).stat().st_size != expected:
            raise SavedModelError(
                f"{directory / name} is {(files / name).stat().st_size} bytes but the save wrote {expected}: it is "
                "truncated or comes from another save; copy the folder again or save the model again"
            )


def _base_config(files: Path, spec: dict[str, Any], directory: Path) -> Any:
    if spec["version"] == 1:
        try:  # the folder's own config.json; nothing it names is run, nothing is fetched
            return AutoConfig.from_pretrained(files, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise SavedModelError(f"{directory / CONFIG_FILE} cannot be read ({str(err)[:300]}); "
                                  "save the model again") from None
    values = dict(spec["config"])
    if values.get("model_type") != spec["model_type"]:
        raise SavedModelError(f"{directory / SPEC_FILE} holds no config of model type {spec['model_type']!r}; "
                              "save the model again")
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SavedModelError(f"the config in {directory / SPEC_FILE} cannot be used ({str(err)[:300]}); "
                              "save the model again") from None


def _stored_shapes(weights: Path, directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the weights file's header (read without loading a tensor)."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedModelError(f"{directory / WEIGHTS_FILE} is not a safetensors file ({str(err)[:300]}); "
                              "save the model again") from None


# Building from a checked spec can still fail where its values do not fit together (a module path the
# model lacks, a size its class refuses): any such failure is the folder's, reported as a SavedModelError.
BUILD_ERRORS = (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError)


def _build(config: Any, spec: dict[str, Any], directory: Path, meta: bool) -> nn.Module:
    """The model ``spec`` describes, randomly initialised (on the meta device: nothing allocated)."""
    dtype = getattr(torch, spec.get("dtype", "float32"))
    extra = {"attn_implementation": spec["attn_implementation"]} if spec.get("attn_implementation") else {}
    where = directory / SPEC_FILE
    with torch.device("meta") if meta else contextlib.nullcontext():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False, **extra)
        except BUILD_ERRORS as err:
            raise SavedModelError(f"the config in {where} cannot be used ({str(err)[:300]}); save the model again") from None
        get_adapter(model)
        for index, record in enumerate(spec["modules"]):
            try:
                model.get_submodule(record["path"])
                replace_module(model, record["path"], MODULE_KINDS[record["kind"]].from_spec(record["spec"]).to(dtype))
            except BUILD_ERRORS as err:
                raise SavedModelError(f"{where}: field 'modules[{index}]' ({record['path']!r}) does not fit the "
                                      f"model ({str(err)[:200]}); save the model again") from None
        for path, values in spec.get("attributes", {}).items():
            try:
                set_attributes(model.get_submodule(path), values)
            except (*BUILD_ERRORS, EigenfastError) as err:
                raise SavedModelError(f"{where}: field 'attributes.{path}' does not fit the model ({err}); "
                                      "save the model again") from None
    return model


def _check_shapes(skeleton: nn.Module, stored: dict[str, tuple[int, ...]], directory: Path) -> None:
    """The model the spec describes holds exactly the tensors of the weights file, shape for shape.

    Run on the meta-device model, before the real one is allocated: a spec whose sizes do
    not match its weights (a damaged or crafted one asking for a huge model) stops here.
    """
    state = skeleton.state_dict(keep_vars=True)
    weights = directory / WEIGHTS_FILE
    for name, shape in stored.items():
        if name not in state:
            raise SavedModelError(f"{weights} holds {name!r}, which the model {SPEC_FILE} describes lacks: the files "
                                  "come from different saves; save the model again")
        if tuple(state[name].shape) != shape:
            raise SavedModelError(f"{SPEC_FILE} describes {name!r} as {tuple(state[name].shape)} but {weights} holds "
                                  f"{shape}: the files come from different saves; save the model again")
    present = {id(state[name]) for name in stored}  # a tied weight is stored once, under one of its names
    missing = [name for name, value in state.items() if name not in stored and id(value) not in present]
    if missing:
        raise SavedModelError(f"{weights} lacks {missing[0]!r} (and {len(missing) - 1} more) that {SPEC_FILE} "
                              "describes: the files come from different saves; save the model again")
    stored_numel = sum(_numel(shape) for shape in stored.values())
    unstored = sum(b.numel() for name, b in skeleton.named_buffers() if name not in state)
    if unstored > 4 * stored_numel + (1 << 24):  # buffers built from the config alone (position tables, masks)
        raise SavedModelError(f"{directory / SPEC_FILE}: field 'config' asks for {unstored} elements of buffers "
                              f"beside {stored_numel} stored weights; save the model again")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def load(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``result.save(directory)``; its logits equal the saved model's."""
    directory = _save_folder(directory)
    with atomic.reading(directory) as files:
        return load_from(files, directory)


def load_from(files: Path, directory: Path) -> nn.Module:
    """:func:`load` inside :func:`eigenfast.saving.atomic.reading`: ``files`` holds the save in ``directory``."""
    spec = _read_spec(files, directory)
    weights = files / WEIGHTS_FILE
    if not weights.is_file():
        raise SavedModelError(f"{directory} has no {WEIGHTS_FILE}; the save is incomplete, save the model again")
    _verify(files, spec, directory)
    config = _base_config(files, spec, directory)
    if config.model_type != spec["model_type"]:
        raise SavedModelError(
            f"config.json says model type {config.model_type!r} but {SPEC_FILE} says {spec['model_type']!r}: "
            "the files come from different saves"
        )
    stored = _stored_shapes(weights, directory)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(stored):
        raise SavedModelError(f"{directory / SPEC_FILE}: field 'config' asks for {layers} layers but "
                              f"{WEIGHTS_FILE} holds only {len(stored)} tensors; save the model again")
    _check_shapes(_build(config, spec, directory, meta=True), stored, directory)
    model = _build(config, spec, directory, meta=False)
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise SavedModelError(
            f"{directory / WEIGHTS_FILE} does not match {SPEC_FILE} or is corrupted: {str(err)[:500]}; "
            "save the model again"
        ) from None
    if spec["modules"]:
        install(model)
    return guard_positions(model).eval()


def load_extras(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors saved beside the model (scores, frozen masks...), or {} if the save has none."""
    directory = _save_folder(directory)
    with atomic.reading(directory) as files:
        spec = _read_spec(files, directory)
        path = files / EXTRAS_FILE
        if spec["version"] >= 2 and EXTRAS_FILE not in spec["files"]:  # a file of another save is no extras of this
            return {}
        if spec["version"] < 3 and not path.is_file():
            return {}
        _verify(files, spec, directory, [EXTRAS_FILE])
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise SavedModelError(f"{directory / EXTRAS_FILE} is corrupted ({str(err)[:300]}); "
                                  "save the model again") from None
