"""Saved folders: never lose a user's files, never half-replace a save, never load silently wrong."""
from __future__ import annotations

import errno
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import eigenfast
from eigenfast.saving import atomic, serialization
from eigenfast.saving.serialization import save_model

from conftest import make_data, make_model


def logits(model, data):
    with torch.no_grad():
        return model(**data.model_inputs()).logits


def pruned(family: str = "gpt2", p: float = 0.2):
    return eigenfast.prune(make_model(family), make_data(), p=p, components=("k", "mlp_in"), progress=False)


def snapshot(folder):
    """What a reader of the folder sees: every top-level file (links followed) and its bytes."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_saving_over_a_save_keeps_other_files_and_replaces_its_own(tmp_path):
    folder = tmp_path / "results"
    first = pruned(p=0.1)
    first.save(folder)
    (folder / "my_results.csv").write_text("run,accuracy\n1,0.5\n")
    second = pruned(p=0.3)
    second.save(folder)
    assert (folder / "my_results.csv").read_text() == "run,accuracy\n1,0.5\n"
    assert torch.equal(logits(eigenfast.load(folder), make_data()), logits(second.model, make_data()))
    assert json.loads((folder / "eigenfast.json").read_text())["report"]["p"] == 0.3

    # A save without extras removes the earlier save's extras (eigenfast wrote them), nothing else.
    save_model(second.model, folder, kind="eigenpruned")
    assert not (folder / "extras.safetensors").exists()
    assert (folder / "my_results.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_a_failure_while_writing_leaves_the_previous_save_intact(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    pruned(p=0.1).save(folder)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", broken)
    with pytest.raises(eigenfast.SaveError, match="disk full"):
        pruned(p=0.3).save(folder)
    assert snapshot(folder) == before


def test_a_failure_at_the_switch_leaves_the_previous_save_and_no_leftovers(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    old = pruned(p=0.1)
    old.save(folder)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(eigenfast.SaveError, match="rename failed"):
        pruned(p=0.3).save(folder)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert torch.equal(logits(eigenfast.load(folder), make_data()), logits(old.model, make_data()))
    generations = [p for p in (folder / ".eigenfast").iterdir() if p.name.startswith("gen-")]
    assert generations == [(folder / ".eigenfast" / "current").resolve()]


def test_a_file_system_without_symbolic_links_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    """vfat and some network shares refuse symbolic links (EPERM), which a save switches with."""
    result = pruned(p=0.1)

    def refused(target, path, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "symlink", refused)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        with pytest.raises(eigenfast.SaveError, match="without symbolic links.*cp -rL"):
            result.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # the folder the failed save made is gone
    assert [p.name for p in (tmp_path / "empty").iterdir()] == [".eigenfast"]  # its lock stays; no save, no file
    with pytest.raises(eigenfast.SavedModelError, match="has no eigenfast.json"):
        eigenfast.load(tmp_path / "empty")


def test_a_foreign_folder_or_a_file_is_refused(tmp_path):
    result = pruned()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(eigenfast.OutputExistsError, match="not an eigenfast save"):
        result.save(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        result.save(tmp_path / "file")
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("name", ["model.safetensors", "extras.safetensors"])
def test_truncated_files_are_noticed(tmp_path, name):
    folder = pruned().save(tmp_path / "m")
    path = folder / name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(eigenfast.SavedModelError, match="truncated"):
        eigenfast.load(folder) if name == "model.safetensors" else serialization.load_extras(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "extras.safetensors", "config.json"])
def test_flipped_bytes_of_the_same_size_are_noticed(tmp_path, name):
    folder = pruned().save(tmp_path / "m")
    path = folder / name
    data = bytearray(path.read_bytes())
    for offset in (len(data) // 5, len(data) // 3, len(data) // 2, len(data) - 9):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(eigenfast.SavedModelError, match=f"{name} is not the file its save wrote"):
        eigenfast.load(folder)


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_transformers_refuses_a_save_without_trust_remote_code(tmp_path, family):
    folder = pruned(family).save(tmp_path / family)
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(folder, **kwargs)


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_transformers_loads_a_save_exactly_with_trust_remote_code(tmp_path, family):
    result = pruned(family)
    folder = result.save(tmp_path / f"remote_{family}")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model) is type(result.model)
    assert torch.equal(logits(model, make_data()), logits(result.model, make_data()))


# Loads a save through transformers without trust_remote_code, as a user would in a terminal.
TERMINAL_USER = """
import sys, torch
from transformers import AutoModelForCausalLM
import eigenfast
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as err:
    print("REFUSED" if "trust_remote_code=True" in str(err) else f"OTHER ERROR {err}", flush=True)
else:
    ids = torch.arange(1, 7).unsqueeze(0)
    with torch.no_grad():
        same = torch.equal(model(ids).logits, eigenfast.load(sys.argv[1])(ids).logits)
    print("LOADED", type(model).__name__, "same logits" if same else "OTHER LOGITS", flush=True)
"""


def converse_in_a_terminal(folder, answer: str) -> str:
    """Run TERMINAL_USER on a pseudo-terminal, answer transformers' [y/N] question, return what it printed."""
    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", TERMINAL_USER, str(folder)], stdin=terminal, stdout=terminal,
                             stderr=terminal, start_new_session=True)
    os.close(terminal)
    seen, answered, deadline = b"", 0, time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the child closed the terminal
                    break
                seen += chunk
                if seen.count(b"[y/N]") > answered:  # each question once (the config's, then the model's)
                    os.write(controller, answer.encode() + b"\n")
                    answered += 1
            elif child.poll() is not None:
                break
    finally:
        child.kill() if child.poll() is None else None
        child.wait()
        os.close(controller)
    return seen.decode(errors="replace")


def test_on_a_terminal_transformers_asks_and_a_no_refuses(tmp_path):
    said = converse_in_a_terminal(pruned("llama").save(tmp_path / "m"), "n")
    assert "Do you wish to run the custom code? [y/N]" in said and "REFUSED" in said, said


@pytest.mark.slow
def test_on_a_terminal_a_yes_loads_through_eigenfast(tmp_path):
    said = converse_in_a_terminal(pruned("llama").save(tmp_path / "m"), "y")
    assert said.count("[y/N]") == 2 and "LOADED LlamaForCausalLM same logits" in said, said


def test_every_error_is_an_eigenfast_error_and_keeps_its_builtin_base():
    expected = {
        eigenfast.DataError: ValueError,
        eigenfast.SavedModelError: RuntimeError,
        eigenfast.UnsupportedModelError: ValueError,
        eigenfast.PositionIndexError: IndexError,
        eigenfast.ModelLoadError: ValueError,
        eigenfast.ArgumentError: ValueError,
        eigenfast.OutputExistsError: FileExistsError,
        eigenfast.MissingFilesError: FileNotFoundError,
    }
    for error, builtin in expected.items():
        assert issubclass(error, eigenfast.EigenfastError) and issubclass(error, builtin), error
    with pytest.raises(eigenfast.EigenfastError):
        eigenfast.get_adapter(torch.nn.Linear(2, 2))


def test_version_1_saves_still_load(tmp_path):
    result = pruned("llama")
    folder = result.save(tmp_path / "m")
    spec = json.loads((folder / "eigenfast.json").read_text())
    result.model.config.to_json_file(folder / "config.json")  # version 1 kept the HF config there
    for key in ("config", "files"):
        del spec[key]
    (folder / "eigenfast.json").write_text(json.dumps({**spec, "version": 1}))
    assert torch.equal(logits(eigenfast.load(folder), make_data()), logits(result.model, make_data()))
    spec["version"] = 7
    (folder / "eigenfast.json").write_text(json.dumps(spec))
    with pytest.raises(eigenfast.SavedModelError, match="reads versions 1, 2"):
        eigenfast.load(folder)
