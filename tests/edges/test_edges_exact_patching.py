"""Exact single-edge patching against whole hook-per-edge forwards, and Spearman's coefficient by hand."""
from __future__ import annotations

import pytest
import torch

from eigenfast.edges.eap import edge_attributions
from eigenfast.edges.evaluate import prepare
from eigenfast.edges.exact_patching import exact_patching, reader_layers, spearman
from eigenfast.errors import ArgumentError

from conftest import VOCAB, make_data, make_model
from edges_reference import naive_exact_patching


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exact_patching_equals_one_naive_forward_per_edge(name):
    # float64, two batches (the mean over examples crosses them), GQA on Llama (k/v edges per KV head).
    model = make_model(name).double()
    clean, corrupted = make_data(4, 5, seed=0), make_data(4, 5, seed=1)
    task = prepare(model, clean, corrupted, 2)
    fast = exact_patching(task)
    reference = naive_exact_patching(model, clean, corrupted)
    torch.testing.assert_close(fast, reference, atol=1e-10, rtol=1e-8)
    assert fast.abs().max() > 1e-3 and (fast > 0).any() and (fast < 0).any()


def test_eap_is_the_first_order_estimate_of_exact_patching():
    # A counterfactual that differs from the clean prompt in its first token only makes every patch small,
    # where EAP's linearisation holds: its ranking then follows the exact one.
    model = make_model("gpt2").double()
    clean = make_data(4, 5, seed=0)
    corrupted = make_data(4, 5, seed=0)
    corrupted.input_ids[:, 0] = corrupted.input_ids[:, 0] % (VOCAB - 1) + 1
    task = prepare(model, clean, corrupted, 4)
    exact, eap = exact_patching(task), edge_attributions(task.forward, task.batches)
    assert spearman(exact, eap) > 0.9
    assert spearman(exact.abs(), eap.abs()) > 0.9


def test_reader_layers_follow_the_graph_groups():
    task = prepare(make_model("gpt2"), make_data(2, 4), make_data(2, 4, seed=1), 2)
    graph = task.graph
    layers = reader_layers(graph)
    assert len(layers) == graph.n_edges
    starts = [0] + torch.tensor([g.n_edges for g in graph.groups]).cumsum(0).tolist()
    for g, start, end in zip(graph.groups, starts, starts[1:]):
        assert (layers[start:end] == g.layer).all()
    assert layers[-1] == graph.n_layers  # the logits


def test_spearman_by_hand():
    # No ties: 1 − 6·Σd²/(n(n²−1)) with d = (0, 1, 1, 0): 1 − 12/60 = 0.8.
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 30, 20, 40])) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    # Ties share their mean rank: a's ranks (1.5, 1.5, 3, 4), b's (1, 2, 3, 4); Pearson of those by hand.
    ra, rb = torch.tensor([1.5, 1.5, 3, 4]), torch.tensor([1.0, 2, 3, 4])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    expected = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    assert spearman(torch.tensor([5.0, 5, 7, 9]), torch.tensor([0.1, 0.2, 0.3, 0.4])) == pytest.approx(expected)
    # Only the order matters.
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    y = x + 0.5 * torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert spearman(x, y) == pytest.approx(spearman(x.exp(), y ** 3))


def test_spearman_refuses_what_it_cannot_rank():
    with pytest.raises(ArgumentError, match="same length"):
        spearman(torch.ones(3), torch.ones(4))
    with pytest.raises(ArgumentError, match="every score"):
        spearman(torch.ones(3), torch.tensor([1.0, 2, 3]))
