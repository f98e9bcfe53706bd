"""Edits to a HF model that eigenfast records so a saved model gets them back: module swaps
and plain attributes (such as a shrunk attention's head counts)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ArgumentTypeError, UnknownAttributeError

ATTRIBUTES = "eigenfast_attributes"  # where a module remembers the plain attributes eigenfast changed


def _plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def set_attributes(module: nn.Module, values: dict[str, Any]) -> None:
    """Change plain (JSON-able) attributes of a HF module, such as a shrunk attention's head counts,
    and remember them so that a saved model gets them back. Names starting with ``eigenfast_`` are
    eigenfast's own and need not exist yet; the others must be the module's."""
    for name, value in values.items():
        if not name.startswith("eigenfast_") and not hasattr(module, name):
            raise UnknownAttributeError(f"{type(module).__name__} has no attribute {name!r}")
        if not (_plain(value) or isinstance(value, list) and all(map(_plain, value))):
            raise ArgumentTypeError(
                f"attribute {name!r} must be a bool, int, float or str, or a list of them, got {type(value).__name__}"
            )
        setattr(module, name, value)
    setattr(module, ATTRIBUTES, {**getattr(module, ATTRIBUTES, {}), **values})


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
