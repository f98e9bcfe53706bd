"""result.save(folder, format="hf"): a checkpoint plain transformers loads, no eigenfast, no remote code."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_data, make_model
from hook_references import logits
from transformers import AutoModelForCausalLM, AutoTokenizer

import eigenfast
from eigenfast.builtin import load_builtin
from eigenfast.circuit import component_means
from eigenfast.data.tasks import load_task
from eigenfast.errors import (
    ArgumentError,
    OutputExistsError,
    SaveError,
    UnsupportedModelError,
)
from eigenfast.rewrite.removal import remove_components
from eigenfast.saving.hf_checkpoint import save_hf_checkpoint

COMPONENTS = ("k", "o", "mlp_in", "mlp_out")


def prune(model, data, positions="mean"):
    return eigenfast.prune(model, data, p=0.3, components=COMPONENTS, progress=False, positions=positions)


def reload(folder, model):
    # The in-memory model's attention implementation, so that the two compute alike.
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=model.config._attn_implementation)


def test_a_mean_pruned_model_loads_in_plain_transformers_with_identical_logits(tmp_path, family):
    model, data = make_model(family), make_data(padded=True)
    result = prune(model, data)
    folder = result.save(tmp_path / "plain", format="hf")
    back = reload(folder, result.model)
    assert type(back) is type(model)
    assert torch.equal(logits(back, data), logits(result.model, data))
    assert not (folder / "eigenfast.json").exists() and not (folder / "modeling_eigenfast.py").exists()


def test_the_tokenizer_is_saved_beside_it(tmp_path):
    model, tokenizer = load_builtin("int_sum_llama")
    data = load_task("int_sum", tokenizer).subset(torch.arange(16))
    result = eigenfast.prune(model, data, p=0.05, components=("k",), progress=False, positions="mean",
                             tokenizer=tokenizer)
    folder = result.save(tmp_path / "plain", format="hf")
    assert AutoTokenizer.from_pretrained(folder)("12+34=").input_ids == tokenizer("12+34=").input_ids
    assert reload(folder, result.model).config.attention_bias


def test_an_indexed_model_is_refused_before_any_file_is_written(tmp_path, family):
    result = prune(make_model(family), make_data(), positions="indexed")
    with pytest.raises(UnsupportedModelError, match="positions='mean'"):
        result.save(tmp_path / "plain", format="hf")
    assert not (tmp_path / "plain").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def removed_copy(name, heads, mlps=(), positions="mean"):
    model, data = make_model(name), make_data()
    smaller = copy.deepcopy(model)
    remove_components(smaller, heads, list(mlps), component_means(model, data), positions=positions)
    return smaller, data


@pytest.mark.parametrize("heads, mlps, why", [
    ({0: [0, 1]}, (), "different head counts per layer"),
    ({0: [0, 1, 2, 3]}, (), "was removed"),
    ({}, (0,), "was removed"),
])
def test_extracted_models_plain_transformers_cannot_build_are_refused(tmp_path, heads, mlps, why):
    smaller, _ = removed_copy("llama", heads, mlps)
    with pytest.raises(UnsupportedModelError, match=why) as error:
        save_hf_checkpoint(smaller, tmp_path / "plain")
    assert "eigenfast.load" in str(error.value) and "to_gguf" in str(error.value)
    assert not (tmp_path / "plain").exists()


def test_uneven_gqa_groups_are_refused(tmp_path):
    smaller, _ = removed_copy("llama", {0: [0], 1: [0]})  # keeps 1 and 2 query heads of the two KV heads
    with pytest.raises(UnsupportedModelError, match="uneven groups"):
        save_hf_checkpoint(smaller, tmp_path / "plain")


def test_uniform_head_removal_in_llama_loads_with_the_new_counts(tmp_path):
    smaller, data = removed_copy("llama", {0: [0, 1], 1: [2, 3]})
    back = reload(save_hf_checkpoint(smaller, tmp_path / "plain"), smaller)
    assert (back.config.num_attention_heads, back.config.num_key_value_heads, back.config.head_dim) == (2, 1, 8)
    assert torch.equal(logits(back, data), logits(smaller, data))


def test_a_head_count_the_class_cannot_split_is_refused(tmp_path):
    smaller, _ = removed_copy("gpt2", {0: [0], 1: [2]})  # GPT-2 derives its head size from the count
    with pytest.raises(UnsupportedModelError, match="cannot be built"):
        save_hf_checkpoint(smaller, tmp_path / "plain")


def test_the_folder_must_be_new_or_empty_and_the_format_known(tmp_path):
    result = prune(make_model("gpt2"), make_data())
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="new or empty"):
        result.save(tmp_path / "used", format="hf")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]
    with pytest.raises(ArgumentError, match="format must be one of"):
        result.save(tmp_path / "x", format="gguf")
    (tmp_path / "empty").mkdir()
    result.save(tmp_path / "empty", format="hf")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_mean_pruned_model_still_round_trips_through_eigenfast_save(tmp_path):
    result = prune(make_model("llama"), make_data())
    back = eigenfast.load(result.save(tmp_path / "save"))
    assert torch.equal(logits(back, make_data()), logits(result.model, make_data()))


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    result = prune(make_model("gpt2"), make_data())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("eigenfast.saving.hf_checkpoint.save_state", broken)
    with pytest.raises(SaveError, match="disk full"):
        result.save(tmp_path / "plain", format="hf")
    assert list(tmp_path.iterdir()) == []
