"""Extraction under GQA with uneven kept groups: each kept KV head is held once (weights and KV cache),
and Q is padded to even groups around the attention function; every equivalence still holds."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, PhiConfig, StaticCache

import eigenfast
from eigenfast.adapters import get_adapter, projection_matrix
from eigenfast.adapters.calls import cache_keyword
from eigenfast.rewrite.positional import KV_SLOTS, Q_PAD, Q_UNPAD
from eigenfast.rewrite.surgery import set_attributes
from eigenfast.saving.serialization import save_model
from eigenfast.serving.cost import kv_cache_bytes
from eigenfast.serving.decode import decode

from conftest import IDS, assert_static_cache_equals_dynamic, make_data
from hook_references import extracted, logits, removed

SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=32)
CONFIGS = {
    "llama": lambda: LlamaConfig(**IDS, **SIZES, intermediate_size=48, attention_bias=True),
    "phi": lambda: PhiConfig(**IDS, **SIZES, intermediate_size=64, partial_rotary_factor=0.5),
}
# Query heads 0-3 read KV head 0, heads 4-7 KV head 1. Layer 0 keeps 4 and 2 (uneven), layer 1 keeps
# 1 and 3 (uneven: KV head 0's padding sits between kept heads), layer 2 keeps 2 and 2 (even: no
# padding), layer 3 keeps 2 of KV head 1 only. Copying KV heads to even groups would hold
# 3 + 4 + 2 + 1 KV slots, more than the base's 8.
KEPT = {0: [0, 1, 2, 3, 4, 5], 1: [3, 4, 5, 7], 2: [0, 3, 5, 6], 3: [4, 6]}
HEADS = {layer: [h for h in range(8) if h not in kept] for layer, kept in KEPT.items()}


def distinct_kv_heads(layer: int) -> int:
    return len({head // 4 for head in KEPT[layer]})


def make(name: str, attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def cut(name: str) -> torch.nn.Module:
    return removed(make(name), make_data(n=8, seed=1, padded=True), heads=HEADS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_uneven_groups_equal_the_hook_ablated_model(name, attn):
    data = make_data(padded=True)
    pruned, reference = extracted(make(name, attn), data, heads=HEADS)
    torch.testing.assert_close(logits(pruned, data), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_kept_kv_head_is_held_once_in_the_weights_and_both_caches(name):
    model = cut(name)
    adapter = get_adapter(model)
    for layer in KEPT:
        for component in "kv":
            width = projection_matrix(model.get_submodule(adapter.site(layer, component).path)).shape[1]
            assert width == distinct_kv_heads(layer) * adapter.d_head
    ids = make_data(n=3, length=4, seed=3).input_ids
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=9)):
        with torch.no_grad():
            model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True)
        for layer in KEPT:
            assert cache.layers[layer].keys.shape[1] == cache.layers[layer].values.shape[1] == distinct_kv_heads(layer)
    held = sum(distinct_kv_heads(layer) for layer in KEPT) * 2 * adapter.d_head * 4  # float32
    assert kv_cache_bytes(model, 3, 9) == 3 * 9 * held
    assert kv_cache_bytes(model, 3, 9) < kv_cache_bytes(make(name), 3, 9)


def test_only_uneven_layers_pad_their_query_heads():
    model = cut("llama")
    adapter = get_adapter(model)
    index = {layer: [getattr(adapter.attention(layer), name) for name in (Q_PAD, Q_UNPAD)] for layer in KEPT}
    assert [i.tolist() for i in index[0]] == [[0, 1, 2, 3, 4, 5, 4, 4], [0, 1, 2, 3, 4, 5]]
    assert [i.tolist() for i in index[1]] == [[0, 0, 0, 1, 2, 3], [0, 3, 4, 5]]
    assert index[2] == index[3] == [None, None]
    assert [adapter.attention(layer).num_key_value_groups for layer in KEPT] == [4, 3, 2, 2]


@pytest.mark.parametrize("name", CONFIGS)
def test_static_cache_generate_equals_dynamic_cache(name):
    assert_static_cache_equals_dynamic(cut(name))


def test_compiled_static_cache_decode_has_no_graph_break_nor_recompilation():
    model = cut("llama")
    prompt = make_data(n=2, length=5, seed=5).input_ids
    with torch.no_grad():
        reference = decode(model, model.config, prompt, 4, keep_logits=True).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        recompiles = torch._dynamo.config.patch(error_on_recompile=True)
        got = decode(compiled, model.config, prompt, 4, keep_logits=True, after_first_step=recompiles.__enter__).logits
        recompiles.__exit__(None, None, None)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


def test_save_and_load_restore_the_padding(tmp_path):
    model = cut("llama")
    save_model(model, tmp_path / "circuit", kind="circuit")
    loaded = eigenfast.load(tmp_path / "circuit")
    adapter, original = get_adapter(loaded), get_adapter(model)
    for layer in KEPT:
        for name in (Q_PAD, Q_UNPAD):
            a, b = getattr(adapter.attention(layer), name), getattr(original.attention(layer), name)
            assert (a is None and b is None) or torch.equal(a, b)
    assert not any("eigenfast_q" in key for key in loaded.state_dict())  # derived from the saved attribute
    data = make_data(padded=True)
    assert torch.equal(logits(loaded, data), logits(model, data))


def test_attributes_refuse_what_json_cannot_hold_and_names_the_module_lacks():
    attention = get_adapter(make("llama")).attention(0)
    with pytest.raises(TypeError, match="list of them"):
        set_attributes(attention, {KV_SLOTS: [torch.tensor(0)]})
    with pytest.raises(AttributeError, match="no attribute 'heads_kept'"):
        set_attributes(attention, {"heads_kept": 3})


def test_export_with_dynamic_batch_and_length_equals_eager():
    from eigenfast.serving.export import export

    model = cut("llama")
    program = export(model, max_length=16)
    for n, length in ((1, 3), (5, 7)):
        data = make_data(n=n, length=length, seed=n, padded=True)
        with torch.no_grad():
            expected = model(input_ids=data.input_ids, position_ids=data.position_ids, use_cache=False).logits
        torch.testing.assert_close(program.module()(data.input_ids, data.position_ids), expected, rtol=0, atol=1e-5)


def test_sdpa_decode_packing_the_padded_heads_equals_eager_decode():
    """At a one-token step transformers' SDPA packs the query heads of each KV head into rows; the padded
    layout must come out of that path as it does out of eager's repeat."""
    data = make_data(n=8, seed=1, padded=True)
    prompt = make_data(n=2, length=5, seed=5).input_ids
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    scores = {}
    for attn in ("eager", "sdpa"):
        model = removed(make("llama", attn), data, heads=HEADS)
        out = model.generate(
            prompt * mask, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True,
        )
        scores[attn] = torch.stack(out.scores, dim=1)
    torch.testing.assert_close(scores["sdpa"], scores["eager"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("slots", [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], "0,1"])
def test_a_damaged_slot_list_in_a_save_is_refused_with_a_clear_error(tmp_path, slots):
    """Layer 0 keeps 6 query heads over 2 KV heads: a list of another length, a KV head it lacks, an order the
    weights were not cut in, an unused KV head, or not a list at all is a damaged save, not an IndexError later."""
    import json

    from eigenfast.errors import SavedModelError

    directory = tmp_path / "circuit"
    save_model(cut("llama"), directory, kind="circuit")
    spec_file = directory / "eigenfast.json"
    spec = json.loads(spec_file.read_text())
    spec["attributes"]["model.layers.0.self_attn"][KV_SLOTS] = slots
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(SavedModelError, match=f"{KV_SLOTS}.*6 query heads and 2 KV heads"):
        eigenfast.load(directory)
