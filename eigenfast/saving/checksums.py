"""Every file of a save with its size and SHA-256, recorded at save time and checked at load time.

Sizes alone let two saves of one model at different p pass for each other (their files
have equal sizes), and a few flipped bytes load silently; a hash of every byte does not.
Hashing streams the file in blocks, so it needs no memory beyond one block
(docs/DESIGN.md "Saved models" gives its cost).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import SavedModelError

BLOCK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def record(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` for the files ``names`` of ``folder``."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in names}


def verify(folder: Path, files: dict[str, dict[str, Any]], save: Path) -> None:
    """Refuse a save whose files are missing, or differ in size or content from what the save wrote."""
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise SavedModelError(f"{save} lacks {name}, which its save wrote; copy the folder again or save the model again")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise SavedModelError(
                f"{save / name} is {size} bytes but the save wrote {expected['bytes']}: it is truncated or comes "
                "from another save; copy the folder again or save the model again"
            )
        if sha256(path) != expected["sha256"]:
            raise SavedModelError(
                f"{save / name} is not the file its save wrote (its SHA-256 differs): it was damaged or replaced; "
                "copy the folder again or save the model again"
            )
