"""The fields of ``eigenfast.json``, checked before anything is built from them.

A save folder may come from anyone: each field must have its type and a sane range, or
the load stops with a :class:`~eigenfast.errors.SavedModelError` naming the field,
before a tensor is allocated or transformers is called. What the fields describe
together (shapes against the weights file) is checked afterwards on a model built on
the meta device, which allocates nothing (``serialization``).
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import SavedModelError
from ..rewrite.kinds import MODULE_KINDS

DTYPES = ("float32", "float16", "bfloat16", "float64")
# Implementations transformers runs from its own code. Anything else (a Hub kernel's repository name, say)
# would make transformers fetch code: a load runs nothing from outside eigenfast, transformers and torch.
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
LARGEST_SIZE = 1 << 31  # any one size field (a dimension, a position count): far past any real model
SHA256 = re.compile(r"[0-9a-f]{64}")


def file_name_ok(name: Any) -> bool:
    """A plain file name inside the save folder: no path, no hidden or special name."""
    return isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith(".")


def check_spec(spec: dict[str, Any], where: str) -> None:
    """Refuse a spec (already known to be a dict of format ``eigenfast`` and a readable version) with a
    field of the wrong type or range."""

    def refuse(field: str, problem: str) -> SavedModelError:
        return SavedModelError(f"{where}: field {field!r} {problem}; the file is damaged or was not written by "
                               "eigenfast: save the model again")

    for field in ("kind", "model_type"):
        if not isinstance(spec.get(field), str) or not 0 < len(spec[field]) <= 100:
            raise refuse(field, "must be a short string")
    if spec.get("dtype", "float32") not in DTYPES:
        raise refuse("dtype", f"must be one of {', '.join(DTYPES)}")
    if spec.get("attn_implementation") not in (None, *ATTENTION):
        raise refuse("attn_implementation", f"must be one of {', '.join(ATTENTION)} or null")
    if spec["version"] >= 2:
        config = spec.get("config")
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise refuse("config", "must be an object")
        if "auto_map" in config:  # would send transformers to code in the folder
            raise refuse("config.auto_map", "names code to run, which a load never does")
        _check_sizes(config, "config", refuse)
    for field in ("report", "attributes"):
        if not isinstance(spec.get(field, {}), dict):
            raise refuse(field, "must be an object")
    for path, values in spec.get("attributes", {}).items():
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise refuse(f"attributes.{path}", "must be an object of attribute values")
    _check_files(spec, refuse)
    _check_modules(spec["modules"], refuse)


def _check_files(spec: dict[str, Any], refuse: Any) -> None:
    files = spec.get("files")
    if spec["version"] == 1 and files is None:
        return
    if not isinstance(files, dict):
        raise refuse("files", "must be an object naming every file of the save")
    for name, entry in files.items():
        if not file_name_ok(name):
            raise refuse(f"files.{name}", "is not a plain file name")
        if spec["version"] == 2:
            if entry is not None and not _size(entry):
                raise refuse(f"files.{name}", "must be a size in bytes")
        elif not (isinstance(entry, dict) and _size(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
                  and SHA256.fullmatch(entry["sha256"])):
            raise refuse(f"files.{name}", 'must be {"bytes": size, "sha256": 64 hex digits}')


def _check_modules(modules: list[Any], refuse: Any) -> None:
    seen = set()
    for index, record in enumerate(modules):
        field = f"modules[{index}]"
        if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
            raise refuse(field, 'must be {"path": ..., "kind": ..., "spec": {...}}')
        if record["path"] in seen:
            raise refuse(f"{field}.path", f"names {record['path']!r} twice")
        seen.add(record["path"])
        if record.get("kind") not in MODULE_KINDS:
            raise refuse(f"{field}.kind", f"must be one of {', '.join(MODULE_KINDS)}, got {record.get('kind')!r}")
        if not isinstance(record.get("spec"), dict):
            raise refuse(f"{field}.spec", "must be an object")
        _check_sizes(record["spec"], f"{field}.spec", refuse)


def _check_sizes(values: dict[str, Any], field: str, refuse: Any) -> None:
    """Every whole number in ``values`` (nested objects included) within +-LARGEST_SIZE."""
    for key, value in values.items():
        if isinstance(value, dict):
            _check_sizes(value, f"{field}.{key}", refuse)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LARGEST_SIZE:
            raise refuse(f"{field}.{key}", f"is {value}, beyond any model's size")


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
