"""Saves killed with SIGKILL at random instants, saves racing into one folder, and saves on a full disk.

Every trial is a real process (forked from a forkserver that imported everything once)
saving a tiny model with a pause between its steps; the test kills it at a random time,
then loads the folder as a user would. After every trial the folder must hold the whole
old save or the whole new one (weights, spec and extras of one save: never a mix), the
user's files and folders must be untouched, and every failure an EigenfastError.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import crash_writer
import eigenfast
from crash_writer import P, tiny_model
from eigenfast.saving import atomic
from eigenfast.saving.serialization import load_extras, read_spec

OUTCOMES = ("mixes", "lost saves", "user files touched", "code executed", "hangs", "tracebacks")

KILL_TRIALS = 50
ADOPTING = 10  # of which this many start from a save written flat by an older eigenfast (format version 2)
RACES = 10
DELAY = 0.03  # seconds between the steps of a save
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["forkserver_preload"])


def start_forkserver() -> None:
    """Start the forkserver with this folder importable: it imports its preload before it learns our sys.path."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), before]))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop("PYTHONPATH") if before is None else os.environ.__setitem__("PYTHONPATH", before)
MODELS = {which: model.state_dict() for which, model in crash_writer.models().items()}


@pytest.fixture
def counts(capsys):
    """What the test's trials saw, printed past pytest's capture (so CI logs show it) and required to be clean."""
    seen: Counter = Counter()
    yield seen
    trials = ", ".join(f"{seen[k]} {k}" for k in sorted(seen) if k.startswith("trials"))
    with capsys.disabled():
        print(f"\nfault injection: {trials}: " + ", ".join(f"{seen[k]} {k}" for k in OUTCOMES))
    assert not any(seen[k] for k in OUTCOMES), dict(seen)


def user_files(folder: Path) -> None:
    """Files and folders of the user's, some named like files a save writes, in the save folder."""
    (folder / "notes.txt").write_text("my notes")
    (folder / "tokenizer_config.json").mkdir()
    (folder / "tokenizer_config.json" / "inside.txt").write_text("a folder of mine")
    (folder / "vocab.txt.bak").write_text("backup")


def fingerprint(folder: Path) -> dict[str, str]:
    names = ["notes.txt", "tokenizer_config.json/inside.txt", "vocab.txt.bak"]
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() if (folder / n).is_file() else "gone"
            for n in names}


@contextlib.contextmanager
def deadline(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def which_save(folder: Path) -> str:
    """'old' or 'new' when weights, spec and extras all come from that save; 'mix' otherwise."""
    model = eigenfast.load(folder)
    weights = [w for w, state in MODELS.items() if all(torch.equal(v, state[k]) for k, v in model.state_dict().items())]
    spec = [w for w, p in P.items() if read_spec(folder)["report"]["p"] == p]
    extras = [w for w, p in P.items() if torch.equal(load_extras(folder)["p"], torch.tensor([p]))]
    return weights[0] if weights and weights == spec == extras else "mix"


def check(counts: Counter, folder: Path, user: dict[str, str], before: str) -> str:
    """Load the folder after a trial and count what went wrong; returns which save it holds."""
    try:
        with deadline(120):
            now = which_save(folder)
    except TimeoutError:
        counts["hangs"] += 1
        return before
    except eigenfast.EigenfastError:
        counts["lost saves"] += 1
        return before
    except Exception:
        counts["tracebacks"] += 1
        raise
    counts["mixes"] += now == "mix"
    counts["user files touched"] += fingerprint(folder) != user
    return now


def start_save(folder: Path, which: str, **options):
    start_forkserver()
    ready, (answer, sender) = CTX.Event(), CTX.Pipe(duplex=False)
    process = CTX.Process(target=crash_writer.slowed_save, args=(str(folder), which, DELAY, ready, sender),
                          kwargs=options)
    process.start()
    sender.close()  # the trial's process holds the only writing end: a kill shows as the end of the pipe
    assert ready.wait(120), "the trial's process never started"
    return process, answer


def finish(counts: Counter, process, answer) -> tuple[str, str] | None:
    process.join(120)
    if process.is_alive():
        counts["hangs"] += 1
        process.kill()
        process.join()
        return None
    try:
        outcome = answer.recv()
    except EOFError:  # killed before it could say
        outcome = None
    counts["tracebacks"] += outcome is not None and outcome[0] == "traceback"
    return outcome


def flat_version_2_save(folder: Path, which: str, crafted: bool = True) -> None:
    """Rewrite ``folder`` as an older eigenfast wrote a save: files at the top, a version 2 spec of sizes
    (``crafted``: the spec also names the user's files, as a hostile one would)."""
    crash_writer.save(tiny_model(which), str(folder), which)
    current = (folder / atomic.STATE / atomic.CURRENT).resolve()
    spec = json.loads((current / "eigenfast.json").read_text())
    for name in os.listdir(current):
        (folder / name).unlink()
        os.replace(current / name, folder / name)
    spec.update(version=2, files={name: entry["bytes"] for name, entry in spec["files"].items()})
    spec["files"]["eigenfast.json"] = None
    if crafted:
        spec["files"]["notes.txt"] = (folder / "notes.txt").stat().st_size
        spec["files"]["tokenizer_config.json"] = 4096
    (folder / "eigenfast.json").write_text(json.dumps(spec))
    subprocess.run(["rm", "-rf", str(folder / atomic.STATE)], check=True)


def test_a_save_killed_at_any_instant_leaves_the_old_save_or_the_new_one(tmp_path, counts):
    folder = tmp_path / "out"
    crash_writer.save(tiny_model("old"), str(folder), "old")
    user_files(folder)
    user = fingerprint(folder)
    process, answer = start_save(folder, "new")
    started = time.monotonic()
    assert finish(counts, process, answer) == ("saved", "new")
    duration = time.monotonic() - started  # one whole slowed save: the kills fall anywhere inside it
    holds = check(counts, folder, user, "new")
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    for trial in range(KILL_TRIALS):
        if trial < ADOPTING:
            flat_version_2_save(folder, holds)
        target = "old" if holds == "new" else "new"
        process, answer = start_save(folder, target)
        time.sleep(rng.uniform(0, duration))
        process.kill()
        finish(counts, process, answer)
        holds = check(counts, folder, user, holds)
        outcomes[holds] = outcomes.get(holds, 0) + 1
        counts["trials (kill -9 during a save)"] += 1
    print(f"after {KILL_TRIALS} kills: old save {outcomes['old']} times, new save {outcomes['new']} times")
    assert outcomes["old"] and outcomes["new"], "the kills should land both before and after the switch"
    # Nothing left over once a save completes after all those kills.
    crash_writer.save(tiny_model("new"), str(folder), "new")
    assert len([p for p in (folder / atomic.STATE).iterdir() if p.name.startswith(atomic.GENERATION)]) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        ".eigenfast", "config.json", "eigenfast.json", "extras.safetensors", "model.safetensors",
        "modeling_eigenfast.py", "notes.txt", "tokenizer_config.json", "vocab.txt.bak"])


def test_saves_racing_into_one_folder_never_mix(tmp_path, counts):
    folder = tmp_path / "out"
    crash_writer.save(tiny_model("old"), str(folder), "old")
    user_files(folder)
    user = fingerprint(folder)
    holds = "old"
    for _ in range(RACES):
        first, second = start_save(folder, "new"), start_save(folder, "old")
        outcomes = [finish(counts, *first), finish(counts, *second)]
        saved = [o[1] for o in outcomes if o and o[0] == "saved"]
        refused = [o[1] for o in outcomes if o and o[0] == "error"]
        assert saved, outcomes  # one of them always gets through
        assert all("another save is writing into" in message for message in refused), refused
        holds = check(counts, folder, user, holds)
        assert holds in saved
        counts["trials (two saves at once)"] += 1


@pytest.mark.parametrize("limit", [3_000, 20_000])
def test_a_save_the_kernel_refuses_to_write_keeps_the_old_save(tmp_path, counts, limit):
    """Writes past RLIMIT_FSIZE fail in the kernel (EFBIG) as on a full disk, early or late in the weights file."""
    folder = tmp_path / "out"
    crash_writer.save(tiny_model("old"), str(folder), "old")
    user_files(folder)
    user = fingerprint(folder)
    outcome = finish(counts, *start_save(folder, "new", file_limit=limit))
    assert outcome[0] == "error" and outcome[1].startswith("SaveError: cannot write the save into"), outcome
    assert check(counts, folder, user, "old") == "old"
    counts["trials (writes refused by the kernel)"] += 1


def test_a_save_on_a_full_disk_keeps_the_old_save_and_leaves_no_new_folder(tmp_path, counts):
    """A real full file system: a 600 kB tmpfs (needs root; skipped where it cannot be mounted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        folder = mount / "out"
        crash_writer.save(tiny_model("old"), str(folder), "old")
        user_files(folder)
        user = fingerprint(folder)
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)  # fill what is left but a little
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(filler, b"\0" * 4096)
        finally:
            os.close(filler)
        os.truncate(mount / "filler", max(0, (mount / "filler").stat().st_size - 20_000))
        with pytest.raises(eigenfast.SaveError, match="No space left on device"):
            crash_writer.save(tiny_model("new"), str(folder), "new")
        assert check(counts, folder, user, "old") == "old"
        with pytest.raises(eigenfast.SaveError, match="No space left on device"):
            crash_writer.save(tiny_model("new"), str(mount / "fresh" / "deeper"), "new")
        assert not (mount / "fresh").exists(), "a failed save into a new folder leaves no folder behind"
        counts["trials (full disk)"] += 2
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
