"""positions="mean" removal: removed components' means over every token, in ordinary biases and constants."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.circuit.options import CircuitOptions
from eigenfast.errors import ArgumentError, UnsupportedModelError
from eigenfast.rewrite.position_tables import PositionTable
from eigenfast.rewrite.stand_ins import ConstantOutput

from conftest import make_data, make_model
from hook_references import HEADS, extracted, logits, removed


@pytest.mark.parametrize("mlps", [(), (0,)])
def test_mean_removal_equals_hook_ablation_with_all_token_means(family, mlps):
    model, data = make_model(family), make_data(padded=True)
    smaller, reference = extracted(model, data, HEADS, mlps, positions="mean")
    assert not any(isinstance(m, PositionTable) for m in smaller.modules())
    torch.testing.assert_close(logits(smaller, data), reference, rtol=1e-5, atol=1e-5)
    if mlps:
        assert isinstance(smaller.get_submodule(_mlp_path(family, 0)), ConstantOutput)


def _mlp_path(family: str, layer: int) -> str:
    return {"gpt2": f"transformer.h.{layer}.mlp", "neox": f"gpt_neox.layers.{layer}.mlp"}.get(
        family, f"model.layers.{layer}.mlp")


def test_removing_nothing_changes_nothing(family):
    # Not bit-equal: the positional forward removal installs may order a fused projection's ops differently.
    model, data = make_model(family), make_data()
    smaller = removed(model, data, {}, (), positions="mean")
    assert smaller.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(logits(smaller, data), logits(model, data), rtol=0, atol=1e-6)


def test_zero_ablation_ignores_positions(family):
    model, data = make_model(family), make_data()
    a = removed(model, data, HEADS, (0,), ablation="zero", positions="mean")
    b = removed(model, data, HEADS, (0,), ablation="zero")
    assert torch.equal(logits(a, data), logits(b, data))


def test_extract_circuit_and_extract_nodes_take_positions_mean():
    model, data = make_model("llama"), make_data(padded=True)
    circuit = eigenfast.extract_circuit(model, data, data, threshold=0.05, progress=False, latency_repeats=0,
                                        positions="mean")
    assert not any(isinstance(m, PositionTable) for m in circuit.model.modules())
    kept = {(layer, head) for layer, head in circuit.heads}
    heads = {layer: [h for h in range(4) if (layer, h) not in kept] for layer in range(2)}
    smaller, reference = extracted(model, data, {k: v for k, v in heads.items() if v}, (), positions="mean")
    torch.testing.assert_close(logits(circuit.model, data), reference, rtol=1e-5, atol=1e-5)
    nodes = eigenfast.edges.extract_nodes(model, circuit, data, positions="mean")
    assert torch.equal(logits(nodes.model, data), logits(smaller, data))


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_an_output_projection_without_a_possible_bias_is_refused_before_any_work(name):
    model, data = make_model(name), make_data()
    with pytest.raises(UnsupportedModelError, match="positions='indexed'"):
        eigenfast.extract_circuit(model, data, data, progress=False, latency_repeats=0, positions="mean")
    with pytest.raises(UnsupportedModelError, match="positions='indexed'"):
        eigenfast.edges.extract_nodes(model, type("C", (), {"heads": [], "mlps": []})(), data, positions="mean")


def test_bad_positions_are_refused_by_every_entry_point():
    model, data = make_model("gpt2"), make_data()
    with pytest.raises(ArgumentError, match="positions must be one of"):
        CircuitOptions(0.1, positions="average")
    with pytest.raises(ArgumentError, match="positions must be one of"):
        eigenfast.edges.extract_nodes(model, type("C", (), {"heads": [], "mlps": []})(), data, positions="average")
    with pytest.raises(ArgumentError, match="positions must be one of"):
        removed(model, data, HEADS, (), positions="average")
