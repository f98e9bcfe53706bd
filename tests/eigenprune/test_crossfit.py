"""select="crossfit": p="auto" ranks each p by both folds of a 2-fold cross-fit over the scoring and validation data."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.builtin import heldout_task, load_builtin
from eigenfast.cli import build_parser, main
from eigenfast.eigenprune.prune import Candidate, PruneReport
from eigenfast.eigenprune.significance import SignTest
from eigenfast.eigenprune.table import Setting, protocol_splits, run_cell, run_table
from eigenfast.runtime.forward import Evaluation

from conftest import make_data, make_model


def auto(model, score, val, select, estimate="linear", candidates=(0.25, 0.5), **kwargs):
    return eigenfast.prune(model, score, p="auto", components=("k", "v"), reduce="mean", estimate=estimate,
                           candidates=candidates, val_data=val, select=select, progress=False, **kwargs)


@pytest.mark.parametrize("estimate,candidates", [("linear", (0.25, 0.5)), ("verified", (0.5,))])
def test_the_other_fold_is_each_p_scored_on_val_and_evaluated_on_the_scoring_data(estimate, candidates):
    model = make_model("gpt2")
    score, val = make_data(n=16, length=5), make_data(n=12, length=5, seed=1)
    report = auto(model, score, val, "crossfit", estimate, candidates, significance=None).report
    assert [c.p for c in report.candidates] == [0.0, *candidates] and report.select == "crossfit"
    assert report.candidates[0].cross == eigenfast.evaluate(model, score)
    for candidate in report.candidates[1:]:
        # The naive fold: prune at this p alone, scored on val; evaluate it on the scoring data.
        alone = eigenfast.prune(model, val, p=candidate.p, components=("k", "v"), reduce="mean", estimate=estimate,
                                progress=False).model
        expected = eigenfast.evaluate(alone, score)
        assert candidate.cross.accuracy == expected.accuracy and candidate.cross.n == len(score)
        assert candidate.cross.loss == pytest.approx(expected.loss, rel=1e-6)
    assert "crossfit" in report.timings and report.as_dict()["candidates"][1]["cross"]["n"] == len(score)
    assert "fold acc" in report.table()


def test_the_cross_fit_changes_only_the_choice_and_keeps_the_model_scored_on_the_scoring_data():
    model = make_model("gpt2")
    score, val, test = make_data(n=16, length=5), make_data(n=12, length=5, seed=1), make_data(n=8, seed=2)
    by_val = auto(model, score, val, "val", test_data=test, significance=None)
    crossed = auto(model, score, val, "crossfit", test_data=test, significance=None)
    for a, b in zip(by_val.report.candidates, crossed.report.candidates):
        assert (a.p, a.frozen, a.evaluation, a.test, a.cross) == (b.p, b.frozen, b.evaluation, b.test, None)
    assert crossed.report.kept_by("val") == by_val.report.p
    chosen = crossed.report.p
    assert chosen == crossed.report.kept_by("crossfit")
    pooled = {c.p: (c.evaluation.accuracy * len(val) + c.cross.accuracy * len(score)) / (len(val) + len(score))
              for c in crossed.report.candidates}
    assert pooled[chosen] == max(pooled.values())
    if chosen:  # the kept model is the scoring data's prune at that p
        alone = eigenfast.prune(model, score, p=chosen, components=("k", "v"), reduce="mean", progress=False).model
        ids = make_data(n=4, seed=5).input_ids
        with torch.no_grad():
            torch.testing.assert_close(crossed.model(input_ids=ids).logits, alone(input_ids=ids).logits)


def report_of(candidates: list[Candidate], significance: float | None, select: str = "crossfit") -> PruneReport:
    return PruneReport(0.0, ("v",), "all", 4, candidates[0].evaluation, candidates, significance=significance,
                       select=select)


def held_out(accuracy: float, n: int) -> Evaluation:
    return Evaluation(accuracy, 1.0 - accuracy, n)


def test_pooled_folds_can_overrule_validation_and_the_gate_still_applies():
    """Validation alone prefers p = 0.05 (0.60 against 0.58); pooled with the other fold (0.40 against 0.56 on
    twice as many examples) p = 0.1 wins. The gate tests the kept model on val: a p it refuses is never kept."""
    passing, failing = SignTest(60, 1, 1e-9), SignTest(3, 2, 0.5)
    candidates = [
        Candidate(0.0, {}, held_out(0.30, 100), cross=held_out(0.30, 200)),
        Candidate(0.05, {"v": 2}, held_out(0.60, 100), sign=passing, cross=held_out(0.40, 200)),
        Candidate(0.1, {"v": 4}, held_out(0.58, 100), sign=passing, cross=held_out(0.56, 200)),
    ]
    assert report_of(candidates, 0.05).kept_by("val") == 0.05
    assert report_of(candidates, 0.05).kept_by("crossfit") == 0.1
    candidates[2].sign = failing
    assert report_of(candidates, 0.05).kept_by("crossfit") == 0.05
    assert report_of(candidates, None).kept_by("crossfit") == 0.1  # no gate: the pooled best
    # Refused by the gate, the pooled best is named; its gain is val's, where the sign test was made.
    candidates[1].sign = candidates[2].sign = failing
    report = report_of(candidates, 0.05)
    assert report.kept_by("crossfit") == 0.0 and report.refused() is candidates[2]
    assert "the best on both cross-fit folds, p=0.1, gained +28.0 points on val" in report.note


def test_crossfit_needs_p_auto_and_a_known_selection():
    model, data = make_model("gpt2"), make_data()
    with pytest.raises(eigenfast.ArgumentError, match="select='crossfit' chooses p among candidates"):
        eigenfast.prune(model, data, p=0.1, select="crossfit", progress=False)
    with pytest.raises(eigenfast.ArgumentError, match="select must be one of"):
        eigenfast.prune(model, data, p="auto", select="test", progress=False)
    with pytest.raises(eigenfast.ArgumentError, match="select must be one of"):
        run_cell(model, data, Setting(("v",)), 0, select="test")


def test_prune_command_takes_select_and_refuses_it_with_a_fixed_p(tmp_path, capsys):
    assert build_parser().parse_args(["prune", "--model", "int_sum_gpt2", "--task", "int_sum", "--out", "o"]).select \
        == "val"
    code = main(["prune", "--model", "int_sum_gpt2", "--task", "int_sum", "--p", "0.1", "--select", "crossfit",
                 "--out", str(tmp_path / "out")])
    assert code != 0 and "select='crossfit' chooses p among candidates" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_table_crossfit_cells_record_both_choices_and_tune_the_fine_tune_on_both_folds(monkeypatch):
    from eigenfast.eigenprune import table

    model, tokenizer = load_builtin("conflict3_gpt2")
    data = heldout_task("conflict3_gpt2", "int_sum", tokenizer).subset(range(120))
    settings = [Setting(("v",), "all", "mean"), Setting(("v",), train="ft-tuned", prune=False),
                Setting(("v",), train="ft", prune=True)]
    rows = run_table(["conflict3_gpt2"], ["int_sum"], lambda name: (model, tokenizer), lambda n, t, tok: data,
                     seeds=(0,), candidates=(0.05, 0.3), settings=lambda components: settings, batch_size=40,
                     log=lambda line: None, significance=None, select="crossfit")
    pruned, tuned, after_training = (row.cells[0] for row in rows)
    assert set(pruned.cross) == {0.0, 0.05, 0.3} and pruned.val_p is not None
    by_val = run_cell(model, data, settings[0], 0, (0.05, 0.3), batch_size=40, significance=None)
    assert by_val.val == pruned.val and by_val.test == pruned.test and by_val.chosen_p == pruned.val_p
    assert pruned == run_cell(model, data, settings[0], 0, (0.05, 0.3), 40, significance=None, select="crossfit")
    assert not after_training.cross and after_training.val_p is None  # trained on the scoring third: val alone
    # The tuned fine-tune's lr: best pooled accuracy, its val-third fine-tune judged on the scoring third.
    score, val, test = protocol_splits(data, 0)
    pooled = {}
    for lr in table.TUNED_LRS:
        on_score = table.finetune(model, score, lr=lr, seed=0).model
        on_val = table.finetune(model, val, lr=lr, seed=0).model
        pooled[lr] = (eigenfast.evaluate(on_score, val).accuracy * len(val)
                      + eigenfast.evaluate(on_val, score).accuracy * len(score))
        pooled[lr] = (pooled[lr], eigenfast.evaluate(on_score, test).accuracy)
    best = max(table.TUNED_LRS, key=lambda lr: pooled[lr][0])
    assert tuned.test[0.0] == pooled[best][1]
