"""``eigenfast edges``: the methods side by side on the built-in model, a table and a PNG."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from eigenfast.cli import main
from eigenfast.commands import edges as edges_cli
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
