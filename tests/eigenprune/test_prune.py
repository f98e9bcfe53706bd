"""eigenfast.eigenprune.prune: freezing math, equivalences with hook-based references, and the pruned model in use."""
from __future__ import annotations

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.data.task_data import TaskData
from eigenfast.rewrite.position_tables import TokenBiasLinear

from conftest import make_data, make_model
from hook_references import assert_equals_hook_based_frozen_forward, frozen_delta, logits, mean_inputs, pruned_paths

ALL = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")


def components_of(model) -> tuple[str, ...]:
    return get_adapter(model).components()


def test_p_zero_changes_nothing(config_name):
    model = make_model(config_name)
    data = make_data(padded=True)
    result = eigenfast.prune(model, data, p=0.0, components=components_of(model))
    assert pruned_paths(result) == []
    torch.testing.assert_close(logits(result.model, data), logits(model, data), rtol=0, atol=1e-5)


def test_weights_and_tables_follow_the_freezing_rule(config_name):
    model = make_model(config_name)
    data = make_data(padded=True)
    result = eigenfast.prune(model, data, p=0.3, components=components_of(model))
    paths = pruned_paths(result)
    assert paths, "p=0.3 should freeze something in every module type"
    for path in paths:
        original = model.get_submodule(path)
        A = projection_matrix(original).detach().double()
        bias = original.bias.detach().double() if original.bias is not None else torch.zeros(A.shape[1]).double()
        delta = frozen_delta(model, result, path)
        pruned = result.model.get_submodule(path)
        torch.testing.assert_close(projection_matrix(pruned).double(), A - delta, rtol=0, atol=1e-6)
        expected = bias + mean_inputs(model, data, path) @ delta
        torch.testing.assert_close(pruned.rows.double(), expected, rtol=0, atol=1e-5)


def test_selection_counts_floor_p_per_component_type(family):
    model = make_model(family)
    comps = components_of(model)
    result = eigenfast.prune(model, make_data(), p=0.29, components=comps)
    for c in comps:
        scores = torch.cat([v.flatten() for (l, k), v in result.scores.items() if k == c])
        chosen = torch.cat([v.flatten() for (l, k), v in result.frozen.items() if k == c])
        assert int(chosen.sum()) == int(0.29 * scores.numel() + 1e-9)
        # Every frozen score is at most every kept score: the lowest ones went.
        assert scores[chosen].max() <= scores[~chosen].min()


def test_pruned_model_equals_hook_based_frozen_forward(config_name):
    model = make_model(config_name)
    data = make_data(padded=True)
    result = eigenfast.prune(model, data, p=0.2, components=components_of(model))
    assert_equals_hook_based_frozen_forward(model, result, data)


def test_generate_with_kv_cache_matches_full_forwards(family):
    model = make_model(family)
    data = make_data(n=6, length=6)
    result = eigenfast.prune(model, data, p=0.2, components=components_of(model), extrapolate="last")
    prompt = data.input_ids[:2, :4]
    generated = result.model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    tokens = prompt
    for _ in range(5):  # no cache: the whole sequence every step
        with torch.no_grad():
            nxt = result.model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(generated, tokens)


def test_left_padding_gives_unpadded_logits(family):
    model = make_model(family)
    data = make_data(n=8, length=6, padded=True)
    result = eigenfast.prune(model, data, p=0.2, components=components_of(model))
    batch = logits(result.model, data)
    for row in range(len(data)):
        real = data.mask[row].bool()
        alone = logits(result.model, TaskData(data.input_ids[row, real][None], data.labels[row : row + 1]))
        torch.testing.assert_close(batch[row, real], alone[0], rtol=1e-4, atol=1e-5)


def test_save_load_gives_identical_logits(tmp_path, family):
    model = make_model(family)
    data = make_data(padded=True)
    result = eigenfast.prune(model, data, p=0.2, components=components_of(model))
    result.save(tmp_path / "pruned")
    loaded = eigenfast.load(tmp_path / "pruned")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, data), logits(result.model, data))
    extras = eigenfast.saving.serialization.load_extras(tmp_path / "pruned")
    assert torch.equal(extras["scores.0.k"], result.scores[(0, "k")])


def test_corrupted_saves_are_refused(tmp_path):
    model = make_model("gpt2")
    result = eigenfast.prune(model, make_data(), p=0.2, components=("k", "mlp_in"))
    target = result.save(tmp_path / "m")
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(eigenfast.SavedModelError, match="save the model again"):
        eigenfast.load(target)
    weights.write_bytes(good)
    (target / "eigenfast.json").write_text("{not json")
    with pytest.raises(eigenfast.SavedModelError, match="corrupted"):
        eigenfast.load(target)
    with pytest.raises(eigenfast.SavedModelError, match="no eigenfast.json"):
        eigenfast.load(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        result.save(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"


def test_positions_beyond_calibration_follow_the_rule():
    model = make_model("llama")
    data = make_data(n=6, length=4)
    long = make_data(n=2, length=7, seed=3)
    with pytest.raises(eigenfast.PositionIndexError, match="calibration length 4"):
        logits(eigenfast.prune(model, data, p=0.3, components=("k", "o"), extrapolate="error").model, long)
    for rule in ("mean", "last"):
        pruned = eigenfast.prune(model, data, p=0.3, components=("k", "o"), extrapolate=rule).model
        module = pruned.get_submodule("model.layers.0.self_attn.o_proj")
        expected = module.rows.mean(0) if rule == "mean" else module.rows[-1]
        torch.testing.assert_close(module.table[4], expected, rtol=0, atol=1e-7)
        assert torch.isfinite(logits(pruned, long)).all()


def test_auto_sweeps_candidates_on_held_out_data():
    model = make_model("gpt2")
    data = make_data(n=20)
    result = eigenfast.prune(model, data, p="auto", components=("k",), candidates=(0.0, 0.1, 0.5))
    report = result.report
    assert [c.p for c in report.candidates] == [0.0, 0.1, 0.5]
    assert all(c.evaluation is not None and c.evaluation.n == 4 for c in report.candidates)
    best = max(report.candidates, key=lambda c: (c.evaluation.accuracy, -c.evaluation.loss))
    assert report.p == best.p
    assert "val acc" in report.table() and "<- kept" in report.table()


@pytest.mark.parametrize("p", [-0.1, 1.5, "half", True])
def test_bad_p_is_refused(p):
    with pytest.raises(ValueError, match="p must be a fraction in"):
        eigenfast.prune(make_model("gpt2"), make_data(), p=p)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2))
    with pytest.raises(eigenfast.UnsupportedModelError, match="gpt2, gpt_neox, llama"):
        eigenfast.prune(opt, make_data(), p=0.1)


def test_plain_dict_data_is_accepted_and_bad_data_is_refused():
    model = make_model("gpt2")
    data = make_data()
    as_dict = {"input_ids": data.input_ids, "labels": data.labels}
    assert eigenfast.score(model, as_dict)[(0, "k")].shape == (4, 8)
    with pytest.raises(eigenfast.DataError, match="empty"):
        eigenfast.prune(model, {"input_ids": torch.zeros(0, 3, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)})
    with pytest.raises(eigenfast.DataError, match="length mismatch"):
        eigenfast.prune(model, {"input_ids": data.input_ids, "labels": data.labels[:-1]})
    with pytest.raises(eigenfast.DataError, match="one target token"):
        eigenfast.prune(model, {"input_ids": data.input_ids, "labels": data.input_ids[:, :2]})


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_torch_compile_of_a_pruned_model(name):
    # aot_eager traces with fake tensors (the op's fake kernel) in one graph, without inductor's long C++ build.
    model = make_model(name)
    data = make_data(padded=True)
    pruned = eigenfast.prune(model, data, p=0.2, components=components_of(model)).model
    compiled = torch.compile(pruned, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(logits(compiled, data), logits(pruned, data), rtol=0, atol=1e-6)


@pytest.mark.parametrize("second_length", [6, 8])
def test_prune_then_prune_follows_the_freezing_rule(config_name, second_length):
    """Pruning a pruned model freezes more terms of its current matrices: A'' = A' − ΣE_i(A'),
    b''[t] = b'[t] + x̄'[t] ΣE_i, b' read on the longer of the two calibration lengths."""
    model = make_model(config_name)
    first = eigenfast.prune(model, make_data(padded=True), p=0.2, components=components_of(model))
    data = make_data(length=second_length, padded=True, seed=3)
    second = eigenfast.prune(first.model, data, p=0.3, components=components_of(model))
    for path in pruned_paths(second):
        before = first.model.get_submodule(path)
        A = projection_matrix(before).detach().double()
        delta = frozen_delta(first.model, second, path)
        after = second.model.get_submodule(path)
        torch.testing.assert_close(projection_matrix(after).double(), A - delta, rtol=0, atol=1e-6)
        x_mean = mean_inputs(first.model, data, path)
        if isinstance(before, TokenBiasLinear):
            positions = torch.arange(x_mean.shape[0]).clamp(max=before.calib_len)
            old = before.table.double()[positions]
        else:
            old = before.bias.double() if before.bias is not None else torch.zeros(A.shape[1]).double()
        torch.testing.assert_close(after.rows.double()[: x_mean.shape[0]], old + x_mean @ delta, rtol=0, atol=1e-5)
    assert_equals_hook_based_frozen_forward(first.model, second, data)


def test_report_sizes_count_the_bias_tables_the_forward_reads():
    model = make_model("llama")
    result = eigenfast.prune(model, make_data(), p=0.2, components=("k", "mlp_in"), progress=False)
    before, after = result.report.size_before, result.report.size_after
    n = lambda tensors: sum(t.numel() for t in tensors)  # noqa: E731
    assert (before.parameters, before.buffers) == (n(model.parameters()), n(model.buffers()))
    assert (after.parameters, after.buffers) == (n(result.model.parameters()), n(result.model.buffers()))
    tables = n(m.table for m in result.model.modules() if hasattr(m, "table"))
    assert tables > 0 and after.buffers == before.buffers + tables
    assert after.bytes == 4 * after.total  # float32 everywhere
    assert "size after" in result.report.table() and result.report.as_dict()["size_after"]["buffers"] == after.buffers


def test_the_report_says_why_a_pruned_model_is_a_little_larger():
    model = make_model("gpt2")  # c_attn has a bias of 3 × 32: it leaves the parameters, its table joins the buffers
    result = eigenfast.prune(model, make_data(length=6), p=0.2, components=("k",), progress=False)
    before, after = result.report.size_before, result.report.size_after
    n = sum(hasattr(m, "table") for m in result.model.modules())  # layers where something was frozen
    assert n >= 1 and after.parameters - before.parameters == -96 * n
    assert after.buffers - before.buffers == 7 * 96 * n  # 6 scored positions + 1 row for later ones
    line = result.report.table().splitlines()[-1]
    assert line.strip() == (
        f"+{after.total - before.total:,} elements: eigenpruning keeps every matrix whole (frozen terms fold into "
        "biases); each pruned projection's bias became a position table of 7 rows (6 scored positions + 1 for later "
        f"ones): {-96 * n:+,} parameters, {7 * 96 * n:+,} buffer elements"
    )
    unchanged = eigenfast.prune(model, make_data(length=6), p=0.0, components=("k",), progress=False)
    assert unchanged.report.table().splitlines()[-1].strip().startswith("the same size")
