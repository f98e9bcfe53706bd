"""The command line on the built-in model: prune → save → eval, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import eigenfast
from eigenfast.builtin import load_builtin
from eigenfast.cli import main
from eigenfast.data import int_mult


def test_prune_then_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "0.1",
                 "--components", "k,mlp_in", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and f"saved the pruned model (p=0.1) to {out}" in printed

    assert main(["eval", "--model", str(out), "--task", "int_mult"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    model = eigenfast.load(out)
    _, tokenizer = load_builtin()
    _, test = int_mult(tokenizer).split(0.8, seed=0)
    assert reported["accuracy"] == pytest.approx(eigenfast.evaluate(model, test).accuracy)
    assert reported["n"] == 80
    frozen = eigenfast.serialization.load_extras(out)["frozen.0.k"]
    assert frozen.dtype == torch.uint8


def test_jsonl_task(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"{i} + {i} =", "target": f" {2 * i}"}) for i in range(20)))
    assert main(["eval", "--model", "int_sum_gpt2", "--task", str(task), "--split", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "lots", "--out", str(tmp_path / "x")])
    assert "--p must be a number in [0, 1] or 'auto'" in capsys.readouterr().err
    assert main(["eval", "--model", "int_sum_gpt2", "--task", "int_div"]) == 2
    assert "unknown task 'int_div'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="neither a directory nor a built-in model"):
        main(["eval", "--model", str(tmp_path / "missing"), "--task", "int_mult"])
    assert main(["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "2", "--out", str(tmp_path / "y")]) == 2
    assert "p must be a fraction in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
