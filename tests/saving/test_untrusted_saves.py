"""A save folder is untrusted input: a load runs none of its code, and every malformed field is a SavedModelError
naming the field, raised before anything is allocated. Saves touch only the files eigenfast wrote."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil

import pytest
import torch

import eigenfast
from eigenfast.saving import atomic, serialization
from eigenfast.saving.loading import load_model

from conftest import make_model

# Would leave a mark if transformers ran it.
EVIL = "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('yes')\n"


def saved(tmp_path, name="m"):
    model = make_model("gpt2")
    return serialization.save_model(model, tmp_path / name, kind="test", report={"p": 0.3},
                                    tensors={"s": torch.ones(2)}), model


def edit_spec(folder, change):
    path = (folder / "eigenfast.json").resolve()
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def flat(folder):
    """Rewrite a save as versions 1 and 2 wrote it: every file at the top of the folder, no generations."""
    current = (folder / atomic.STATE / atomic.CURRENT).resolve()
    for name in os.listdir(current):
        (folder / name).unlink()
        os.replace(current / name, folder / name)
    shutil.rmtree(folder / atomic.STATE)


def set_field(spec, dotted, value):
    keys = dotted.split(".")
    target = spec
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[keys[-1]] = value


@pytest.mark.parametrize(("field", "value", "named"), [
    ("kind", 5, "kind"),
    ("dtype", "int8", "dtype"),
    ("attn_implementation", "kernels-community/flash-attn", "attn_implementation"),
    ("config.auto_map", {"AutoModelForCausalLM": "evil.Model"}, "config.auto_map"),
    ("config.vocab_size", 10**12, "config.vocab_size"),
    ("report", [1, 2], "report"),
    ("attributes", "x", "attributes"),
    ("files.model.safetensors", {"bytes": 1, "sha256": "no"}, "files.model.safetensors"),
    ("files.../outside", {"bytes": 1, "sha256": "0" * 64}, "files.../outside"),
])
def test_a_malformed_field_is_refused_by_name(tmp_path, field, value, named):
    folder, _ = saved(tmp_path)
    if field.startswith("files."):
        edit_spec(folder, lambda spec: spec["files"].__setitem__(field[len("files."):], value))
    else:
        edit_spec(folder, lambda spec: set_field(spec, field, value))
    with pytest.raises(eigenfast.SavedModelError, match=re.escape(f"field '{named}'")):
        eigenfast.load(folder)


def test_module_records_are_checked_before_anything_is_built(tmp_path):
    folder, model = saved(tmp_path)
    record = {"path": "transformer.h.0.attn.c_attn", "kind": "linear", "spec": {"d_in": 10**12, "d_out": 4,
                                                                                 "bias": True}}
    for modules, named in (([5], "modules[0]"), ([record], "modules[0].spec.d_in"),
                           ([{**record, "kind": "evil"}], "modules[0].kind")):
        edit_spec(folder, lambda spec: spec.__setitem__("modules", modules))
        with pytest.raises(eigenfast.SavedModelError, match=re.escape(f"field '{named}'")):
            eigenfast.load(folder)


def test_a_config_asking_for_a_huge_model_is_refused_without_allocating_it(tmp_path):
    folder, _ = saved(tmp_path)
    # 10**9 x 32 floats would be 128 GB: the shapes are compared on the meta device first.
    edit_spec(folder, lambda spec: spec["config"].update(vocab_size=10**9))
    with pytest.raises(eigenfast.SavedModelError, match=r"describes '(lm_head|transformer.wte).weight' as \(1000000000, 32\)"):
        eigenfast.load(folder)
    edit_spec(folder, lambda spec: spec["config"].update(vocab_size=40, n_layer=100_000))
    with pytest.raises(eigenfast.SavedModelError, match="asks for 100000 layers"):
        eigenfast.load(folder)


@pytest.mark.parametrize("model_type", ["gpt2", "evil"])
def test_a_version_1_config_that_maps_code_runs_nothing(tmp_path, model_type):
    """transformers would ask [y/N] on a terminal and run evil.py on a yes; eigenfast never lets it ask."""
    folder, model = saved(tmp_path)
    flat(folder)
    edit_spec(folder, lambda spec: (spec.__setitem__("version", 1), spec.pop("config"), spec.pop("files")))
    config = {**model.config.to_dict(), "model_type": model_type,
              "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL)
    if model_type == "gpt2":  # a type transformers knows: its own class reads the config, the code is ignored
        loaded = eigenfast.load(folder)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    else:
        with pytest.raises(eigenfast.SavedModelError, match="config.json cannot be read"):
            eigenfast.load(folder)
    assert not (folder / "CODE_RAN").exists()


def test_a_re_save_over_a_crafted_older_save_deletes_none_of_the_users_files(tmp_path):
    folder, _ = saved(tmp_path)
    flat(folder)
    (folder / "my_notes.txt").write_text("mine")
    (folder / "tokenizer_config.json").mkdir()
    (folder / "tokenizer_config.json" / "keep.txt").write_text("mine too")
    edit_spec(folder, lambda spec: (spec.__setitem__("version", 2), spec.__setitem__("files", {
        "model.safetensors": (folder / "model.safetensors").stat().st_size, "my_notes.txt": 4,
        "tokenizer_config.json": 4096, "extras.safetensors": None, "eigenfast.json": None})))
    other = make_model("gpt2", seed=3)
    serialization.save_model(other, folder, kind="test")  # no extras: the old save's extras go
    assert (folder / "my_notes.txt").read_text() == "mine"
    assert (folder / "tokenizer_config.json" / "keep.txt").read_text() == "mine too"
    assert not (folder / "extras.safetensors").exists()
    loaded = eigenfast.load(folder)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_save_into_a_folder_another_save_is_writing_is_refused(tmp_path):
    folder, _ = saved(tmp_path)
    with open(folder / atomic.STATE / atomic.LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(eigenfast.SaveError, match="another save is writing into"):
            saved(tmp_path)
        assert eigenfast.load(folder) is not None  # reading needs no write lock


def test_a_full_disk_is_a_save_error_and_leaves_no_folder(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_state", full)
    with pytest.raises(eigenfast.SaveError, match="No space left on device; free space"):
        serialization.save_model(make_model("gpt2"), tmp_path / "new" / "deeper", kind="test")
    assert not (tmp_path / "new").exists()


def test_an_output_nothing_can_be_written_in_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in ("/proc/eigenfast-out", str(tmp_path / "file" / "out")):
        with pytest.raises(eigenfast.OutputExistsError, match="choose a directory you can write to"):
            serialization.prepare_output_directory(out)


def test_a_probe_left_by_a_killed_check_is_removed_and_one_taken_by_another_check_is_no_error(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".eigenfast-probe.killed").mkdir()  # a check killed between making its probe and removing it
    (folder / ".eigenfast-probe.full").mkdir()
    (folder / ".eigenfast-probe.full" / "x").write_text("not an empty probe: not ours to remove")
    assert serialization.check_writable_directory(folder) == folder
    assert sorted(p.name for p in folder.iterdir()) == [".eigenfast-probe.full"]
    make = serialization.tempfile.mkdtemp

    def made_then_taken(*args, **kwargs):  # a check running at once removes this probe before it does
        path = make(*args, **kwargs)
        os.rmdir(path)
        return path

    monkeypatch.setattr(serialization.tempfile, "mkdtemp", made_then_taken)
    assert serialization.check_writable_directory(folder) == folder


def test_pickled_weights_are_never_loaded(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(make_model("gpt2").config.to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(eigenfast.ModelLoadError, match="pytorch_model.bin, a pickle, which eigenfast never loads"):
        load_model(str(folder))
