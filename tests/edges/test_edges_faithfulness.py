"""MIB-style faithfulness: CPR/CMD areas by hand, circuits from scores by hand, curve points against the naive forward."""
from __future__ import annotations

import pytest
import torch

from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.edges import EdgeGraph
from eigenfast.edges.benchmark import evaluate_faithfulness
from eigenfast.edges.evaluate import prepare
from eigenfast.edges.faithfulness import FRACTIONS, areas, circuit_sizes, faithfulness_curve, metric_values
from eigenfast.edges.options import EdgeOptions
from eigenfast.edges.selection import greedy, prune_dangling, select, top_n
from eigenfast.errors import ArgumentError, DataError

from conftest import make_data, make_model
from edges_reference import naive_masked_logits
from hook_references import logits as model_logits


def test_areas_of_hand_made_curves():
    # Trapezoids on a linear axis: 0.4·(0+1)/2 + 0.5·(1+1)/2 = 0.7; |1−f|: 0.4·(1+0)/2 + 0 = 0.2.
    assert areas([0.1, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx((0.7, 0.2))
    # Overshooting counts in CMD: f = 2 → 0 over [0, 1]: CPR 1, CMD (1 + 1)/2 = 1.
    assert areas([0.0, 1.0], [2.0, 0.0]) == pytest.approx((1.0, 1.0))
    # A perfect curve over MIB's sizes (0.1%..100%) covers 0.999 with CMD 0.
    assert areas(FRACTIONS, [1.0] * len(FRACTIONS)) == pytest.approx((0.999, 0.0))
    assert areas(FRACTIONS, [0.0] * len(FRACTIONS)) == pytest.approx((0.0, 0.999))
    with pytest.raises(ArgumentError, match="one faithfulness per circuit size"):
        areas([0.1, 1.0], [1.0])


def test_circuit_sizes_floor_like_mib():
    assert circuit_sizes(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert circuit_sizes(262) == [0, 0, 1, 2, 5, 13, 26, 52, 131, 262]
    # GPT-2 small: MIB counts 32491 edges; the eigenfast graph has the same number.
    assert EdgeGraph(12, 12, 12, False).n_edges == 32491


def _flags(graph, names):
    index = {name: i for i, name in enumerate(graph.edge_names)}
    kept = torch.zeros(graph.n_edges, dtype=torch.bool)
    kept[[index[n] for n in names]] = True
    return kept


def _names(graph, kept):
    return {name for name, k in zip(graph.edge_names, kept.tolist()) if k}


def test_prune_dangling_by_hand():
    graph = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=1, parallel=False)
    # A head read by nothing, and a head with no input, both go; a path from the input to the logits stays.
    path = [("emb", "L0.H0.q"), ("L0.H0", "logits")]
    kept = _flags(graph, path + [("emb", "L0.H1.q"), ("L1.H0", "logits")])
    assert _names(graph, prune_dangling(graph, kept)) == set(path)
    # Removal cascades: L0.H1's only reader is L1.MLP, which reaches nothing.
    kept = _flags(graph, [("emb", "L0.H1.q"), ("L0.H1", "L1.MLP")])
    assert not prune_dangling(graph, kept).any()
    # GQA: the one KV head of layer 1 feeds both query heads, so its k input keeps L1.H1 alive.
    kept = _flags(graph, [("emb", "L1.H0.k"), ("L1.H1", "logits")])
    assert _names(graph, prune_dangling(graph, kept)) == {("emb", "L1.H0.k"), ("L1.H1", "logits")}


def test_top_n_and_greedy_by_hand():
    graph = EdgeGraph(n_layers=1, n_heads=2, n_kv_heads=2, parallel=False)
    scores = torch.zeros(graph.n_edges)
    index = {name: i for i, name in enumerate(graph.edge_names)}
    for name, s in {("emb", "L0.H1.q"): 9.0, ("L0.H1", "L0.MLP"): -8.0, ("emb", "L0.H0.v"): 7.0,
                    ("L0.MLP", "logits"): 1.0, ("L0.H0", "logits"): 0.5, ("emb", "logits"): -0.25}.items():
        scores[index[name]] = s
    # top-3 by |score| is emb→H1.q, H1→MLP, emb→H0.v: the MLP reaches no reader, H0 nothing: all dangle.
    assert not top_n(graph, scores, 3).any()
    # Greedy starts at the logits: MLP→logits (1.0), then the MLP's inputs join: H1→MLP (8) ; then H1's: emb→H1.q (9).
    assert _names(graph, greedy(graph, scores, 3)) == {("L0.MLP", "logits"), ("L0.H1", "L0.MLP"), ("emb", "L0.H1.q")}
    # The 4th edge: the best candidate left is H0→logits (0.5), whose inputs are not in yet, so H0 dangles.
    assert _names(graph, greedy(graph, scores, 4)) == _names(graph, greedy(graph, scores, 3))
    # ...until the 5th takes emb→H0.v (7, now a candidate).
    assert ("emb", "L0.H0.v") in _names(graph, greedy(graph, scores, 5))
    assert select(graph, scores, graph.n_edges, "top_n").all() and select(graph, scores, graph.n_edges, "greedy").all()
    with pytest.raises(ArgumentError, match="unknown selection"):
        select(graph, scores, 1, "best")
    with pytest.raises(ArgumentError, match="one score per edge"):
        top_n(graph, scores[:-1], 1)
    with pytest.raises(ArgumentError, match="choose 0 to"):
        greedy(graph, scores, graph.n_edges + 1)


def test_signed_rankings_put_edges_against_the_answer_last():
    graph = EdgeGraph(n_layers=1, n_heads=1, n_kv_heads=1, parallel=False)
    index = {name: i for i, name in enumerate(graph.edge_names)}
    scores = torch.zeros(graph.n_edges)
    # emb→logits helps a little (0.5); emb→H0.v→logits hurts a lot (−9, −8).
    for name, s in {("emb", "logits"): 0.5, ("emb", "L0.H0.v"): -9.0, ("L0.H0", "logits"): -8.0}.items():
        scores[index[name]] = s
    by_magnitude = {("emb", "L0.H0.v"), ("L0.H0", "logits")}
    assert _names(graph, top_n(graph, scores, 2)) == by_magnitude
    assert _names(graph, top_n(graph, scores, 2, absolute=False)) == {("emb", "logits")}  # the rest score 0 or less
    assert _names(graph, top_n(graph, scores, 1, absolute=False)) == {("emb", "logits")}
    # Greedy from the logits: by |score| H0→logits (8) first, then H0's input emb→H0.v (9); signed: emb→logits.
    assert _names(graph, greedy(graph, scores, 2)) == by_magnitude
    assert _names(graph, greedy(graph, scores, 1, absolute=False)) == {("emb", "logits")}
    assert _names(graph, select(graph, -scores, 2, "greedy", absolute=False)) == by_magnitude


def _mean(logits, clean, corrupted, metric):
    return float(metric_values(logits, clean.labels, corrupted.labels, metric).mean())


@pytest.mark.parametrize("selection,metric", [("top_n", "logit_diff"), ("greedy", "prob")])
def test_curve_points_equal_the_naive_masked_forward(selection, metric):
    model = make_model("gpt2")
    clean, corrupted = make_data(n=6, seed=0), make_data(n=6, seed=1)
    task = prepare(model, clean, corrupted, batch_size=4)  # two batches
    scores = torch.randn(task.graph.n_edges, generator=torch.Generator().manual_seed(0))
    fractions = (0.01, 0.05, 0.2, 0.5, 1.0)
    curve = faithfulness_curve(task, scores, "random", selection, metric, fractions)
    full = _mean(model_logits(model, clean)[:, -1], clean, corrupted, metric)
    empty = _mean(model_logits(model, corrupted)[:, -1], clean, corrupted, metric)
    assert curve.full == pytest.approx(full, rel=1e-5) and curve.empty == pytest.approx(empty, rel=1e-5)
    sizes = circuit_sizes(task.graph.n_edges, fractions)
    # CPR's curve ranks the scores as they are, CMD's their magnitudes (MIB's abs-False and abs-True runs).
    for absolute, values, counts in ((False, curve.faithfulness, curve.edges),
                                     (True, curve.faithfulness_abs, curve.edges_abs)):
        for n, f, kept_count in zip(sizes, values, counts):
            kept = select(task.graph, scores, n, selection, absolute)
            assert int(kept.sum()) == kept_count
            m = _mean(naive_masked_logits(model, clean, corrupted, kept.float()), clean, corrupted, metric)
            assert f == pytest.approx((m - empty) / (full - empty), abs=1e-4)
    assert curve.faithfulness != curve.faithfulness_abs  # random signs: different circuits
    assert curve.cpr == pytest.approx(areas(fractions, curve.faithfulness)[0])
    assert curve.cmd == pytest.approx(areas(fractions, curve.faithfulness_abs)[1])
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)  # the full graph
    zero = faithfulness_curve(task, scores, fractions=(0.001, 1.0))  # 0.1% of 110 edges is no edge
    assert zero.edges[0] == 0 and zero.faithfulness[0] == pytest.approx(0.0, abs=1e-5)


def test_scores_never_negative_give_one_curve_each_circuit_evaluated_once(monkeypatch):
    model = make_model("gpt2")
    task = prepare(model, make_data(n=4, seed=0), make_data(n=4, seed=1), batch_size=4)
    scores = torch.rand(task.graph.n_edges, generator=torch.Generator().manual_seed(0))
    fractions = (0.01, 0.05, 0.2, 1.0)
    forwards = []
    original = task.forward.logits
    monkeypatch.setattr(task.forward, "logits", lambda batch, kept, *a, **k: forwards.append(1) or
                        original(batch, kept, *a, **k))
    curve = faithfulness_curve(task, scores, fractions=fractions)
    assert curve.faithfulness == curve.faithfulness_abs and curve.edges == curve.edges_abs
    distinct = {select(task.graph, scores, n).numpy().tobytes() for n in circuit_sizes(task.graph.n_edges, fractions)}
    assert len(forwards) == len(distinct) >= 2  # one batch: one forward per distinct circuit


def test_a_model_that_favours_the_counterfactual_answers_is_named(caplog):
    model = make_model("gpt2")
    clean, corrupted = make_data(n=4, seed=0), make_data(n=4, seed=1)
    curve = faithfulness_curve(prepare(model, clean, corrupted, batch_size=4), torch.ones(110), fractions=(0.5, 1.0))
    if curve.full < curve.empty:  # swapping the answers (not the inputs) flips the sign of both metrics' difference
        clean.labels, corrupted.labels = corrupted.labels, clean.labels
    caplog.clear()
    with caplog.at_level("WARNING", logger="eigenfast.edges.faithfulness"):
        faithfulness_curve(prepare(model, clean, corrupted, batch_size=4), torch.ones(110), fractions=(0.5, 1.0))
        assert not caplog.records
        clean.labels, corrupted.labels = corrupted.labels, clean.labels
        faithfulness_curve(prepare(model, clean, corrupted, batch_size=4), torch.ones(110), fractions=(0.5, 1.0))
    assert len(caplog.records) == 1 and "does not favour the clean answers" in caplog.text


def test_a_counterfactual_that_changes_nothing_is_refused():
    model = make_model("gpt2")
    data = make_data(n=4)
    task = prepare(model, data, data, batch_size=4)
    with pytest.raises(DataError, match="faithfulness .* is undefined"):
        faithfulness_curve(task, torch.ones(task.graph.n_edges))


def test_eap_on_the_synthetic_task_is_faithful():
    task = synthetic_task()
    corrupted = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
    report = evaluate_faithfulness(task.model, task.val_data, corrupted, "eap", EdgeOptions(progress=False))
    # Three true heads: a handful of edges carries the task, so the curve reaches ~1 early.
    assert report.cpr > 0.9 and report.cmd < 0.1 and report.stability is None
    assert report.curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ArgumentError, match="unknown metric"):
        evaluate_faithfulness(task.model, task.val_data, corrupted, "eap", metric="kl")
