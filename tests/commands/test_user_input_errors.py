"""Ordinary bad input gives one ``error: ...`` line and status 1, never a traceback; the library raises
EigenfastError for the same input. Checks that need no work come before any work."""
from __future__ import annotations

import json

import pytest
import torch

import eigenfast
from eigenfast.cli import main
from eigenfast.data.task_data import TaskData

from conftest import make_data, make_model


def one_error_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for words in expected:
        assert words in lines[0], lines[0]
    return lines[0]


def test_a_jsonl_file_that_is_not_utf8(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_bytes(b'{"prompt": "1 + 1 =", "target": " 2"}\n{"prompt": "\xff\xfe", "target": " 3"}\n')
    assert main(["eval", "--model", "int_sum_gpt2", "--task", str(task)]) == 1
    one_error_line(capsys, "is not UTF-8 text", "save it as UTF-8")


def test_a_jsonl_prompt_longer_than_the_models_positions(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    rows = [{"prompt": "1 + 1 =", "target": " 2"}] * 4 + [{"prompt": " ".join(["1 + 1"] * 200) + " =", "target": " 2"}]
    task.write_text("\n".join(map(json.dumps, rows)))
    assert main(["eval", "--model", "int_sum_gpt2", "--task", str(task), "--split", "all"]) == 1
    one_error_line(capsys, "positions")


def test_an_output_nothing_can_be_written_in_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("eigenfast.commands.prune.load_model", no_work)
    (tmp_path / "file").write_text("x")
    for out in ("/proc/eigenfast-out", str(tmp_path / "file" / "out")):
        assert main(["prune", "--model", "int_sum_gpt2", "--task", "int_sum", "--out", out]) == 1
        one_error_line(capsys, "choose a directory you can write to")


def test_a_model_folder_of_pickled_weights(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(make_model("gpt2").config.to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    assert main(["eval", "--model", str(folder), "--task", "int_sum"]) == 1
    one_error_line(capsys, "a pickle, which eigenfast never loads")


def test_library_calls_with_bad_values_are_eigenfast_errors():
    model, data = make_model("gpt2"), make_data()
    mask = torch.ones_like(data.input_ids)
    mask[0, 0] = -1
    with pytest.raises(eigenfast.DataError, match="only 0 \\(padding\\) and 1 \\(real token\\)"):
        TaskData(data.input_ids, data.labels, mask)
    with pytest.raises(eigenfast.ArgumentError, match="batch_size must be a whole number >= 1, got 1.5"):
        eigenfast.evaluate(model, data, 1.5)
    with pytest.raises(eigenfast.EigenfastError, match="at least one candidate"):
        eigenfast.prune(model, data, p="auto", candidates=[])
    with torch.device("meta"):
        ghost = make_model("gpt2")
    with pytest.raises(eigenfast.ArgumentError, match="on the meta device"):
        eigenfast.evaluate(ghost, data)


def test_a_bad_distributed_timeout_is_an_argument_error(monkeypatch):
    from eigenfast.runtime.distributed import launched_by_torchrun

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("EIGENFAST_DIST_TIMEOUT", "soon")
    with pytest.raises(eigenfast.ArgumentError, match="EIGENFAST_DIST_TIMEOUT='soon'"):
        with launched_by_torchrun():
            pass


def test_a_refusal_of_the_file_system_is_one_line(capsys, monkeypatch):
    def refused(args):
        raise PermissionError(13, "Permission denied", "/somewhere/table.md")

    monkeypatch.setattr("eigenfast.commands.eval.run", refused)
    assert main(["eval", "--model", "int_sum_gpt2", "--task", "int_sum"]) == 1
    one_error_line(capsys, "error: /somewhere/table.md: Permission denied; check the path")
