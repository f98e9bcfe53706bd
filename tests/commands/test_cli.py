"""The command line on the built-in model: prune → save → eval, honest splits, help, and clear errors."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from transformers import AutoModelForCausalLM, AutoTokenizer

import eigenfast
from eigenfast.builtin import load_builtin
from eigenfast.builtin.train import int_sum_split
from eigenfast.cli import build_parser, main
from eigenfast.commands import COMMANDS
from eigenfast.data.splits import task_parts
from eigenfast.data.task_data import int_mult, int_sum
from eigenfast.data.tasks import TASKS
from eigenfast.runtime.progress import log_lines, progress


def test_prune_then_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "0.1",
                 "--components", "k,mlp_in", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and f"saved the pruned model (p=0.1) to {out}" in printed
    assert "size after" in printed and "buffer elements" in printed

    assert main(["eval", "--model", str(out), "--task", "int_mult"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    model = eigenfast.load(out)
    _, tokenizer = load_builtin()
    test = task_parts("int_mult", int_mult(tokenizer), None, seed=0)["test"].data
    assert reported["accuracy"] == pytest.approx(eigenfast.evaluate(model, test).accuracy)
    assert reported["n"] == 80 and "20% of int_mult" in reported["examples"]
    frozen = eigenfast.saving.serialization.load_extras(out)["frozen.0.k"]
    assert frozen.dtype == torch.uint8


def test_prune_writes_a_plain_checkpoint(tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "0.1", "--components", "v",
                 "--reduce", "mean", "--positions", "mean", "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"saved the pruned model (p=0.1) to {out}" in printed
    row = next(line.split() for line in printed.splitlines() if line.strip().startswith("0.10"))
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")  # no eigenfast module in it
    _, tokenizer = load_builtin()
    test = task_parts("int_mult", int_mult(tokenizer), None, seed=0)["test"].data
    # The plain checkpoint scores what the command reported for the pruned model on the test part.
    val_accuracy, test_accuracy = (cell for cell in row if cell.endswith("%"))
    assert eigenfast.evaluate(plain, test).accuracy == pytest.approx(float(test_accuracy.rstrip("%")) / 100, abs=5e-5)
    assert AutoTokenizer.from_pretrained(out)("12 + 34 =").input_ids == tokenizer("12 + 34 =").input_ids


def test_jsonl_task(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i} + {i} =", "target": f" {2 * i}"}) for i in range(20)))
    assert main(["eval", "--model", "int_sum_gpt2", "--task", str(task), "--split", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20


def test_the_builtin_models_numbers_never_include_its_training_examples():
    loaded = eigenfast.load_model("int_sum_gpt2")
    assert loaded.training is not None and loaded.training.task == "int_sum"
    parts = task_parts("int_sum", int_sum(loaded.tokenizer), loaded.training, seed=3)
    trained, held_out = int_sum_split(loaded.tokenizer)  # what the training script trained on
    assert parts["train"].data.prompts == trained.prompts
    seen = set(trained.prompts)
    for name in ("val", "test", "unseen"):
        assert not seen & set(parts[name].data.prompts), name
    assert sorted(parts["val"].data.prompts + parts["test"].data.prompts) == sorted(held_out.prompts)
    assert "never trained on" in parts["test"].origin


def test_extract_draws_from_examples_the_model_never_trained_on(tmp_path, monkeypatch, capsys):
    drawn = {}

    class Stop(Exception):
        pass

    def fake_extract(model, patch, val, threshold, **kwargs):
        drawn.update(patch=patch, val=val)
        raise Stop

    monkeypatch.setattr("eigenfast.commands.extract.extract_circuit", fake_extract)
    with pytest.raises(Stop):
        main(["extract", "--model", "int_sum_gpt2", "--task", "int_sum", "--threshold", "0.01",
              "--n-patch", "300", "--n-val", "400", "--out", str(tmp_path / "c")])
    trained, _ = int_sum_split(load_builtin()[1])
    seen = set(trained.prompts)
    assert len(drawn["patch"]) == 300 and len(drawn["val"]) == 400
    assert not seen & set(drawn["patch"].prompts) and not seen & set(drawn["val"].prompts)
    printed = capsys.readouterr().out
    assert "D_v" in printed and "never trained on" in printed


def test_a_pruned_save_keeps_the_training_record(tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "int_sum", "--p", "0", "--out", str(out)]) == 0
    assert eigenfast.load_model(str(out)).training == eigenfast.load_model("int_sum_gpt2").training
    model, tokenizer = load_builtin()  # the library path keeps it too
    data = int_mult(tokenizer).subset(range(8))
    eigenfast.prune(model, data, p=0.0, progress=False).save(tmp_path / "library")
    assert eigenfast.load(tmp_path / "library").config.eigenfast_training["task"] == "int_sum"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "lots"], "--p must be a number in [0, 1]"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "2"], "--p must be a number in [0, 1]"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "nan"], "--p must be a number in [0, 1]"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--components", "k,z"], "unknown component 'z'"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--batch-size", "0"], "whole number >= 1"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--candidates", "0.1,1.5"], "fraction in [0, 1]"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--significance", "1"],
         "--significance must be a level in [0, 1)"),
        (["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--significance", "often"],
         "--significance must be a level in [0, 1)"),
        (["table", "--significance", "-0.01"], "--significance must be a level in [0, 1)"),
        (["extract", "--model", "int_sum_gpt2", "--task", "int_mult", "--threshold", "-1"], "finite number >= 0"),
        (["extract", "--model", "int_sum_gpt2", "--task", "int_mult", "--threshold", "nan"], "finite number >= 0"),
        (["extract", "--model", "int_sum_gpt2", "--task", "int_mult", "--sweep", "0.1,-2"], "finite number >= 0"),
        (["extract", "--model", "int_sum_gpt2", "--task", "int_mult", "--threshold", "0.1", "--n-val", "0"],
         "whole number >= 1"),
        (["extract", "--model", "int_sum_gpt2", "--task", "int_mult"], "one of the arguments --threshold --sweep"),
    ],
)
def test_usage_errors_exit_2_before_any_work(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _no_work(*args, **kwargs):
    raise AssertionError("the command started work before checking its arguments")


@pytest.mark.parametrize("command", [["prune", "--p", "0.1"], ["extract", "--threshold", "0.1"]])
def test_failures_exit_1_before_any_work(tmp_path, capsys, monkeypatch, command):
    name = command[0]
    monkeypatch.setattr(f"eigenfast.commands.{name}.load_model", _no_work)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "my_results.csv").write_text("a,b\n")
    cases = [
        (["--model", "int_sum_gpt2", "--task", "int_mult", "--out", str(foreign)], "is not an eigenfast save"),
        (["--model", "int_sum_gpt2", "--task", "int_div", "--out", str(tmp_path / "o")], "unknown task 'int_div'"),
        (["--model", "int_sum_gpt2", "--task", str(tmp_path / "no.jsonl"), "--out", str(tmp_path / "o")],
         "no such data file"),
        (["--model", str(tmp_path / "missing"), "--task", "int_mult", "--out", str(tmp_path / "o")],
         "neither a directory nor a built-in model"),
        (["--model", "int_sum_gpt2", "--task", "int_mult", "--out", str(foreign / "my_results.csv")], "is a file"),
        (["--model", "int_sum_gpt2", "--task", "int_mult", "--format", "hf", "--out", str(tmp_path / "o")],
         "add --positions mean"),
        (["--model", "int_sum_gpt2", "--task", "int_mult", "--format", "hf", "--positions", "mean", "--out",
          str(foreign)], "new or empty"),
    ]
    for rest, message in cases:
        assert main([*command, *rest]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert (foreign / "my_results.csv").read_text() == "a,b\n"


def test_a_hf_folder_without_tokenizer_is_refused_clearly(tmp_path, capsys):
    model, _ = load_builtin()
    model.save_pretrained(tmp_path / "bare")
    assert main(["eval", "--model", str(tmp_path / "bare"), "--task", "int_mult"]) == 1
    assert "holds a model but no tokenizer files" in capsys.readouterr().err
    with pytest.raises(eigenfast.EigenfastError, match="tokenizer.save_pretrained"):
        eigenfast.load_model(str(tmp_path / "bare"))


def test_load_model_raises_eigenfast_errors_not_system_exit(tmp_path):
    with pytest.raises(eigenfast.ModelLoadError, match="neither a directory"):
        eigenfast.load_model(str(tmp_path / "missing"))


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        assert "``" not in (sub.description or "") and ":class:" not in (sub.description or ""), name
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if not action.required and action.default is not None:
                assert sub.formatter_class(name)._get_help_string(action).endswith("(default: %(default)s)"), (
                    f"{name} {action.option_strings} hides its default"
                )
        assert "(default: auto)" in text or name != "prune"


def test_every_command_follows_the_convention():
    for name, module in COMMANDS.items():
        assert callable(module.add_arguments) and callable(module.run), name
        assert module.__doc__ and module.__doc__.strip().splitlines()[0].endswith("."), name


def test_help_exits_0(capsys):
    assert main(["prune", "--help"]) == 0
    assert "--n-patch" not in capsys.readouterr().out


def test_progress_logs_plain_lines_without_a_terminal(capsys, monkeypatch):
    stream = io.StringIO()
    assert list(log_lines(range(20), 20, "score", stream)) == list(range(20))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "score: 0/20" and lines[1] == "score: 2/20" and lines[-1].startswith("score: 20/20 done in")
    assert "\r" not in stream.getvalue() and len(lines) == 11

    monkeypatch.delenv("EIGENFAST_QUIET", raising=False)
    assert list(progress(range(3), 3, "eval")) == [0, 1, 2]  # pytest's stderr is not a terminal
    assert capsys.readouterr().err.splitlines()[0] == "eval: 0/3"
    monkeypatch.setenv("EIGENFAST_QUIET", "1")
    assert list(progress(range(3), 3, "eval")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_nan_is_not_a_fraction():
    from eigenfast.commands.arguments import fraction

    with pytest.raises(argparse.ArgumentTypeError):
        fraction(str(math.nan))


def test_a_sweep_may_write_into_a_folder_with_other_files_but_a_circuit_may_not(tmp_path, monkeypatch, capsys):
    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr("eigenfast.commands.extract.load_model", started)
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "sweep.json").write_text("{}")  # an earlier sweep
    common = ["extract", "--model", "int_sum_gpt2", "--task", "int_mult", "--out", str(folder)]
    with pytest.raises(Started):
        main([*common, "--sweep", "0.1,1"])
    assert main([*common, "--threshold", "0.1"]) == 1
    assert "not an eigenfast save" in capsys.readouterr().err


def test_prune_takes_reduce_and_every_task_table_takes(tmp_path, monkeypatch):
    seen = {}

    def stop(model, data, **kwargs):
        seen.update(kwargs, n=len(data))
        raise eigenfast.ArgumentError("stop here")

    monkeypatch.setattr("eigenfast.commands.prune.prune", stop)
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "induction", "--reduce", "mean",
                 "--out", str(tmp_path / "o")]) == 1
    assert seen["reduce"] == "mean" and seen["n"] == 1920  # 64% of the 3,000 induction prompts
    assert seen["significance"] == 0.05  # the gate on p="auto" is on by default
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "induction", "--significance", "0",
                 "--out", str(tmp_path / "o")]) == 1
    assert seen["significance"] == 0.0  # off: prune keeps the most accurate p on validation
    assert build_parser().parse_args(["prune", "--model", "m", "--task", "t", "--out", "o"]).reduce == "max"
    for task in TASKS:
        assert task in build_parser()._subparsers._group_actions[0].choices["table"].format_help()


def test_eval_takes_the_induction_task(capsys):
    assert main(["eval", "--model", "int_sum_gpt2", "--task", "induction", "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 600


def test_help_shows_each_default_once():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            shown = sub.formatter_class(name)._get_help_string(action)
            assert shown.count("(default:") <= 1, f"{name} {action.option_strings}: {shown}"
            assert not isinstance(action.default, (tuple, list)), f"{name} {action.option_strings}: give the text"


def test_a_folder_that_is_not_a_model_is_told_what_one_holds(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    assert main(["eval", "--model", str(folder), "--task", "int_sum"]) == 1
    err = capsys.readouterr().err
    assert f"{folder} is not a model folder: it has no weights" in err and "model.safetensors" in err, err
    assert "save the tokenizer" not in err
    (folder / "config.json").unlink()
    with pytest.raises(eigenfast.ModelLoadError, match="it has no config.json and no weights"):
        eigenfast.load_model(str(folder))


def test_loading_shows_no_transformers_progress_bar(tmp_path, capfd):
    from transformers.utils import logging

    model, tokenizer = load_builtin()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    capfd.readouterr()
    assert logging.is_progress_bar_enabled()
    load_builtin("conflict3_gpt2")
    eigenfast.load_model(str(tmp_path / "hf"))
    assert "Loading weights" not in capfd.readouterr().err
    assert logging.is_progress_bar_enabled()  # the user's own transformers calls keep their bars


@pytest.mark.slow
def test_ctrl_c_stops_a_command_with_one_line_and_status_130(tmp_path):
    out = tmp_path / "pruned"
    command = subprocess.Popen(
        [sys.executable, "-m", "eigenfast.cli", "prune", "--model", "int_sum_gpt2", "--task", "int_sum", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "EIGENFAST_QUIET": "1"},
    )
    assert command.stdout.readline().startswith("data")  # past the imports: the command is working
    command.send_signal(signal.SIGINT)
    _, err = command.communicate(timeout=300)
    assert command.returncode == 130 and err.endswith("interrupted\n") and "Traceback" not in err, err
    assert not out.exists()


# Loaded by the interpreter before eigenfast (it is first on PYTHONPATH): `import torch` leaves a mark, then
# takes a minute, as on a slow disk, so the Ctrl-C below surely comes while torch is being imported.
SLOW_TORCH = '''
import importlib.abc, os, sys, time

class SlowTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            open(os.environ["TORCH_IMPORT_MARK"], "w").close()
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowTorch())
'''


def test_ctrl_c_while_torch_loads_is_one_line_too(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SLOW_TORCH)
    mark = tmp_path / "importing-torch"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "TORCH_IMPORT_MARK": str(mark)}
    command = subprocess.Popen([sys.executable, "-m", "eigenfast.cli", "prune", "--model", "int_sum_gpt2", "--task",
                                "int_sum", "--out", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(3000):
            if mark.exists() or command.poll() is not None:
                break
            time.sleep(0.01)
        assert mark.exists(), command.communicate()
        command.send_signal(signal.SIGINT)
        _, err = command.communicate(timeout=60)
    finally:
        command.kill()
    assert command.returncode == 130 and err == "interrupted\n", err


def test_import_eigenfast_loads_no_torch_until_a_name_is_used():
    code = ("import sys, eigenfast; before = 'torch' in sys.modules; eigenfast.SaveError; errors = 'torch' in sys.modules; "
            "eigenfast.prune; print(before, errors, 'torch' in sys.modules, hasattr(eigenfast, 'no_such_name'))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["False", "False", "True", "False"]
    assert set(eigenfast.__all__) <= set(dir(eigenfast))
    assert all(getattr(eigenfast, name) is not None for name in eigenfast.__all__)
