"""Edge Pruning warm-started from EAP-IG-inputs: the same as computing the scores and passing them by hand."""
from __future__ import annotations

from dataclasses import replace

import torch

from eigenfast.edges import EdgeOptions, run
from eigenfast.edges.eap_ig import integrated_attributions
from eigenfast.edges.evaluate import prepare

from conftest import make_data, make_model


def test_warm_start_is_edge_pruning_from_eap_ig_inputs_scores():
    model = make_model("llama")
    clean, corrupted = make_data(4, 5, seed=0), make_data(4, 5, seed=1)
    options = EdgeOptions(batch_size=2, target_sparsity=0.7, steps=6, ig_steps=3, progress=False, evaluate=False)
    warm = run(model, clean, corrupted, "edge_prune_warm", options)
    task = prepare(model, clean, corrupted, 2)
    scores = integrated_attributions(task.forward, task.batches, "ig-inputs", 3).abs().float()
    by_hand = run(model, clean, corrupted, "edge_prune", replace(options, init_scores=scores))
    cold = run(model, clean, corrupted, "edge_prune", options)
    assert torch.equal(warm.kept, by_hand.kept)
    torch.testing.assert_close(warm.scores, by_hand.scores)
    assert not torch.equal(warm.scores, cold.scores)  # the start matters after 6 steps
