"""Pruned and extracted models compose: prune→extract and extract→prune keep their equivalences
(extracted == hook-ablated, pruned == frozen-term reference). prune→prune is in test_prune.py."""
from __future__ import annotations

import torch

import eigenfast
from eigenfast.adapters import get_adapter
from eigenfast.circuit import ablated, component_means, extract_circuit
from eigenfast.rewrite.position_tables import TokenBiasLinear

from conftest import make_data, make_model
from hook_references import assert_equals_hook_based_frozen_forward, logits, removed


def _extract(model, threshold: float = 5e-3):
    patch, val = make_data(n=8, seed=1, padded=True), make_data(n=8, seed=2, padded=True)
    result = extract_circuit(model, patch, val, threshold=threshold, include_mlps=True, progress=False, latency_repeats=0)
    return result, patch, val


def test_extracting_a_pruned_model_matches_hook_ablation(family):
    model = make_model(family)
    data = make_data(padded=True)
    pruned = eigenfast.prune(model, data, p=0.2, components=get_adapter(model).components()).model
    result, patch, val = _extract(pruned)
    adapter = get_adapter(model)
    removed = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in result.heads]
    assert removed, "this threshold should remove some heads"
    gone_mlps = [l for l in range(adapter.n_layers) if l not in result.mlps]
    means = component_means(pruned, patch)
    with ablated(pruned, removed, gone_mlps, means):
        reference = logits(pruned, val)
    torch.testing.assert_close(logits(result.model, val), reference, rtol=0, atol=1e-4)


def test_pruning_an_extracted_model_matches_the_frozen_term_reference(config_name):
    model = make_model(config_name)
    # Layer 0 keeps 2 of 4 heads (uneven GQA groups on Llama), layer 1 loses its attention and its MLP.
    extracted = removed(model, make_data(n=8, seed=1, padded=True), heads={0: [0, 2], 1: [0, 1, 2, 3]}, mlps=(1,))
    data = make_data(padded=True, seed=4)
    components = get_adapter(model).components()
    result = eigenfast.prune(extracted, data, p=0.3, components=components)
    assert any(isinstance(m, TokenBiasLinear) for m in result.model.modules())
    assert_equals_hook_based_frozen_forward(extracted, result, data)
