"""``eigenfast table``: end to end on a tiny setting; its numbers are prune + evaluate's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from eigenfast import evaluate
from eigenfast.builtin import BUILTIN_MODELS, heldout_task, load_builtin
from eigenfast.cli import build_parser, main
from eigenfast.commands.table import page
from eigenfast.eigenprune import prune
from eigenfast.eigenprune.table import Row, Setting, default_settings, protocol_splits

from conftest import start_training


def test_protocol_splits_are_disjoint_thirds_that_move_with_the_seed():
    _, tokenizer = load_builtin("int_sum_gpt2")
    data = heldout_task("int_sum_gpt2", "int_mult", tokenizer)
    score, val, test = protocol_splits(data, seed=0)
    assert len(score) + len(val) + len(test) == len(data)
    assert min(len(score), len(val), len(test)) >= len(data) // 3 - 1
    parts = [set(part.prompts) for part in (score, val, test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set(protocol_splits(data, seed=1)[2].prompts) != parts[2]


def test_default_settings_cover_every_rule_and_the_training_baselines():
    settings = default_settings(("q", "k", "v", "o", "mlp_in", "mlp_out"))
    rules = {(s.pairs, s.reduce, s.estimate) for s in settings if s.components == ("v",) and not s.train}
    assert rules == {("all", "max", "linear"), ("all", "mean", "linear"), ("all", "mean", "ig"),
                     ("all", "mean", "verified")}
    assert {s.components for s in settings} == {(c,) for c in ("q", "k", "v", "o", "mlp_in", "mlp_out")}
    trained = {(s.train, s.prune, s.components, s.pairs) for s in settings if s.train}
    assert trained == {("ft", False, ("q",), "all"), ("ft-tuned", False, ("q",), "all"),
                       ("ft", True, ("k",), "shift"), ("low-rank", False, ("q",), "all")}
    assert not any(s.train for s in default_settings(("k",), ("linear",), baselines=False))


def test_table_cell_is_a_direct_prune_and_evaluate(tmp_path):
    out = tmp_path / "t" / "table.md"
    code = main(["table", "--models", "int_sum_gpt2", "--tasks", "int_sum", "--seeds", "1",
                 "--candidates", "0.3", "--components", "mlp_in", "--estimates", "linear", "--no-baselines",
                 "--out", str(out)])
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert out.with_suffix(".png").stat().st_size > 0 and "| int_sum_gpt2 | int_sum |" in out.read_text()
    # Both aggregations of mlp_in were tabled; this checks the paper's max.
    assert sorted(r["reduce"] for r in record["rows"]) == ["max", "mean"]
    row = next(r for r in record["rows"] if r["reduce"] == "max")
    assert Row.from_dict(row).as_dict() == row  # the page can be rendered again from the record alone
    assert out.read_text() == page(record, "table.png")
    cell = row["cells"][0]
    assert set(cell["sign"]) == {"0.3"} and 0.0 <= cell["sign"]["0.3"] <= 1.0  # the gate's p-value, recorded

    model, tokenizer = load_builtin("int_sum_gpt2")
    score, _, test = protocol_splits(heldout_task("int_sum_gpt2", "int_sum", tokenizer), seed=1)
    pruned = prune(model, score, p=0.3, components=("mlp_in",), progress=False).model
    assert cell["test"]["0.3"] == evaluate(pruned, test).accuracy
    assert cell["base_test"] == evaluate(model, test).accuracy
    assert cell["test"]["0.3"] != cell["base_test"]  # p=0.3 of mlp_in moves this model: the cell is not a copy of base


def test_table_passes_its_significance_to_prune_and_records_it(tmp_path, monkeypatch):
    from eigenfast.commands import table as command

    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(command, "run_table", stop)
    monkeypatch.setattr(command, "write", lambda out, png, rows, args: seen.update(line=command.command_line(args)))
    assert main(["table", "--significance", "0.01", "--out", str(tmp_path / "t.md")]) == 0
    assert seen["significance"] == 0.01 and "--significance 0.01" in seen["line"]
    assert main(["table", "--significance", "0", "--out", str(tmp_path / "t.md")]) == 0
    assert seen["significance"] is None  # 0: the gate is off, the most accurate p on val is kept
    assert build_parser().parse_args(["table"]).significance == 0.05


def test_table_rejects_unknown_task(capsys):
    assert main(["table", "--tasks", "nope", "--out", "unused.md"]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["eigenfast.builtin.train_mix", "eigenfast.builtin.train_conflict",
                                    "eigenfast.builtin.train_conflict2", "eigenfast.builtin.train_conflict3"])
def test_mix_training_is_deterministic(tmp_path, module):
    outs = [tmp_path / "a", tmp_path / "b"]
    runs = [start_training(out, steps=2, module=module) for out in outs]
    for run in runs:
        log, _ = run.communicate(timeout=300)
        assert run.returncode == 0, log
    first, second = (load_file(out / "model.safetensors") for out in outs)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    record = json.loads((outs[0] / "training.json").read_text(encoding="utf-8"))
    assert record["steps"] == 2 and record["held_out"]["int_sum"] == 3000


def test_demo_reproduces_its_table_cell(capsys):
    from eigenfast.commands.demo import DEMO_COMPONENTS, DEMO_MODEL, DEMO_PAIRS, DEMO_REDUCE, DEMO_TASK, run_demo
    from eigenfast.eigenprune.table import run_cell

    report = run_demo(candidates=(0.05, 0.3), seed=2).report
    printed = capsys.readouterr().out
    model, tokenizer = load_builtin(DEMO_MODEL)
    cell = run_cell(model, heldout_task(DEMO_MODEL, DEMO_TASK, tokenizer),
                    Setting(DEMO_COMPONENTS, DEMO_PAIRS, DEMO_REDUCE), seed=2, candidates=(0.05, 0.3))
    assert report.p == cell.chosen_p and report.baseline_test.accuracy == cell.base_test
    assert {c.p: c.test.accuracy for c in report.candidates} == cell.test
    assert f"{100 * cell.base_test:.2f}% -> {100 * cell.test[cell.chosen_p]:.2f}%" in printed
    assert ("no improvement" in printed) == (cell.test[cell.chosen_p] <= cell.base_test)


def test_works_needs_a_point_of_gain_above_twice_its_spread():
    from eigenfast.eigenprune.table import Cell

    def row(gains):
        cells = [Cell(seed, 0.5, 0.10, {0.1: 0.5}, {0.1: 0.10 + g}, 0.1) for seed, g in enumerate(gains)]
        return Row("m", "t", Setting(("v",), "all", "mean"), 30, cells)

    assert row([0.03, 0.04, 0.035]).works()
    assert row([0.03, 0.04, 0.035]).gains() == pytest.approx([0.03, 0.04, 0.035])
    assert not row([0.005, 0.005, 0.005]).works()  # steady, but under one point
    assert not row([0.10, -0.02, 0.0]).works()  # a point on average, but within the seeds' spread
    assert not row([-0.03, -0.04, -0.035]).works()


def test_shared_seed_work_gives_the_cells_each_setting_computes_alone(monkeypatch):
    """run_table shares each seed's splits, base accuracies and fine-tunes across settings: every cell must equal
    the one run_cell computes afresh, and the reference-lr fine-tune runs once per seed, not once per setting."""
    from eigenfast.eigenprune import finetune as finetune_module
    from eigenfast.eigenprune import table

    model, tokenizer = load_builtin("int_sum_gpt2")
    data = heldout_task("int_sum_gpt2", "int_sum", tokenizer).subset(range(96))
    settings = default_settings(("v",), ("linear", "verified"))
    runs = []
    real_finetune = finetune_module.finetune

    def counted(*args, **kwargs):
        runs.append(kwargs.get("lr"))
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(table, "finetune", counted)
    rows = table.run_table(["int_sum_gpt2"], ["int_sum"], lambda name: (model, tokenizer),
                           lambda name, task, tok: data, seeds=(0, 1), candidates=(0.05, 0.3),
                           settings=lambda components: settings, batch_size=32, log=lambda line: None,
                           significance=None)  # 32 val examples: the gate would keep p = 0 everywhere
    assert sorted(runs) == sorted(list(table.TUNED_LRS) * 2)  # three lrs per seed, the reference one reused
    runs.clear()
    for row, setting in zip(rows, settings):
        for cell in row.cells:
            alone = table.run_cell(model, data, setting, cell.seed, (0.05, 0.3), batch_size=32, significance=None)
            assert alone == cell, setting.label
    assert len(runs) == 2 * (1 + len(table.TUNED_LRS) + 1)  # alone, each fine-tuning setting trains afresh
    assert any(cell.chosen_p > 0 for row in rows if row.setting.prune for cell in row.cells)  # a p was kept


def test_default_run_is_every_builtin_with_every_rule_and_p_up_to_point_three():
    args = build_parser().parse_args(["table"])
    assert args.models == tuple(BUILTIN_MODELS) and len(args.models) == 6
    assert args.tasks == ("int_sum",) and args.components == ("v",) and args.seeds == (0, 1, 2)
    assert max(args.candidates) == 0.3 and args.baselines and set(args.estimates) == {"linear", "ig", "verified"}
    record = {"command": "c", "tasks": list(args.tasks), "components": list(args.components), "seeds": [0],
              "candidates": list(args.candidates), "rows": []}
    assert "the default run's scope" in page(record, "t.png")
    assert "the default run's scope" not in page({**record, "components": ["v", "k"]}, "t.png")
