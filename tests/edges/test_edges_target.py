"""Targets as the default: faithfulness as MIB defines it, the smallest circuit that reaches it, and every method's
defaults on circuits known by construction."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_data, make_model
from edges_reference import naive_masked_logits

import eigenfast
from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.edges import EdgeOptions, run
from eigenfast.edges.acdc import first_change, greedy, search_tau, tau_interval
from eigenfast.edges.edge_prune import search as edge_prune_search
from eigenfast.edges.evaluate import prepare
from eigenfast.edges.masked_forward import EdgeForward
from eigenfast.edges.options import SEARCH_STEPS, STEPS
from eigenfast.edges.target import Judge, smallest_top, top
from eigenfast.errors import ArgumentError, DataError


@pytest.fixture(scope="module")
def tiny():
    model = make_model("gpt2")
    clean, corrupted = make_data(6, 5, seed=0), make_data(6, 5, seed=1)
    return model, clean, corrupted, prepare(model, clean, corrupted, 3)


@pytest.fixture
def passes(monkeypatch):
    """Counts the masked forwards, with gradients (each followed by one backward) and without."""
    counted = {"grad": 0, "no_grad": 0}
    logits = EdgeForward.logits

    def counting(self, *args, **kwargs):
        counted["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return logits(self, *args, **kwargs)

    monkeypatch.setattr(EdgeForward, "logits", counting)
    return counted


def _probability(logits, labels):
    return float(torch.softmax(logits, -1)[torch.arange(len(labels)), labels].mean())


def test_faithfulness_is_mibs_normalised_metric(tiny):
    model, clean, corrupted, task = tiny
    judge = Judge(task)
    n = task.graph.n_edges
    assert judge.measure(torch.ones(n, dtype=torch.bool)) == pytest.approx((1.0, 0.0), abs=1e-5)
    assert judge.measure(torch.zeros(n, dtype=torch.bool))[0] == pytest.approx(0.0, abs=1e-5)
    kept = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        full = _probability(model(input_ids=clean.input_ids).logits[:, -1], clean.labels)
        empty = _probability(model(input_ids=corrupted.input_ids).logits[:, -1], clean.labels)
    circuit = _probability(naive_masked_logits(model, clean, corrupted, kept.float()), clean.labels)
    assert judge.measure(kept)[0] == pytest.approx((circuit - empty) / (full - empty), rel=1e-4)


def test_the_smallest_top_circuit_reaches_the_target_and_one_edge_fewer_does_not(tiny):
    _, _, _, task = tiny
    scores = torch.rand(task.graph.n_edges, generator=torch.Generator().manual_seed(1))
    judge = Judge(task)
    for options in (EdgeOptions(faithfulness=0.8), EdgeOptions(kl=0.01)):
        found = smallest_top(task, scores, options)
        n = int(found.kept.sum())
        assert torch.equal(found.kept, top(scores, n)) and 0 < n < len(scores)
        assert judge.reaches(top(scores, n), options) and not judge.reaches(top(scores, n - 1), options)
        assert len(found.trace) <= len(scores).bit_length()  # a bisection, not a scan


def test_a_target_the_data_cannot_define_is_refused_before_the_search(tiny):
    model, clean, _, _ = tiny
    with pytest.raises(DataError, match="kl="):
        eigenfast.acdc(model, clean, clean, progress=False)
    with pytest.raises(ArgumentError, match="init_scores has 3 entries"):
        eigenfast.edge_prune(model, clean, clean, init_scores=torch.ones(3), target_sparsity=0.5, progress=False)


def test_explicit_knobs_keep_their_meaning(tiny):
    model, clean, corrupted, task = tiny
    circuit = eigenfast.eap(model, clean, corrupted, target_sparsity=0.75, progress=False, evaluate=False)
    assert int(circuit.kept.sum()) == round(0.25 * task.graph.n_edges)


def test_edge_pruning_steps_default_to_300_at_a_knob_and_100_per_search_run(tiny, passes):
    model, clean, corrupted, _ = tiny
    circuit = eigenfast.edge_prune(model, clean, corrupted, target_sparsity=0.5, progress=False, evaluate=False)
    assert len(circuit.trace) == STEPS == 300 and passes == {"grad": 300, "no_grad": 0}
    passes.update(grad=0)
    found = edge_prune_search(prepare(model, clean, corrupted, 3), EdgeOptions(search_runs=1, progress=False))
    # one batch per step, the two batches of 3 examples taking turns; the run judged on both
    assert len(found.trace) == 1 and passes == {"grad": SEARCH_STEPS, "no_grad": 2}


def test_acdc_search_resumes_runs_exactly_and_evaluates_fewer_edges(tiny, passes):
    _, _, _, task = tiny
    options = EdgeOptions(faithfulness=0.9, search_runs=5, progress=False)
    found = search_tau(task, options)
    probes = found.trace
    best = max(p["knob"] for p in probes if p["reached"])
    scratch = greedy(task, replace(options, faithfulness=None, threshold=best))
    # the reference: a run from scratch at the chosen τ gives the same circuit and scores as the resumed one
    assert torch.equal(found.kept, scratch.kept) and torch.equal(found.scores, scratch.scores)
    n_edges, n_batches = task.graph.n_edges, len(task.batches)
    evaluated = sum(p["evaluated"] for p in probes)
    assert probes[0]["evaluated"] == n_edges and evaluated < len(probes) * n_edges
    # each evaluated edge is one masked forward per batch; judging a probe one more (and the scratch run its own)
    assert passes == {"grad": 0, "no_grad": (evaluated + len(probes) + n_edges) * n_batches}


def test_a_tau_inside_a_runs_interval_gives_the_same_run_and_outside_it_another(tiny):
    _, _, _, task = tiny
    run = greedy(task, EdgeOptions(threshold=0.002, progress=False))
    low, high = tau_interval(run.trace)
    assert 0 < low < 0.002 <= high < 1
    assert first_change(run.trace, high) == first_change(run.trace, low + 1e-12) == len(run.trace)
    assert first_change(run.trace, low) < len(run.trace)
    same = greedy(task, EdgeOptions(threshold=high, progress=False))  # the interval's top end
    assert torch.equal(same.kept, run.kept) and same.trace == run.trace
    tau = high * 1.000001  # just past it: the kept edge whose KL increase was ``high`` goes
    changed = first_change(run.trace, tau)
    resumed = greedy(task, EdgeOptions(threshold=tau, progress=False), run)
    scratch = greedy(task, EdgeOptions(threshold=tau, progress=False))
    assert changed < len(run.trace) and resumed.trace[:changed] == run.trace[:changed]
    assert resumed.trace == scratch.trace and torch.equal(resumed.kept, scratch.kept)
    assert not torch.equal(scratch.kept, run.kept)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def synthetic(request):
    task = synthetic_task(request.param)
    return task, task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))


@pytest.mark.parametrize("method", ["eap", "eap_ig_inputs", "eap_ig_activations", "ensemble", "edge_prune", "acdc"])
def test_every_method_finds_the_true_heads_with_its_defaults(synthetic, method, passes):
    task, corrupted = synthetic
    circuit = run(task.model, task.val_data, corrupted, method, EdgeOptions(progress=False, evaluate=False))
    report = eigenfast.edges.evaluate_circuit(task.model, circuit, task.val_data, corrupted, true_heads=task.true_heads)
    assert set(circuit.heads) == set(task.true_heads), (method, circuit.heads)
    assert report.fpr <= 0.25 and report.edges_kept < report.n_edges, (method, report)
    runs = len(circuit.trace)  # the search's probes; the 16 examples are one batch
    if method == "edge_prune":  # search_runs runs of 100 forward+backward passes, each run judged by one forward
        assert runs == 6 and passes["grad"] == 6 * SEARCH_STEPS and passes["no_grad"] == 6 + 1  # + the evaluation
    if method == "acdc":
        evaluated = sum(p["evaluated"] for p in circuit.trace)
        assert runs <= 6 and evaluated < runs * report.n_edges
        assert passes == {"grad": 0, "no_grad": evaluated + runs + 1}
