"""The masked forward against the unmasked model, the corrupted run and a hook-per-edge reference."""
from __future__ import annotations

import pytest
import torch

from eigenfast.edges.masked_forward import EdgeForward

from conftest import make_data, make_model
from edges_reference import naive_masked_logits


def _pair(padded: bool = False):
    return make_data(5, 5, seed=0, padded=padded), make_data(5, 5, seed=1, padded=padded)


@pytest.mark.parametrize("padded", [False, True])
def test_all_ones_is_the_model_and_all_zeros_the_corrupted_run(family, padded):
    model = make_model(family)
    clean, corrupted = _pair(padded)
    if padded:
        corrupted.attention_mask = clean.attention_mask
    forward = EdgeForward(model)
    prepared = forward.prepare(clean, corrupted)
    n = forward.graph.n_edges
    with torch.no_grad():
        torch.testing.assert_close(forward.logits(prepared, torch.ones(n)), prepared.clean.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(forward.logits(prepared, torch.zeros(n)), forward.context(corrupted).logits,
                                   atol=1e-5, rtol=1e-5)
        # Node masks of 0 switch a writer off on every edge.
        assert torch.allclose(forward.logits(prepared, torch.ones(n), torch.zeros(forward.graph.n_writers)),
                              forward.context(corrupted).logits, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "phi", "mistral"])
def test_random_masks_match_the_hook_per_edge_reference(name):
    model = make_model(name)
    clean, corrupted = _pair()
    forward = EdgeForward(model)
    edges = torch.rand(forward.graph.n_edges, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = forward.logits(forward.prepare(clean, corrupted), edges)
    slow = naive_masked_logits(model, clean, corrupted, edges)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, forward.context(clean).logits, atol=1e-3)  # the masks did something
    # A writer's node mask scales every edge out of it (z̃ = z_edge · z_node).
    nodes = torch.rand(forward.graph.n_writers, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = forward.logits(forward.prepare(clean, corrupted), edges, nodes)
    slow = naive_masked_logits(model, clean, corrupted, edges * nodes[forward.graph.edge_writers])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_graph_counts_and_names():
    forward = EdgeForward(make_model("llama"))  # GQA: 4 query heads, 2 KV heads, 2 layers
    graph = forward.graph
    # layer 0 reads emb (1 writer) with 4 + 2 + 2 readers, MLP reads emb + 4 heads; layer 1 reads 6 writers.
    assert graph.n_edges == 8 * 1 + 5 + 8 * 6 + 10 + 11
    assert len(graph.edge_names) == graph.n_edges
    assert ("L0.H3", "L1.H1.k") in graph.edge_names and ("L0.MLP", "logits") in graph.edge_names
    assert ("L1.H0", "L1.MLP") in graph.edge_names
    parallel = EdgeForward(make_model("phi")).graph
    assert ("L1.H0", "L1.MLP") not in parallel.edge_names  # a parallel block's MLP does not read its own heads


def test_mismatched_corrupted_data_is_refused():
    forward = EdgeForward(make_model("gpt2"))
    with pytest.raises(ValueError, match="same length and padding"):
        forward.prepare(make_data(5, 5), make_data(5, 4))
    with pytest.raises(ValueError, match="shape"):
        forward.logits(forward.prepare(*_pair()), torch.ones(3))
