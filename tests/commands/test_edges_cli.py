"""``eigenfast edges``: the methods side by side on the built-in model, a table and a PNG."""
from __future__ import annotations

import argparse
import json
import shlex

import pytest
import torch

from eigenfast.cli import main
from eigenfast.commands import edges as edges_cli
from eigenfast.commands.docs_block import markers
from eigenfast.data.task_data import TaskData
from eigenfast.edges import corrupt_by_shuffling


def test_edges_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "edges"
    code = main(["edges", "--model", "int_sum_gpt2", "--task", "int_sum", "--n", "8", "--steps", "4",
                 "--methods", "edge_prune,eap,algorithm1", "--sparsities", "0.9", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for label in ("edge pruning s=0.9", "EAP s=0.9", "Algorithm 1 α=0.01", "KL", "edges", "CPR", "CMD"):
        assert label in text
    assert (out / "edges.png").stat().st_size > 0 and (out / "edges.json").is_file()
    assert (out / "faithfulness.png").stat().st_size > 0
    saved = json.loads((out / "edges.json").read_text())
    assert [len(r["faithfulness"]["curve"]["faithfulness"]) for r in saved] == [10, 10, 10]


def test_every_option_has_help_and_a_default():
    parser = argparse.ArgumentParser()
    edges_cli.add_arguments(parser)
    for action in parser._actions[1:]:
        assert action.help, action.dest
        assert action.required or action.default is not None, action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--task", "t", "--methods", "magic"])


def test_shuffled_counterfactuals_keep_lengths_and_move_rows():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 3, 4], [1, 2, 3], [0, 0, 9]])
    mask = (ids != 0).long()
    mask[1:2] = 1
    mask[3:4] = 1
    data = TaskData(ids, torch.arange(5), mask)
    corrupted = corrupt_by_shuffling(data, seed=0)
    assert torch.equal(corrupted.mask, data.mask)
    moved = [i for i in range(5) if not torch.equal(corrupted.input_ids[i], ids[i])]
    assert moved == [0, 1, 2, 3]  # the only length-1 prompt stays its own counterfactual


def test_write_docs_replaces_its_block_with_the_tables_and_a_command_that_reproduces_them(tmp_path, capsys):
    page = tmp_path / "EDGES.md"
    name = edges_cli.docs_block_name(argparse.Namespace(model="int_sum_gpt2", task="int_sum"))
    begin, end = markers(name)
    page.write_text(f"# Prose before\n\n{begin}\nan old table\n{end}\n\nProse after.\n")
    argv = ["edges", "--model", "int_sum_gpt2", "--task", "int_sum", "--n", "6", "--methods", "eap",
            "--sparsities", "0.5", "--out", str(tmp_path / "out"), "--write-docs", str(page)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    text = page.read_text()
    assert text.startswith("# Prose before\n\n") and text.endswith("\n\nProse after.\n")
    assert "an old table" not in text and text.count(begin) == text.count(end) == 1
    block = text.split(begin)[1].split(end)[0]
    assert "EAP s=0.5" in block and "CPR" in block and "load average" in block and " UTC in " in block
    # The written line names every option that decides the numbers; parsed back it gives this run's settings.
    line = block.split("```\n")[1].strip()
    parser = argparse.ArgumentParser()
    edges_cli.add_arguments(parser)
    written, given = parser.parse_args(shlex.split(line)[2:]), parser.parse_args(argv[1:])
    for option in edges_cli.MEASURED_OPTIONS:
        assert getattr(written, option) == getattr(given, option), option
    # The table in the page is the one printed.
    cpr_row = next(r for r in printed.splitlines() if r.startswith("EAP s=0.5") and "[" not in r and len(r.split()) == 7)
    assert cpr_row in block
    # A rerun replaces the block instead of adding one.
    assert main(argv) == 0
    assert page.read_text().count(begin) == 1


def test_write_docs_refuses_a_broken_block_before_running(tmp_path, capsys):
    page = tmp_path / "EDGES.md"
    begin, _ = markers(edges_cli.docs_block_name(argparse.Namespace(model="int_sum_gpt2", task="int_sum")))
    page.write_text(f"{begin}\nno end marker\n")
    code = main(["edges", "--model", "int_sum_gpt2", "--task", "int_sum", "--n", "6", "--methods", "eap",
                 "--out", str(tmp_path / "out"), "--write-docs", str(page)])
    assert code == 1 and "broken block" in capsys.readouterr().err
    assert page.read_text() == f"{begin}\nno end marker\n" and not (tmp_path / "out").exists()
