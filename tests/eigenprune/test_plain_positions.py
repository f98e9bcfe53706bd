"""positions="mean": frozen terms take their mean over every token and fold into ordinary biases."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.errors import ArgumentError, UnsupportedModelError
from eigenfast.eigenprune.options import PruneOptions
from eigenfast.rewrite.position_tables import PositionTable

from conftest import make_data, make_model
from hook_references import assert_equals_hook_based_frozen_forward, logits

COMPONENTS = ("k", "o", "mlp_in", "mlp_out")


def prune_mean(model, data, p=0.3, components=COMPONENTS):
    return eigenfast.prune(model, data, p=p, components=components, progress=False, positions="mean")


@pytest.mark.parametrize("padded", [False, True])
def test_mean_pruned_model_equals_the_hook_based_all_position_mean(family, padded):
    model, data = make_model(family), make_data(padded=padded)
    result = prune_mean(model, data)
    assert sum(int(m.sum()) for m in result.frozen.values()) > 0
    assert_equals_hook_based_frozen_forward(model, result, data, over_positions=True)


def test_mean_pruned_model_keeps_every_module_class_and_holds_no_table(family):
    model = make_model(family)
    result = prune_mean(model, make_data())
    assert not any(isinstance(m, PositionTable) for m in result.model.modules())
    before = {name: type(m) for name, m in model.named_modules()}
    assert {name: type(m) for name, m in result.model.named_modules()} == before


def test_p_zero_changes_nothing(family):
    model, data = make_model(family), make_data()
    result = prune_mean(model, data, p=0.0)
    assert torch.equal(logits(result.model, data), logits(model, data))
    assert result.model.state_dict().keys() == model.state_dict().keys()


def test_llama_turns_on_the_bias_flag_with_zero_biases_where_nothing_was_frozen():
    model = make_model("llama")
    assert not model.config.attention_bias and not model.config.mlp_bias
    result = prune_mean(model, make_data(), components=("k",))
    assert result.model.config.attention_bias and not result.model.config.mlp_bias
    assert not model.config.attention_bias  # the input model is untouched
    for layer in result.model.model.layers:
        attention = layer.self_attn
        for name in ("q_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(attention, name).bias, torch.zeros_like(getattr(attention, name).bias))
        assert attention.k_proj.bias.abs().sum() > 0
        assert layer.mlp.down_proj.bias is None
    assert result.report.size_after.parameters > result.report.size_before.parameters
    assert "got one" in result.report.size_change()


def test_the_table_averaged_over_the_calibration_tokens_is_the_mean_bias(family):
    """The mean fold is the count-weighted mean of the indexed fold's rows."""
    model, data = make_model(family), make_data(padded=True)
    indexed = eigenfast.prune(model, data, p=0.3, components=COMPONENTS, progress=False)
    mean = prune_mean(model, data)
    counts = torch.bincount(data.position_ids[data.mask.bool()], minlength=data.max_length).double()
    for name, module in indexed.model.named_modules():
        if isinstance(module, PositionTable):
            table = module.table[: module.calib_len].double()
            expected = (table * counts[:, None]).sum(0) / counts.sum()
            torch.testing.assert_close(mean.model.get_submodule(name).bias.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_a_projection_whose_class_cannot_have_a_bias_is_refused_before_any_work(name):
    model = make_model(name)
    with pytest.raises(UnsupportedModelError, match="positions='indexed'"):
        prune_mean(model, make_data(), components=("o",))


def test_bad_positions_are_refused():
    with pytest.raises(ArgumentError, match="positions must be one of"):
        PruneOptions(positions="average")
    assert PruneOptions().positions == "indexed"
