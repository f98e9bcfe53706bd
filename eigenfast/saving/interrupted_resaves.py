"""Re-saves that eigenfast before format version 3 left half-done, undone or finished on the next load or save.

Those versions replaced a save's files one by one: each old file was moved into a backup
folder ``.NAME.previous.XXXX`` beside the save folder ``NAME``, then the new file moved in
from ``.NAME.staging.XXXX``, the spec (``eigenfast.json``) last. A crash in between left a
mix that a load refuses, with the old files in the backup where nothing looked for them.
What the folder holds says which side is whole:

- the backup holds the old spec and the folder a spec (the new one): every new file had
  moved in. The new save stands and the backup goes.
- anything else: the new spec never moved in. The backup's files go back over the new
  ones, and a new file that replaced nothing is removed when it is exactly what that save
  wrote (its name and size in the staged new spec): the old save stands.

A staging folder left by a save killed before it moved anything goes too. Files of the
other save that stay (an old file the new save does not list, say) are listed by no spec
and read by no load. Each step is one rename or one unlink, in an order after which a
crash leaves a state these same rules finish. Only files of the names a save writes are
touched, and only inside folders of exactly these forms: the user's files and folders, and
anything a spec in the folder names but eigenfast did not write, are left alone.
"""
from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Callable

from .atomic import fsync

BACKUP = "previous"
STAGING = "staging"


def leftovers(folder: Path, kind: str) -> list[Path]:
    """``.NAME.<kind>.*`` folders beside ``folder``, newest first."""
    pattern = f".{glob.escape(folder.name)}.{kind}.*"
    found = [p for p in folder.parent.glob(pattern) if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


Listed = Callable[[Path], dict[str, int | None]]


def undo_interrupted_resaves(folder: Path, *, spec_file: str, save_names: frozenset[str], listed: Listed) -> list[str]:
    """Finish or roll back every interrupted re-save of ``folder``; what was done, one line each.

    ``save_names``: every file name an old save could write. ``listed(spec)``: the files a
    spec of that save lists, with their sizes where it records them (empty when it cannot
    be read). Call it holding the folder's write lock.
    """
    done = []
    for backup in leftovers(folder, BACKUP):
        if not _only_save_files(backup, save_names):
            continue  # not a folder eigenfast made: leave it
        staged = [s for s in leftovers(folder, STAGING) if _only_save_files(s, save_names)]
        if (backup / spec_file).is_file() and (folder / spec_file).is_file():
            _remove_save_files(backup, save_names, last=spec_file)  # while the old spec is there, a rerun finishes
            done.append(f"finished the interrupted re-save of {folder} (its new files had all moved in)")
        else:
            _roll_back(folder, backup, staged, spec_file, save_names, listed)
            done.append(f"rolled back the interrupted re-save of {folder} to the save before it")
    for staged in leftovers(folder, STAGING):  # also those of saves killed before they moved anything
        if _only_save_files(staged, save_names):
            _remove_save_files(staged, save_names)
            done.append(f"removed {staged.name}, the files of a save into {folder} that never finished")
    return done


def _roll_back(folder: Path, backup: Path, staged: list[Path], spec_file: str, save_names: frozenset[str],
               listed: Listed) -> None:
    old = listed(backup / spec_file if (backup / spec_file).is_file() else folder / spec_file)
    if len(staged) == 1 and (staged[0] / spec_file).is_file():
        # Moved in = what the new spec lists minus what is still staged; of those, the ones the old save
        # lacked replaced nothing. Anything the old spec lists is the old save's, whether restored yet or not.
        new = listed(staged[0] / spec_file)
        moved_in = set(new) - {p.name for p in staged[0].iterdir()}
        for name in sorted(moved_in - {p.name for p in backup.iterdir()} - set(old) - {spec_file}):
            path = folder / name
            if name in save_names and _is_plain_file(path) and path.stat().st_size == new[name]:
                path.unlink()
    for entry in sorted(backup.iterdir()):
        os.replace(entry, folder / entry.name)
    fsync(folder)
    backup.rmdir()


def _remove_save_files(where: Path, save_names: frozenset[str], last: str | None = None) -> None:
    for entry in sorted(where.iterdir(), key=lambda p: p.name == last):
        if entry.name in save_names and _is_plain_file(entry):
            entry.unlink()
    with contextlib.suppress(OSError):  # something not ours is inside: the folder stays with it
        where.rmdir()


def _only_save_files(where: Path, save_names: frozenset[str]) -> bool:
    return all(e.name in save_names and _is_plain_file(e) for e in where.iterdir())


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
