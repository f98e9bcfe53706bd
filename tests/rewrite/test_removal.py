"""Physical removal of heads and MLPs: equal to hook ablation, smaller, and usable like any HF model."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import eigenfast
from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.circuit import ablated, component_means
from eigenfast.data.task_data import TaskData, positions_from_mask
from eigenfast.rewrite.position_tables import PositionIndexError
from eigenfast.rewrite.removal import head_layout, remove_components
from eigenfast.rewrite.stand_ins import PositionMean, RemovedAttention, RemovedNorm

from conftest import make_data, make_model
from hook_references import HEADS, extracted, logits, pairs, removed


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mlps", [(), (1,)], ids=["heads", "heads+mlp"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_extracted_model_equals_the_hook_ablated_model(config_name, ablation, mlps):
    model = make_model(config_name)
    data = make_data(padded=True)
    pruned, reference = extracted(model, data, mlps=mlps, ablation=ablation)
    assert type(pruned) is type(model)
    assert not torch.allclose(reference, logits(model, data), atol=1e-3), "the ablation should change the logits"
    torch.testing.assert_close(logits(pruned, data), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kept, kv_heads, kv_slots, group",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1], [0, 0, 0, 0, 1, 1, 1, 1], 4),  # nothing removed: groups of 4
        ([0, 1, 4, 5], [0, 1], [0, 0, 1, 1], 2),  # even: 2 and 2
        ([0, 1, 2, 3, 4, 5], [0, 1], [0, 0, 0, 0, 1, 1], None),  # 4 and 2: uneven, each KV head kept once
        ([0, 3, 5, 6], [0, 1], [0, 0, 1, 1], 2),  # 2 and 2 spread out: still one KV head per group
        ([1, 2, 3, 7], [0, 1], [0, 0, 0, 1], None),  # 3 and 1
        ([6], [1], [0], 1),  # one group left: KV head 0 leaves
    ],
)
def test_gqa_layout_keeps_each_kv_head_once_and_maps_every_query_head_to_it(kept, kv_heads, kv_slots, group):
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=8,
                    num_key_value_heads=2, intermediate_size=48)
    )
    adapter = get_adapter(model)
    layout = head_layout(adapter, kept)
    assert layout.q_heads == tuple(kept)
    assert layout.kv_heads == tuple(kv_heads)
    assert layout.kv_slots == tuple(kv_slots)
    assert layout.group == group
    for slot, head in enumerate(layout.q_heads):
        assert layout.kv_heads[layout.kv_slots[slot]] == adapter.kv_head(head)


@pytest.mark.parametrize("kept", [[0, 1, 2, 3, 4, 5], [1, 2, 3, 7], [0, 3, 5, 6]])
def test_uneven_gqa_groups_still_equal_hook_ablation(kept):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, intermediate_size=48, attention_bias=True),
        attn_implementation="eager",
    ).eval()
    data = make_data(padded=True)
    heads = {1: [h for h in range(8) if h not in kept]}
    pruned, reference = extracted(model, data, heads=heads)
    torch.testing.assert_close(logits(pruned, data), reference, rtol=0, atol=1e-4)


def expected_drop(model, heads, mlps, ablation) -> int:
    """Parameters that removal must take out, counted on the original model's shapes."""
    adapter = get_adapter(model)
    size = lambda path: sum(p.numel() for p in model.get_submodule(path).parameters())  # noqa: E731
    shared_norm = adapter.mlp_norm_path is None
    drop = 0
    for layer, gone in heads.items():
        base = adapter.layer_path(layer)
        if len(gone) == adapter.n_heads:
            drop += size(f"{base}.{adapter.attn_path}")
            if not shared_norm or layer in mlps:
                drop += size(f"{base}.{adapter.attn_norm_path}")
            continue
        layout = head_layout(adapter, [h for h in range(adapter.n_heads) if h not in gone])
        kept = {"q": len(layout.q_heads), "k": len(layout.kv_heads), "v": len(layout.kv_heads)}
        for component, n_kept in kept.items():
            module = model.get_submodule(adapter.site(layer, component).path)
            column = projection_matrix(module).shape[0] + (module.bias is not None)  # weights + bias of one output
            n_total = adapter.n_heads if component == "q" else adapter.n_kv_heads
            drop += (n_total - n_kept) * adapter.d_head * column
        drop += len(gone) * adapter.d_head * adapter.d_model
        o_bias = model.get_submodule(adapter.site(layer, "o").path).bias
        if ablation == "mean" and o_bias is not None:
            drop += o_bias.numel()  # it moves into the position table, a buffer
    for layer in mlps:
        drop += size(f"{adapter.layer_path(layer)}.{adapter.mlp_path}")
        if not shared_norm:
            drop += size(f"{adapter.layer_path(layer)}.{adapter.mlp_norm_path}")
    return drop


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_parameter_count_drops_by_exactly_the_removed_weights(config_name, ablation):
    model = make_model(config_name)
    data = make_data()
    for heads, mlps in [(HEADS, [0]), ({1: [0, 3]}, [0, 1])]:
        pruned = removed(model, data, heads, mlps, ablation)
        assert n_params(model) - n_params(pruned) == expected_drop(model, heads, mlps, ablation)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_cut_projections_keep_their_source_layout(family, ablation):
    """GPT-2's Conv1D stores A (d_in, d_out), nn.Linear A^T: a cut projection, plain or with a position
    table, keeps its source's, because a CPU decode step streams the two at different speeds."""
    model = make_model(family)
    cut = removed(model, make_data(), heads={1: [0, 1]}, ablation=ablation)  # Llama: KV head 0 goes too
    adapter = get_adapter(model)
    row_major = lambda A: A.stride() == (A.shape[1], 1)  # noqa: E731  the Conv1D layout
    for component in ("q", "k", "v", "o"):
        path = adapter.site(1, component).path
        before, after = projection_matrix(model.get_submodule(path)), projection_matrix(cut.get_submodule(path))
        assert after.shape != before.shape, component
        assert row_major(after) == row_major(before), (component, before.stride(), after.stride())


def test_emptied_attention_and_mlps_leave_with_the_norms_nothing_else_reads(family):
    model = make_model(family)
    adapter = get_adapter(model)
    pruned = removed(model, make_data(), heads={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, mlps=[1])
    layers = get_adapter(pruned).layers()
    for layer in (0, 1):
        assert isinstance(layers[layer].get_submodule(adapter.attn_path), RemovedAttention)
    assert isinstance(layers[1].get_submodule(adapter.mlp_path), PositionMean)
    norm = lambda layer, path: layers[layer].get_submodule(path)  # noqa: E731
    # Layer 1 lost everything: every norm goes.
    assert isinstance(norm(1, adapter.attn_norm_path), RemovedNorm)
    if adapter.mlp_norm_path is None:
        # Phi: attention and MLP share one norm; layer 0's MLP still reads it.
        assert not isinstance(norm(0, adapter.attn_norm_path), RemovedNorm)
    else:
        assert isinstance(norm(0, adapter.attn_norm_path), RemovedNorm)
        assert isinstance(norm(1, adapter.mlp_norm_path), RemovedNorm)
        assert not isinstance(norm(0, adapter.mlp_norm_path), RemovedNorm)


def test_generate_with_kv_cache_matches_full_forwards(family):
    model = make_model(family)
    pruned = removed(model, make_data(n=6, length=6), mlps=(1,), extrapolate="last")
    prompt = make_data(n=2, length=4, seed=5).input_ids
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding: positions, masks and the cache must all agree
    out = pruned.generate(
        prompt * mask, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
        eos_token_id=None, output_scores=True, return_dict_in_generate=True,
    )
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():  # no cache: the whole sequence in one forward, positions as generate() derives them
        full = pruned(
            out.sequences[:, :-1], attention_mask=full_mask, position_ids=positions_from_mask(full_mask), use_cache=False
        ).logits[:, 3:]
    torch.testing.assert_close(torch.stack(out.scores, dim=1), full, rtol=0, atol=1e-4)
    assert torch.equal(out.sequences[:, 4:], full.argmax(-1))


def test_left_padding_gives_unpadded_logits(family):
    model = make_model(family)
    data = make_data(n=8, length=6, padded=True)
    pruned = removed(model, data, mlps=(0,))
    batch = logits(pruned, data)
    for row in range(len(data)):
        real = data.mask[row].bool()
        alone = logits(pruned, TaskData(data.input_ids[row, real][None], data.labels[row : row + 1]))
        torch.testing.assert_close(batch[row, real], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["mean", "last"])
def test_positions_beyond_calibration_follow_the_rule(rule):
    model = make_model("llama")
    calib, long = make_data(n=6, length=4), make_data(n=3, length=7, seed=3)
    means = component_means(model, calib)
    with ablated(model, pairs(HEADS), [1], means, "mean", rule):
        reference = logits(model, long)
    pruned = copy.deepcopy(model)
    remove_components(pruned, HEADS, [1], means, "mean", rule)
    torch.testing.assert_close(logits(pruned, long), reference, rtol=0, atol=1e-4)
    table = pruned.get_submodule("model.layers.1.mlp")
    expected = table.rows.mean(0) if rule == "mean" else table.rows[-1]
    torch.testing.assert_close(table.table[4], expected, rtol=0, atol=1e-7)


def test_positions_beyond_calibration_can_be_refused():
    model = make_model("gpt2")
    means = component_means(model, make_data(n=6, length=4))
    remove_components(model, HEADS, [1], means, "mean", "error")
    with pytest.raises(PositionIndexError, match="calibration length 4"):
        logits(model, make_data(n=2, length=7))


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_save_load_gives_identical_logits(tmp_path, config_name, ablation):
    from eigenfast.saving.serialization import save_model

    model = make_model(config_name)
    data = make_data(padded=True)
    pruned = removed(model, data, mlps=(0,), ablation=ablation)
    save_model(pruned, tmp_path / "circuit", kind="circuit")
    loaded = eigenfast.load(tmp_path / "circuit")
    assert type(loaded) is type(model)
    assert n_params(loaded) == n_params(pruned)
    assert torch.equal(logits(loaded, data), logits(pruned, data))


def test_torch_compile_runs_the_extracted_model_in_one_graph(family):
    model = make_model(family)
    data = make_data(padded=True)
    pruned, reference = extracted(model, data, mlps=(1,))
    compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)  # a graph break is an error
    torch.testing.assert_close(logits(compiled, data), reference, rtol=0, atol=1e-4)


def test_bad_requests_are_refused():
    model = make_model("gpt2")
    means = component_means(model, make_data())
    with pytest.raises(ValueError, match="ablation must be one of"):
        remove_components(model, HEADS, [], means, "resample")
    with pytest.raises(ValueError, match="mean ablation needs"):
        remove_components(model, HEADS, [], None, "mean")
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] of layer 1 out of range"):
        remove_components(model, {1: [4]}, [], means)
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\] out of range"):
        remove_components(model, {}, [2], means)
    remove_components(model, {1: [0]}, [], means)
    with pytest.raises(ValueError, match="already had components removed"):
        remove_components(model, {1: [1]}, [], means)
