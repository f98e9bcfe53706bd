"""Edge Pruning, EAP and ACDC against their formulas, finite differences, a literal loop and a known circuit."""
from __future__ import annotations

import math

import pytest
import torch

import eigenfast
from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.edges import hard_concrete
from eigenfast.edges.eap import edge_attributions
from eigenfast.edges.edge_prune import round_masks
from eigenfast.edges.evaluate import prepare_batches
from eigenfast.edges.masked_forward import EdgeForward
from eigenfast.runtime.metrics import kl_divergence

from conftest import make_data, make_model
from edges_reference import naive_eap, naive_masked_logits


@pytest.fixture(scope="module")
def task():
    task = synthetic_task()
    corrupted = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
    return task, corrupted


def test_hard_concrete_sampler_matches_its_formula_and_distribution():
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    z = hard_concrete.sample(log_alpha, torch.Generator().manual_seed(0))
    u = torch.rand(3, generator=torch.Generator().manual_seed(0)) * (1 - 2e-6) + 1e-6
    s = 1 / (1 + torch.exp(-(torch.log(u / (1 - u)) + log_alpha) / (2 / 3)))
    torch.testing.assert_close(z, torch.clamp(s * 1.2 - 0.1, 0, 1))
    many = hard_concrete.sample(log_alpha.repeat(200_000, 1), torch.Generator().manual_seed(1))
    # P(z > 0) = σ(log α − β log(−l/r)), checked against the samples
    expected = torch.sigmoid(log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    torch.testing.assert_close((many > 0).float().mean(0), expected, atol=5e-3, rtol=0)
    torch.testing.assert_close(hard_concrete.probability_nonzero(log_alpha), expected)
    assert hard_concrete.expected(torch.tensor([0.0, 10.0, -10.0])).tolist() == pytest.approx([0.5, 1.0, 0.0])


def test_lagrangian_matches_its_formula_and_lambda_ascends():
    l1, l2 = torch.tensor(0.3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    value = hard_concrete.lagrangian(0.9, torch.tensor(0.5), l1, l2)
    assert value.item() == pytest.approx(0.3 * 0.4 + 2.0 * 0.16)
    value.backward()
    assert float(l1.grad) == pytest.approx(0.4) and float(l2.grad) == pytest.approx(0.16)  # ascent raises both


def test_rounding_keeps_the_mask_mean():
    masks = torch.tensor([1.0, 0.9, 0.0, 0.2, 0.0, 0.3])  # mean 0.4 of 6 → keep 2
    kept = round_masks(masks, masks)
    assert kept.tolist() == [True, True, False, False, False, False]


def test_eap_matches_its_formula_on_every_family(family):
    model = make_model(family)
    clean, corrupted = make_data(4, 5, seed=0), make_data(4, 5, seed=1)
    forward = EdgeForward(model)
    fast = edge_attributions(forward, prepare_batches(forward, clean, corrupted, 2))
    torch.testing.assert_close(fast.float(), naive_eap(model, clean, corrupted), atol=1e-6, rtol=1e-4)
    assert fast.abs().max() > 1e-3


def test_eap_equals_finite_differences_of_the_reference_forward():
    # GPT-2 runs wholly in float64 here (other families keep norms or softmax in float32).
    model = make_model("gpt2").double()
    clean, corrupted = make_data(4, 5, seed=0), make_data(4, 5, seed=1)
    forward = EdgeForward(model)
    attributions = edge_attributions(forward, prepare_batches(forward, clean, corrupted, 4))
    n, h = forward.graph.n_edges, 1e-4
    for edge in (0, n // 3, n - 5, n - 1):
        values = []
        for z in (1 + h, 1 - h):
            edges = torch.ones(n, dtype=torch.float64)
            edges[edge] = z
            logits = naive_masked_logits(model, clean, corrupted, edges)
            values.append(float(torch.nn.functional.cross_entropy(logits, clean.labels)))
        derivative = (values[0] - values[1]) / (2 * h)
        assert float(attributions[edge]) == pytest.approx(-derivative, rel=1e-4, abs=1e-8)


def test_acdc_equals_a_literal_loop():
    model = make_model("gpt2")
    clean, corrupted = make_data(6, 5, seed=0), make_data(6, 5, seed=1)
    threshold = 0.002
    fast = eigenfast.acdc(model, clean, corrupted, threshold=threshold, batch_size=4, progress=False, evaluate=False)

    forward = EdgeForward(model)
    batches = prepare_batches(forward, clean, corrupted, 6)
    edges, kl = torch.ones(forward.graph.n_edges), 0.0
    for edge in reversed(range(forward.graph.n_edges)):  # the flat order is topological
        edges[edge] = 0.0
        with torch.no_grad():
            logits = forward.logits(batches[0], edges)
        new = float(kl_divergence(torch.log_softmax(batches[0].clean.logits, -1), logits).mean())
        if new - kl < threshold:
            kl = new
        else:
            edges[edge] = 1.0
    assert fast.kept.tolist() == edges.bool().tolist()
    assert 0 < int(fast.kept.sum()) < forward.graph.n_edges


def test_every_method_finds_the_true_heads(task):
    task, corrupted = task
    truth = set(task.true_heads)
    circuits = [
        eigenfast.edge_prune(task.model, task.val_data, corrupted, target_sparsity=0.6, steps=80, lambda_lr=0.1,
                             progress=False),
        eigenfast.eap(task.model, task.val_data, corrupted, target_sparsity=0.8, progress=False),
        eigenfast.acdc(task.model, task.val_data, corrupted, threshold=1e-4, progress=False),
    ]
    for circuit in circuits:
        assert set(circuit.heads) == truth, circuit.method
        assert circuit.report.edges_kept == len(circuit.edges) < circuit.graph.n_edges
        report = eigenfast.edges.evaluate_circuit(task.model, circuit, task.val_data, corrupted,
                                                  true_heads=task.true_heads)
        assert report.fpr < 0.05 and report.auc > 0.85, (circuit.method, report)


def test_edge_pruning_trace_and_sparsity(task):
    task, corrupted = task
    circuit = eigenfast.edge_prune(task.model, task.val_data, corrupted, target_sparsity=0.5, steps=30, ramp=0.5,
                                   progress=False, evaluate=False)
    assert len(circuit.kl_trace) == 30 and circuit.trace[-1]["target"] == pytest.approx(0.5)
    assert circuit.trace[-1]["sparsity"] > circuit.trace[0]["sparsity"]
    assert all(w in circuit.graph.writer_names for w, _ in circuit.edges)


@pytest.mark.parametrize("method", ["edge_prune", "eap", "acdc"])
def test_methods_run_on_every_family(family, method):
    model = make_model(family)
    clean, corrupted = make_data(4, 5, seed=0, padded=True), make_data(4, 5, seed=0, padded=True)
    corrupted.input_ids = torch.roll(corrupted.input_ids, 1, dims=0) * corrupted.mask
    options = {"edge_prune": dict(steps=3), "eap": dict(target_sparsity=0.5), "acdc": dict(threshold=0.01)}[method]
    circuit = getattr(eigenfast, method)(model, clean, corrupted, progress=False, **options)
    heads, mlps = circuit.graph.nodes_of(circuit.kept)
    assert circuit.heads == heads and circuit.mlps == mlps
    assert circuit.report.edges_kept == int(circuit.kept.sum())
    for writer, reader in circuit.edges:
        assert writer == "emb" or writer.split(".")[0] in {f"L{l}" for l in range(2)}
