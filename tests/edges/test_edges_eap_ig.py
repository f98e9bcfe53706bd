"""EAP-IG against EAP (one step), a plain float64 Riemann sum of the path integral, and its cost in passes."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import eigenfast
from eigenfast.edges.eap import edge_attributions
from eigenfast.edges.eap_ig import integrated_attributions, moving_writers
from eigenfast.edges.evaluate import prepare_batches
from eigenfast.edges.masked_forward import EdgeForward
from eigenfast.errors import ArgumentError

from conftest import make_data, make_model
from edges_reference import naive_integrated


@pytest.mark.parametrize("path", ["ig-inputs", "ig-activations"])
def test_one_step_is_eap_on_every_family(family, path):
    model = make_model(family)
    clean, corrupted = make_data(4, 5, seed=0, padded=True), make_data(4, 5, seed=1, padded=True)
    corrupted.attention_mask = clean.attention_mask
    corrupted.input_ids = corrupted.input_ids * clean.mask
    forward = EdgeForward(model)
    batches = prepare_batches(forward, clean, corrupted, 2)
    eap = edge_attributions(forward, batches)
    torch.testing.assert_close(integrated_attributions(forward, batches, path, 1), eap, atol=1e-6, rtol=1e-4)
    assert eap.abs().max() > 1e-3


def _nodes(forward: EdgeForward, path: str) -> list[set[str]]:
    names = forward.graph.writer_names
    return [{names[w] for w in writers} for writers in moving_writers(forward.graph, path)]


def test_ig_activations_equals_its_definition_written_out():
    model = make_model("gpt2").double()
    clean, corrupted = make_data(3, 5, seed=0), make_data(3, 5, seed=1)
    forward = EdgeForward(model)
    fast = integrated_attributions(forward, prepare_batches(forward, clean, corrupted, 3), "ig-activations", 3)
    reference = naive_integrated(model, clean, corrupted, _nodes(forward, "ig-activations"), [1 / 3, 2 / 3, 1.0])
    torch.testing.assert_close(fast, reference, atol=1e-10, rtol=1e-7)


def test_ig_inputs_converges_to_the_path_integral():
    model = make_model("gpt2").double()
    clean, corrupted = make_data(3, 5, seed=0), make_data(3, 5, seed=1)
    forward = EdgeForward(model)
    batches = prepare_batches(forward, clean, corrupted, 3)
    many = 64  # the midpoint rule's error is O(1/many²), far below the right Riemann sums' O(1/m)
    integral = naive_integrated(model, clean, corrupted, _nodes(forward, "ig-inputs"),
                                [(k - 0.5) / many for k in range(1, many + 1)])
    errors = [float((integrated_attributions(forward, batches, "ig-inputs", m) - integral).abs().max())
              for m in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2]
    # Right Riemann sums converge at O(1/m): m times the error settles (within a factor of 2 from m = 4 on),
    # and at m = 16 the error is a few percent of the largest score.
    assert 0.5 < (16 * errors[2]) / (4 * errors[1]) < 2.0
    assert errors[2] < 0.15 * errors[0] and errors[2] < 0.05 * float(integral.abs().max())


def test_ig_inputs_costs_at_most_m_plus_one_times_eap():
    model = make_model("llama")
    clean, corrupted = make_data(6, 5, seed=0), make_data(6, 5, seed=1)
    forward = EdgeForward(model)
    batches = prepare_batches(forward, clean, corrupted, 3)
    counts = {"forward": 0, "backward": 0}
    logits, counterfactual, grad = EdgeForward.logits, EdgeForward.counterfactual, torch.autograd.grad

    def counted_logits(self, *args, **kwargs):
        counts["forward"] += 1
        return logits(self, *args, **kwargs)

    def counted_counterfactual(self, *args, **kwargs):
        counts["forward"] += 1
        return counterfactual(self, *args, **kwargs)

    def counted_grad(*args, **kwargs):
        counts["backward"] += 1
        return grad(*args, **kwargs)

    def passes(run) -> int:
        counts.update(forward=0, backward=0)
        with mock.patch.object(EdgeForward, "logits", counted_logits), \
                mock.patch.object(EdgeForward, "counterfactual", counted_counterfactual), \
                mock.patch.object(torch.autograd, "grad", counted_grad):
            run()
        return counts["forward"] + counts["backward"]

    eap = passes(lambda: edge_attributions(forward, batches))
    assert eap == 2 * len(batches)
    for m in (1, 3, 8):
        ig = passes(lambda: integrated_attributions(forward, batches, "ig-inputs", m))
        assert ig == (2 * m + 1) * len(batches) <= (m + 1) * eap


def test_eap_keyword_picks_the_variant_and_checks_it():
    model = make_model("gpt2")
    clean, corrupted = make_data(4, 5, seed=0), make_data(4, 5, seed=1)
    circuit = eigenfast.eap(model, clean, corrupted, target_sparsity=0.5, method="ig-inputs", steps=2,
                            progress=False, evaluate=False)
    assert circuit.method == "EAP-IG-inputs" and circuit.kept.float().mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ArgumentError, match="ig-inputs"):
        eigenfast.eap(model, clean, corrupted, method="ig", progress=False)
    with pytest.raises(ArgumentError, match="ig_steps"):
        eigenfast.eap(model, clean, corrupted, method="ig-inputs", steps=0, progress=False)


@pytest.mark.parametrize("method", ["eap", "ig-inputs"])
def test_circuits_keep_the_largest_magnitudes_and_scores_keep_their_sign(method):
    model = make_model("gpt2")
    clean, corrupted = make_data(4, 5, seed=0), make_data(4, 5, seed=1)
    circuit = eigenfast.eap(model, clean, corrupted, target_sparsity=0.7, method=method, steps=2, progress=False,
                            evaluate=False)
    forward = EdgeForward(model)
    batches = prepare_batches(forward, clean, corrupted, 32)
    signed = (edge_attributions(forward, batches) if method == "eap"
              else integrated_attributions(forward, batches, method, 2)).float()
    torch.testing.assert_close(circuit.scores, signed)
    assert (circuit.scores < 0).any() and (circuit.scores > 0).any()
    kept = torch.zeros_like(circuit.kept)
    kept[torch.argsort(signed.abs(), descending=True, stable=True)[: int(round(0.3 * len(signed)))]] = True
    assert torch.equal(circuit.kept, kept)
