"""Re-saves that eigenfast before format version 3 left half-done: the next load or save restores one whole save.

Those versions moved a save's files in one at a time (old file into ``.out.previous.*``,
new file in from ``.out.staging.*``, the spec last). ``old_resave`` below does exactly
that and stops after any number of renames, as a ``kill -9`` would have stopped it; the
folder must then load as the whole old save or the whole new one, with the user's files
untouched and nothing left beside it. A second crash, during the recovery itself, must
change nothing of that.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

import crash_writer
from crash_writer import tiny_model
from eigenfast.saving import serialization
from test_crash_saves import counts, fingerprint, flat_version_2_save, user_files, which_save  # noqa: F401 (a fixture)


def old_save(folder: Path, which: str) -> None:
    crash_writer.save(tiny_model(which), str(folder), which)
    flat_version_2_save(folder, which, crafted=False)


def old_resave(folder: Path, which: str, stop_after: int) -> tuple[int, int]:
    """The version 2 re-save of ``which`` into ``folder``, stopped after ``stop_after`` of its steps.

    Returns (its number of steps, the step after which the new spec is in place).
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging.", dir=folder.parent))
    old_save(staging, which)
    backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.previous.", dir=folder.parent))
    steps = []
    for name in sorted(os.listdir(staging), key=lambda name: name == "eigenfast.json"):
        if (folder / name).exists():
            steps.append(lambda name=name: os.replace(folder / name, backup / name))
        steps.append(lambda name=name: os.replace(staging / name, folder / name))
    switched = len(steps)
    steps += [lambda: shutil.rmtree(backup), lambda: shutil.rmtree(staging)]
    for step in steps[:stop_after]:
        step()
    return len(steps), switched


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def crashed_resave(root: Path, stop_after: int) -> tuple[Path, int, int]:
    folder = root / "out"
    old_save(folder, "old")
    user_files(folder)
    return (folder, *old_resave(folder, "new", stop_after))


class Killed(BaseException):
    """Stands for the kill: raised by the n-th change the recovery makes to the file system."""


def recover_until_killed(folder: Path, changes: int, monkeypatch) -> bool:
    """Recover ``folder``, killed before its change number ``changes``; False if it finished first."""
    made = Counter()

    def counted(real):
        def change(*args, **kwargs):
            if made["changes"] == changes:
                raise Killed
            made["changes"] += 1
            return real(*args, **kwargs)
        return change

    with monkeypatch.context() as patch:
        for name in ("replace", "unlink", "rmdir"):
            patch.setattr(os, name, counted(getattr(os, name)))
        try:
            serialization.recover_interrupted_resaves(folder)
        except Killed:
            return True
    return False


def tally(counts: Counter, folder: Path, user: dict[str, str], expected: str, trial: str) -> None:
    """Load ``folder`` (the load recovers first) and count what is wrong with what it holds."""
    holds = which_save(folder)
    counts["mixes"] += holds == "mix"
    counts["lost saves"] += holds != expected
    counts["user files touched"] += fingerprint(folder) != user
    assert leftovers(folder) == [], leftovers(folder)
    counts[f"trials ({trial})"] += 1


def test_a_killed_version_2_resave_loads_whole_at_every_instant(tmp_path, counts):
    steps, switched = crashed_resave(tmp_path / "count", 0)[1:]
    for stop_after in range(1, steps + 1):
        folder, _, _ = crashed_resave(tmp_path / f"stop-{stop_after}", stop_after)
        expected = "new" if stop_after >= switched else "old"
        tally(counts, folder, fingerprint(folder), expected, "version 2 re-save stopped after each rename")


def test_a_crash_during_the_recovery_is_finished_by_the_next_one(tmp_path, counts, monkeypatch):
    steps, switched = crashed_resave(tmp_path / "count", 0)[1:]
    for stop_after in range(1, steps):
        expected = "new" if stop_after >= switched else "old"
        for changes in range(12):
            folder, _, _ = crashed_resave(tmp_path / f"stop-{stop_after}-{changes}", stop_after)
            user = fingerprint(folder)
            killed = recover_until_killed(folder, changes, monkeypatch)
            tally(counts, folder, user, expected, "recovery killed, then run again")
            if not killed:
                break  # the recovery makes fewer changes than this: every crash point was covered


def test_a_save_into_a_folder_with_a_killed_resave_is_not_refused(tmp_path):
    folder, _, _ = crashed_resave(tmp_path, 3)
    crash_writer.save(tiny_model("new"), str(folder), "new")  # the CLI's output check and the save both recover
    assert which_save(folder) == "new" and leftovers(folder) == []
