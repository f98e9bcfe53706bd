"""The bootstrap over examples: resamples=0 is the plain evaluation, each resample is the method on its draw."""
from __future__ import annotations

import pytest
import torch

from eigenfast.edges import run
from eigenfast.edges.benchmark import evaluate_faithfulness
from eigenfast.edges.evaluate import prepare
from eigenfast.edges.faithfulness import faithfulness_curve
from eigenfast.edges.options import EdgeOptions
from eigenfast.edges.stability import edge_iou, mean_pairwise_iou, percentile_interval
from eigenfast.errors import ArgumentError

from conftest import make_data, make_model

OPTIONS = EdgeOptions(batch_size=4, target_sparsity=0.8, progress=False)


def test_iou_by_hand():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert edge_iou(a, a) == 1.0 and edge_iou(a, b) == pytest.approx(1 / 3)
    assert edge_iou(torch.zeros(4), torch.zeros(4)) == 1.0
    assert mean_pairwise_iou([a, a, a]) == 1.0  # identical circuits agree fully
    assert mean_pairwise_iou([a, a, b]) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    with pytest.raises(ArgumentError, match="at least two circuits"):
        mean_pairwise_iou([a])
    assert percentile_interval([0.0, 1.0, 2.0, 3.0, 4.0], level=0.5) == pytest.approx((1.0, 3.0))


@pytest.fixture(scope="module")
def setup():
    return make_model("gpt2"), make_data(n=8, seed=0), make_data(n=8, seed=1)


def test_resamples_zero_is_the_plain_evaluation(setup):
    model, clean, corrupted = setup
    report = evaluate_faithfulness(model, clean, corrupted, "eap", OPTIONS)
    assert report.stability is None and report.row().endswith("-")
    today = run(model, clean, corrupted, "eap", OPTIONS)
    assert torch.equal(report.circuit.kept, today.kept) and torch.equal(report.circuit.scores, today.scores)
    task = prepare(model, clean, corrupted, OPTIONS.batch_size)
    curve = faithfulness_curve(task, today.scores, "EAP")
    assert report.cpr == curve.cpr and report.cmd == curve.cmd and report.curve.faithfulness == curve.faithfulness


def test_each_resample_is_the_method_on_its_draw(setup):
    model, clean, corrupted = setup
    report = evaluate_faithfulness(model, clean, corrupted, "eap", OPTIONS, resamples=3, seed=5)
    s = report.stability
    assert s.resamples == 3 and len(s.cpr) == len(s.cmd) == 3
    assert s.cpr_interval[0] <= s.cpr_interval[1] and s.cmd_interval[0] <= s.cmd_interval[1]
    # Redo the draws by hand: the same generator, EAP on each sample, the curve on the whole task.
    task = prepare(model, clean, corrupted, OPTIONS.batch_size)
    generator = torch.Generator().manual_seed(5)
    circuits = []
    for i in range(3):
        pick = torch.randint(len(clean), (len(clean),), generator=generator)
        circuit = run(model, clean.subset(pick), corrupted.subset(pick), "eap", OPTIONS)
        assert s.cpr[i] == pytest.approx(faithfulness_curve(task, circuit.scores).cpr, abs=1e-9)
        circuits.append(circuit.kept)
    assert s.iou == pytest.approx(mean_pairwise_iou(circuits))
    assert s.iou < 1.0  # 8 examples: the circuits do depend on the draw
    assert min(s.cpr) <= s.cpr_interval[0] <= s.cpr_interval[1] <= max(s.cpr)


def test_resamples_are_checked_before_any_work(setup):
    model, clean, corrupted = setup
    for bad in (1, -1, 2.5, True):
        with pytest.raises(ArgumentError, match="resamples must be 0"):
            evaluate_faithfulness(model, clean, corrupted, "eap", OPTIONS, resamples=bad)
