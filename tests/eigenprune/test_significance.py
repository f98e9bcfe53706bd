"""The significance gate of p="auto": the exact sign test, and which p it lets prune keep."""
from __future__ import annotations

import itertools

import pytest
import torch

import eigenfast
from eigenfast.data.task_data import TaskData
from eigenfast.eigenprune.significance import sign_test, sign_test_p_value
from eigenfast.runtime.forward import Evaluation

from conftest import make_data, make_model

CANDIDATE = 0.5  # of k and v on the tiny model: it changes many argmaxes


def brute_force_p_value(gained: int, lost: int) -> float:
    """Every one of the 2^n equally likely ways n fair coins can fall, counted."""
    n = gained + lost
    flips = list(itertools.product((0, 1), repeat=n))
    return sum(1 for f in flips if sum(f) >= gained) / len(flips)


@pytest.mark.parametrize("gained,lost", [(0, 0), (1, 0), (0, 3), (6, 3), (3, 6), (9, 1), (7, 7), (12, 0), (5, 8)])
def test_p_value_is_the_binomial_tail_counted_by_enumeration(gained, lost):
    assert sign_test_p_value(gained, lost) == brute_force_p_value(gained, lost)


def test_p_value_of_known_cases_and_of_a_large_val_set():
    assert sign_test_p_value(6, 3) == 130 / 512  # C(9,6)+C(9,7)+C(9,8)+C(9,9) = 84+36+9+1
    assert sign_test_p_value(20, 0) == 2.0**-20
    # int_sum_llama seed 2, round five (val +1 point on ~1000 examples): dozens of changed examples, not significant.
    assert 0.1 < sign_test_p_value(55, 45) < 0.2
    assert sign_test_p_value(600, 400) < 1e-9  # big integers stay exact; the float at the end is tiny, not NaN


def test_sign_test_counts_the_changed_examples_in_order():
    base = Evaluation(0.5, 1.0, 4, torch.tensor([True, True, False, False]))
    pruned = Evaluation(0.5, 1.0, 4, torch.tensor([True, False, True, False]))
    test = sign_test(base, pruned)
    assert (test.gained, test.lost, test.p_value) == (1, 1, 0.75)
    with pytest.raises(eigenfast.ArgumentError, match="per-example correctness"):
        sign_test(Evaluation(0.5, 1.0, 4), pruned)


def test_evaluate_records_each_examples_correctness():
    model, data = make_model("gpt2"), make_data(n=10)
    evaluation = eigenfast.evaluate(model, data, batch_size=3)
    logits = model(input_ids=data.input_ids).logits[:, -1]
    assert torch.equal(evaluation.correct, logits.argmax(-1) == data.labels)
    assert evaluation.accuracy == evaluation.correct.float().mean().item()


def val_with_changes(model, score: TaskData, gained: int, lost: int, same: int) -> TaskData:
    """Validation prompts labelled so that the model pruned at CANDIDATE is right where the unpruned one is wrong on
    ``gained`` examples, the reverse on ``lost``, and both are wrong on ``same`` more: the sign test sees exactly
    ``gained`` and ``lost``."""
    pruned = eigenfast.prune(model, score, p=CANDIDATE, components=("k", "v"), reduce="mean", progress=False).model
    prompts = make_data(n=200, length=5, seed=3)
    with torch.no_grad():
        before = model(input_ids=prompts.input_ids).logits[:, -1].argmax(-1)
        after = pruned(input_ids=prompts.input_ids).logits[:, -1].argmax(-1)
    differ = (before != after).nonzero().flatten().tolist()
    assert len(differ) >= gained + lost, "the tiny model's pruned argmaxes must differ on enough prompts"
    labels = before.clone()
    rows = differ[:gained + lost]
    labels[rows[:gained]] = after[rows[:gained]]
    neither = [i for i in range(len(labels)) if i not in rows][:same]
    for i in neither:  # a token neither model predicts
        labels[i] = next(t for t in range(1, 40) if t not in (int(before[i]), int(after[i])))
    keep = rows + neither
    return TaskData(prompts.input_ids[keep], labels[keep])


def auto(model, score, val, **kwargs):
    return eigenfast.prune(model, score, p="auto", components=("k", "v"), reduce="mean", candidates=(CANDIDATE,),
                           val_data=val, progress=False, **kwargs).report


def test_a_small_val_gain_is_refused_and_a_large_one_kept():
    model, score = make_model("gpt2"), make_data(n=16, length=5)
    small = val_with_changes(model, score, gained=6, lost=3, same=20)
    report = auto(model, score, small)
    candidate = report.candidates[1]
    assert (candidate.sign.gained, candidate.sign.lost) == (6, 3)
    assert candidate.evaluation.accuracy > report.baseline.accuracy  # better on val, but within chance
    assert report.p == 0.0
    assert "no p beat the unpruned model beyond chance" in report.note and "p=0.5" in report.note
    assert "6 examples gained, 3 lost" in report.note and "p = 0.254" in report.note
    assert report.as_dict()["candidates"][1]["sign"] == {"gained": 6, "lost": 3, "p_value": 130 / 512}
    assert report.note in report.table()

    large = val_with_changes(model, score, gained=12, lost=1, same=20)
    report = auto(model, score, large)
    assert report.candidates[1].sign.p_value < 0.05 and report.p == CANDIDATE and report.note is None
    # Looser than the test's p-value of 0.25: the small gain passes too.
    assert auto(model, score, small, significance=0.3).p == CANDIDATE


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_gate_off_keeps_the_most_accurate_on_validation(off):
    model, score = make_model("gpt2"), make_data(n=16, length=5)
    small = val_with_changes(model, score, gained=6, lost=3, same=20)
    report = auto(model, score, small, significance=off)
    best = max(report.candidates, key=lambda c: (c.evaluation.accuracy, -c.evaluation.loss, -c.p))
    assert report.p == best.p == CANDIDATE and report.significance is None


def test_a_known_baseline_is_used_and_a_wrong_one_refused():
    model, score = make_model("gpt2"), make_data(n=16, length=5)
    val, test = make_data(n=12, length=5, seed=1), make_data(n=8, length=5, seed=2)
    fresh = auto(model, score, val, test_data=test)
    known = (eigenfast.evaluate(model, val), eigenfast.evaluate(model, test))
    given = auto(model, score, val, test_data=test, baseline=known)
    assert given.as_dict() | {"timings": None} == fresh.as_dict() | {"timings": None}
    assert "evaluate" in fresh.timings and given.timings["evaluate"] < fresh.timings["evaluate"]
    with pytest.raises(eigenfast.ArgumentError, match="baseline's test evaluation does not fit test_data"):
        auto(model, score, val, test_data=test, baseline=(known[0], known[0]))
    with pytest.raises(eigenfast.ArgumentError, match="lacks per-example correctness"):
        auto(model, score, val, test_data=test, baseline=(Evaluation(0.5, 1.0, 12), known[1]))


@pytest.mark.parametrize("level", [-0.1, 1.0, 2, "0.05", True])
def test_bad_significance_is_refused(level):
    with pytest.raises(eigenfast.ArgumentError, match="significance must be a level in"):
        eigenfast.prune(make_model("gpt2"), make_data(), p="auto", significance=level, progress=False)
