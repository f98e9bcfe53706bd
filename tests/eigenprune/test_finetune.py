"""The fine-tuning baselines of the eigenpruning table: deterministic, training what they say they train."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.eigenprune.finetune import finetune, finetune_low_rank, matching_rank

from conftest import make_data, make_model


def test_finetune_lowers_the_training_loss_deterministically_and_leaves_the_input():
    model = make_model("gpt2")
    data = make_data(n=16, length=5, padded=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    one = finetune(model, data, lr=0.003, batch_size=4, epochs=3, seed=1)
    two = finetune(model, data, lr=0.003, batch_size=4, epochs=3, seed=1)
    assert eigenfast.evaluate(one.model, data).loss < eigenfast.evaluate(model, data).loss
    for (name, a), b in zip(one.model.named_parameters(), two.model.parameters()):
        assert torch.equal(a, b), name
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert one.trainable == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family, component", [("gpt2", "k"), ("llama", "v"), ("llama", "o")])
def test_low_rank_changes_only_the_sites_blocks_by_a_low_rank_update(family, component):
    model = make_model(family)
    data = make_data(n=12, length=5, padded=True)
    tuned = finetune_low_rank(model, data, (component,), rank=2, lr=0.01, batch_size=4, epochs=2, seed=0)
    adapter = get_adapter(model)
    size = 0
    for layer in range(adapter.n_layers):
        site = adapter.site(layer, component)
        A = projection_matrix(model.get_submodule(site.path)).detach()
        B = projection_matrix(tuned.model.get_submodule(site.path)).detach()
        rows = torch.arange(A.shape[0]) if site.in_index is None else site.in_index.flatten()
        cols = torch.arange(A.shape[1]) if site.out_index is None else site.out_index.flatten()
        inside = torch.zeros_like(A, dtype=torch.bool)
        inside[rows.unsqueeze(1), cols.unsqueeze(0)] = True
        change = B - A
        assert torch.equal(change[~inside], torch.zeros_like(change[~inside]))
        assert change.abs().max() > 0 and torch.linalg.matrix_rank(change.double(), atol=1e-6) <= 2
        size += 2 * (len(rows.unique()) + len(cols.unique()))
    assert tuned.trainable == size
    others = [(n, p) for n, p in model.named_parameters() if "weight" not in n or p.dim() < 2]
    tuned_params = dict(tuned.model.named_parameters())
    assert all(torch.equal(p, tuned_params[n]) for n, p in others)  # biases, norms, embeddings untouched
    assert eigenfast.evaluate(tuned.model, data).loss < eigenfast.evaluate(model, data).loss


def test_matching_rank_trains_about_as_many_values_as_the_frozen_terms():
    model = make_model("gpt2")  # 2 layers, 4 heads of 8 over d_model 32: a k term is 32 + 8 values, 32 terms a layer
    assert matching_rank(model, ("k",), 0.5) == round(32 * 40 / (2 * (32 + 32)))
    assert matching_rank(model, ("k",), 0.0) == 1
