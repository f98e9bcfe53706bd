"""Folders whose files change all at once: a save is either the whole old one or the whole new one.

Layout of a folder ``out`` (docs/DESIGN.md "Saved models" states the protocol and its crash guarantees)::

    out/.eigenfast/gen-XXXX/       one complete save (a generation): every file eigenfast wrote
    out/.eigenfast/current         symbolic link to the generation in use: THE switch
    out/.eigenfast/lock            held (flock) by the one save writing into ``out``
    out/.eigenfast/readers         held shared by loads, so no save deletes a generation being read
    out/NAME -> .eigenfast/current/NAME   one link per file of a save, so the folder reads as a plain one

A save writes a new generation, flushes it to disk, then replaces ``current`` with one
``rename``: before it the old generation is in use, after it the new one, and no instant
in between. Links at the top of the folder never change their target, so through them
too every file comes from one generation. Nothing is deleted before the switch, and
after it only what nothing names any more: other generations (when no load is reading)
and top-level links of eigenfast's own form whose file the current generation lacks. A
crashed save leaves only such leftovers, which the next save or load collects. The
user's files, and entries of any kind that are not eigenfast's links, are never moved
or deleted; everything lives inside ``out`` itself, so no rename crosses file systems.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import filecmp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from safetensors import SafetensorError

from ..errors import EigenfastError, SavedModelError, SaveError

STATE = ".eigenfast"
CURRENT = "current"
LOCK = "lock"
READERS = "readers"
GENERATION = "gen-"
LINK_STAGED = ".eigenfast-link"
LOCK_WAIT = 2.0  # seconds


def link_target(name: str) -> str:
    """What the top-level link ``name`` of a save points at (relative: a copied folder keeps working)."""
    return f"{STATE}/{CURRENT}/{name}"


def is_ours(entry: Path) -> bool:
    """An entry eigenfast made at the top of a folder: a link of exactly :func:`link_target`'s form."""
    return entry.is_symlink() and os.readlink(entry) == link_target(entry.name)


def has_state(folder: Path) -> bool:
    return (folder / STATE).is_dir() and not (folder / STATE).is_symlink()


def generation(folder: Path) -> Path | None:
    """The generation in use, resolved once (a load reads every file from it), or None without one."""
    pointer = folder / STATE / CURRENT
    if not (pointer.is_symlink() or pointer.is_dir()):
        return None
    resolved = pointer.resolve()
    return resolved if resolved.is_dir() else None


def _current_name(folder: Path) -> str | None:
    pointer = folder / STATE / CURRENT
    return os.readlink(pointer) if pointer.is_symlink() else None


@contextlib.contextmanager
def _flock(path: Path, mode: int, create: bool) -> Iterator[bool]:
    """Hold ``flock(mode)`` on ``path``; yields False (holding nothing) where the file cannot be opened."""
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock; a killed process's locks go with it


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_file():
            fsync(entry)
    fsync(folder)


def collect_garbage(folder: Path) -> None:
    """Remove what no save names any more: leftovers of a crashed save, or of the one before the current.

    Call it holding the folder's write lock. Generations are removed only while no load
    reads (the readers lock is free); otherwise they wait for the next collection.
    """
    state, current = folder / STATE, _current_name(folder)
    for entry in state.iterdir():
        if entry.name.startswith(f"{CURRENT}.") and entry.is_symlink():  # a switch that never happened
            entry.unlink()
    in_use = generation(folder)
    for entry in folder.iterdir():
        if is_ours(entry) and (in_use is None or not (in_use / entry.name).exists()):
            entry.unlink()
        elif entry.name.endswith(LINK_STAGED) and entry.is_symlink() and os.readlink(entry) == link_target(
                entry.name[1:-len(LINK_STAGED)]):  # an adoption's link that was never renamed into place
            entry.unlink()
    with _flock(state / READERS, fcntl.LOCK_EX | fcntl.LOCK_NB, create=True) as alone:
        if not alone:
            return
        for entry in state.iterdir():
            if entry.name.startswith(GENERATION) and entry.name != current and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)


def _symlink(target: str, path: Path) -> None:
    try:
        os.symlink(target, path)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        raise SaveError(
            f"{path.parent} is on a file system without symbolic links ({err.strerror}), and a save switches from "
            "the old files to the new ones with one: save into a folder on a local file system (ext4, xfs, APFS, "
            "tmpfs...), then copy it where you need it with `cp -rL` (which copies the files the links name)"
        ) from None


def _link_names(folder: Path, names: Iterable[str]) -> None:
    """Top-level links for ``names``; an entry of that name that is not ours (the user's) is left as it is."""
    for name in names:
        entry = folder / name
        if entry.is_symlink() or entry.exists():
            continue
        _symlink(link_target(name), entry)


def _switch(folder: Path, name: str) -> None:
    """Make generation ``name`` current: one atomic rename of a new link over ``current``."""
    state = folder / STATE
    staged = state / f"{CURRENT}.{name}"
    _symlink(name, staged)
    os.replace(staged, state / CURRENT)
    fsync(state)


def adopt_flat_save(folder: Path, names: Iterable[str]) -> None:
    """Turn a save written flat (format versions 1 and 2) into a generation, crash-safely.

    Its files are hard-linked (copied where the file system has no hard links) into a
    generation that becomes current; only then is each top-level file replaced by a link
    to the same bytes, one atomic rename each, so at every instant the folder still reads
    as the old save. Run again after a crash, it finishes the replacements; a top-level
    file whose bytes differ from the adopted copy is left alone.
    """
    names = [n for n in names if (folder / n).is_file() and not (folder / n).is_symlink()]
    if not names:
        return
    in_use = generation(folder)
    if in_use is None:
        in_use = Path(tempfile.mkdtemp(prefix=GENERATION, dir=folder / STATE))
        for name in names:
            try:
                os.link(folder / name, in_use / name)
            except OSError:
                shutil.copy2(folder / name, in_use / name)
        _fsync_tree(in_use)
        _switch(folder, in_use.name)
    for name in names:
        if (in_use / name).is_file() and _same_bytes(folder / name, in_use / name):
            staged = folder / f".{name}{LINK_STAGED}"
            staged.unlink(missing_ok=True)
            _symlink(link_target(name), staged)
            os.replace(staged, folder / name)
    fsync(folder)


def _same_bytes(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b) or (a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False))


# A test-only hook: called between the steps of a save, so a test can slow it down or stop it anywhere.
step: Callable[[str], None] = lambda where: None


def write_atomically(folder: Path, write: Callable[[Path], None], adopt: Callable[[Path], list[str]]) -> None:
    """Run ``write(generation)`` into a fresh generation of ``folder``, then make it current in one rename.

    ``adopt(folder)`` names the files of a flat (older-format) save there, to adopt first.
    On any failure the folder keeps its previous save, and a folder this call created is
    removed again. Two saves into one folder: the second waits LOCK_WAIT seconds for the
    first, then is refused.
    """
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = folder / STATE
        if state.is_symlink():
            raise SavedModelError(f"{state} is a symbolic link, not eigenfast's own folder; remove it and save again")
        state.mkdir(exist_ok=True)
        with _write_lock(state / LOCK) as mine:
            if not mine:
                raise SaveError(
                    f"another save is writing into {folder} right now; wait for it to finish, "
                    "or save into another folder"
                )
            collect_garbage(folder)  # whatever a crashed save left
            adopt_flat_save(folder, adopt(folder))
            new = Path(tempfile.mkdtemp(prefix=GENERATION, dir=state))
            new.chmod(0o755)  # mkdtemp makes it private; a save is as readable as any folder the user makes
            try:
                step("generation")
                write(new)
                step("written")
                _fsync_tree(new)
                _link_names(folder, sorted(p.name for p in new.iterdir()))
                step("linked")
                _switch(folder, new.name)
            except BaseException:
                shutil.rmtree(new, ignore_errors=True)
                raise
            step("switched")
            with contextlib.suppress(OSError):  # the save is in; what is left over goes with the next one
                collect_garbage(folder)
    except BaseException:
        for path in created:  # deepest first; only while still empty but for eigenfast's own state
            _remove_if_only_state(path)
        raise


@contextlib.contextmanager
def write_lock(folder: Path) -> Iterator[bool]:
    """Hold ``folder``'s write lock (what a save holds), made where missing; False where none can be had."""
    state = folder / STATE
    with contextlib.suppress(OSError):  # a read-only folder: nothing in it can change, nothing to lock
        state.mkdir(exist_ok=True)
    if state.is_symlink() or not state.is_dir():
        yield False
        return
    with _write_lock(state / LOCK) as mine:
        yield mine


@contextlib.contextmanager
def _write_lock(path: Path) -> Iterator[bool]:
    """The folder's write lock, waited for up to LOCK_WAIT seconds: a load collecting garbage holds it for
    milliseconds, another save for as long as it writes (then this one is refused)."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        with _flock(path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=True) as mine:
            if mine or time.monotonic() > deadline:
                yield mine
                return
        time.sleep(0.05)


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    return [p for p in [folder, *folder.parents] if not p.exists() and not p.is_symlink()]


def _remove_if_only_state(path: Path) -> None:
    with contextlib.suppress(OSError):
        if {p.name for p in path.iterdir()} <= {STATE}:
            shutil.rmtree(path / STATE, ignore_errors=True)
            path.rmdir()


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[Path]:
    """The folder whose files make up the save in ``folder`` (its current generation, or ``folder`` itself
    for a flat save), kept from collection while the caller reads it."""
    if not has_state(folder):
        yield folder
        return
    state = folder / STATE
    with _flock(state / LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False) as no_writer:
        if no_writer:
            with contextlib.suppress(OSError):  # a read-only folder is read as it is
                collect_garbage(folder)
    with _flock(state / READERS, fcntl.LOCK_SH, create=False):
        yield generation(folder) or folder


@contextlib.contextmanager
def failures_as_save_error(directory: Path, what: str, afterwards: str) -> Iterator[None]:
    """The file system's refusal while writing ``what`` into ``directory`` (a full disk, no permission) as one
    :class:`SaveError` naming the cause and the fix; ``afterwards`` says what the folder holds then."""
    try:
        yield
    except EigenfastError:
        raise
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or str(err)[:300]
        raise SaveError(
            f"cannot write {what} into {directory}: {reason}; free space or choose a folder you can write to "
            f"({afterwards})"
        ) from None
