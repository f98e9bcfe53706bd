"""GGUF export, read back: the file's ``deci`` forward (tests/deci_reference.py) equals the eager
extracted model, and so does the ``gpt2``/``gptneox``/``phi2`` one (tests/dense_reference.py) of the
zero-filled GPT-2, NeoX and Phi files; the GQA regrouping is exact and minimal; what the format cannot hold
is refused before any file exists. (llama.cpp itself runs the files in test_gguf_llamacpp.py.)"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import eigenfast
from eigenfast.builtin.tokenizer import build_tokenizer
from eigenfast.rewrite.removal import ComponentMeans, remove_components
from eigenfast.serving import to_gguf
from eigenfast.serving.llamacpp.heads import even_groups, regroup
from eigenfast.serving.llamacpp.speed import decode_weight_bytes

import deci_reference
import dense_reference
from gguf_cases import CONFIGS, DENSE_CONFIGS, REQUIRE_ENV, base_model, byte_level_bpe, extracted, prompt, requires


@pytest.fixture(autouse=True)
def _gguf():
    requires("gguf")


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["base", "extracted"])
def test_file_forward_equals_eager(family, kind, tmp_path):
    model = base_model(family) if kind == "base" else extracted(family)
    path = to_gguf(model, tmp_path / "m.gguf")
    ids = prompt()
    with torch.no_grad():
        eager = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(deci_reference.logits(path, ids), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(DENSE_CONFIGS))
@pytest.mark.parametrize("kind", ["base", "extracted"])
def test_zero_filled_file_forward_equals_eager(family, kind, tmp_path):
    model = base_model(family) if kind == "base" else extracted(family)
    path = to_gguf(model, tmp_path / "m.gguf")
    for seed in range(2):
        ids = prompt(12, seed)
        with torch.no_grad():
            eager = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(dense_reference.logits(path, ids), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(DENSE_CONFIGS))
def test_zero_filled_export_says_so_and_cuts_nothing(family, tmp_path, caplog):
    """Every head and block stays in the file, as llama.cpp's graph for the family needs: the same bytes as the
    whole model, and a warning naming what was removed."""
    gguf = requires("gguf")
    base = to_gguf(base_model(family), tmp_path / "base.gguf")
    with caplog.at_level(logging.WARNING, logger="eigenfast.serving.llamacpp"):
        path = to_gguf(extracted(family), tmp_path / "extracted.gguf")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for part in ("layer 0: 2 of 4 heads removed", "layer 1: 1 of 4 heads removed", "layer 2: attention removed",
                 "layer 3: MLP removed", "layer 4: attention removed, MLP removed",
                 "no speed-up in llama.cpp for this architecture; the deci path for Llama-family models skips them"):
        assert part in warning
    assert decode_weight_bytes(path) == decode_weight_bytes(base)
    fields = {name: f.contents() for name, f in gguf.GGUFReader(str(path)).fields.items()}
    arch = fields["general.architecture"]
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.block_count"] == 5


def test_head_counts_and_widths(tmp_path):
    gguf = requires("gguf")
    path = to_gguf(extracted("llama"), tmp_path / "m.gguf")
    fields = {name: f.contents() for name, f in gguf.GGUFReader(str(path)).fields.items()}
    # Layer 0: one padding head for its constant; 1: 3 kept heads in groups 1 and 2, written as 4 over 2, and a
    # width-1 FFN; 2: no attention (its constant joins layer 1's FFN bias); 3: both gone, its constant kept.
    assert fields["deci.attention.head_count"] == [1, 4, 0, 0, 4]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 0, 0, 2]
    assert fields["deci.feed_forward_length"] == [96, 1, 96, 1, 96]


def test_identity_layers_left_out(tmp_path):
    gguf = requires("gguf")
    model = extracted("mistral")  # no biases: layer 3, both parts gone, adds nothing
    path = to_gguf(model, tmp_path / "m.gguf")
    fields = {name: f.contents() for name, f in gguf.GGUFReader(str(path)).fields.items()}
    assert fields["deci.block_count"] == 4
    ids = prompt(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(deci_reference.logits(path, ids), model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)


def _brute_force_cost(kv_slots: list[int], n_kv: int) -> int:
    """The fewest added heads over every group size, each KV head's readers packed in order."""
    counts = [kv_slots.count(kv) for kv in range(n_kv)]
    return min(sum(-(-c // g) * g - c + (-(-c // g) - 1) for c in counts) for g in range(1, max(counts) + 1))


@pytest.mark.parametrize("counts", [(2, 1), (3, 1), (4, 1), (1, 1), (2, 2), (3, 2, 1), (5, 1, 1)])
def test_regroup_exact_and_minimal(counts):
    kv_slots = [kv for kv, c in enumerate(counts) for _ in range(c)]
    grouping = regroup(kv_slots, len(counts))
    n_head, n_head_kv = len(grouping.query_slots), len(grouping.kv_copies)
    assert n_head % n_head_kv == 0
    group = n_head // n_head_kv
    # Every kept query slot written once, reading (through llama.cpp's h // group) a copy of its own KV head.
    written = [(q, grouping.kv_copies[h // group]) for h, q in enumerate(grouping.query_slots) if q is not None]
    assert sorted(written) == sorted(enumerate(kv_slots))
    assert grouping.added_heads == _brute_force_cost(kv_slots, len(counts))
    assert even_groups(kv_slots, len(counts)) == (grouping.added_heads == 0 and len(set(counts)) == 1)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_dtypes_stay_close(dtype, tmp_path):
    model = extracted("qwen2")
    path = to_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    ids = prompt()
    with torch.no_grad():
        eager = model(torch.tensor([ids])).logits[0]
    file = deci_reference.logits(path, ids)
    assert (file - eager).abs().max() < 0.05  # the weights' rounding, not a layout error (those are O(1))


def test_constant_position_table_becomes_a_bias(tmp_path):
    """A position table whose rows are all the same is a constant: written as the projection's bias."""
    model = copy_with_constant_table()
    path = to_gguf(model, tmp_path / "m.gguf")
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(deci_reference.logits(path, ids), model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)


def copy_with_constant_table() -> torch.nn.Module:
    model = base_model("qwen2")
    n_layers, n_heads, d = 5, 4, 64
    means = ComponentMeans(heads=torch.randn(n_layers, n_heads, 1, d).expand(-1, -1, 6, -1).clone(),
                           mlps=torch.randn(n_layers, 1, d).expand(-1, 6, -1).clone(), counts=torch.full((6,), 4))
    remove_components(model, {1: [0], 2: [0, 1, 2, 3]}, [3], means, ablation="mean")
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_position_indexed_tables_refused_before_writing(family, tmp_path):
    model = base_model(family)
    g = torch.Generator().manual_seed(0)
    means = ComponentMeans(heads=torch.randn(5, 4, 6, 64, generator=g), mlps=torch.randn(5, 6, 64, generator=g),
                           counts=torch.full((6,), 4))
    remove_components(model, {1: [0]}, [3], means, ablation="mean")
    with pytest.raises(eigenfast.UnsupportedModelError, match="position-indexed table.*ablation='zero'"):
        to_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family,setting,message", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "gpt2 graph scales attention scores by 1/sqrt"),
    ("gpt_neox", {"hidden_act": "relu"}, "gptneox graph applies GELU, the model 'relu'"),
    ("phi", {"qk_layernorm": True}, "no LayerNorm on queries and keys"),
])
def test_what_zero_filled_architectures_cannot_express_refused(family, setting, message, tmp_path):
    model = base_model(family)
    for name, value in setting.items():
        setattr(model.config, name, value)
    with pytest.raises(eigenfast.UnsupportedModelError, match=f"{message}.*to_onnx"):
        to_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_exact_gelu_written_with_a_warning(tmp_path, caplog):
    """llama.cpp computes GELU's tanh approximation: a model with the exact one is written, and told so."""
    model = base_model("gpt_neox")
    model.config.hidden_act = "gelu"
    with caplog.at_level(logging.WARNING, logger="eigenfast.serving.llamacpp"):
        to_gguf(model, tmp_path / "m.gguf")
    assert any("exact (erf) one and llama.cpp computes the tanh approximation" in r.getMessage() for r in caplog.records)


def test_bad_dtype_refused(tmp_path):
    with pytest.raises(eigenfast.ArgumentError, match="dtype must be one of"):
        to_gguf(base_model("llama"), tmp_path / "m.gguf", dtype="q4")
    assert list(tmp_path.iterdir()) == []


def test_word_level_tokenizer_written(tmp_path):
    gguf = requires("gguf")
    tokenizer = build_tokenizer()
    model = base_model("llama")
    vocab = len(tokenizer)
    model.resize_token_embeddings(vocab)
    path = to_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["tokenizer.ggml.model"] == "bert"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == vocab
    assert tokens[tokenizer.convert_tokens_to_ids("12")] == "\u258112"
    assert tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert fields["tokenizer.ggml.unknown_token_id"] == tokenizer.unk_token_id


def test_byte_level_bpe_written(tmp_path):
    gguf = requires("gguf")
    tokenizer = byte_level_bpe()
    model = base_model("gpt2")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    path = to_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    fields = {name: f.contents() for name, f in gguf.GGUFReader(str(path)).fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(merges) > 50 and fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id


def _bpe(prefix_space: bool = False, normalizer: bool = False) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    if normalizer:
        core.normalizer = normalizers.NFKC()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="a")


@pytest.mark.parametrize("settings,message", [({"prefix_space": True}, "without GPT-2's byte-level pre-tokenizer"),
                                              ({"normalizer": True}, "normalizes with NFKC")])
def test_other_tokenizers_refused(settings, message, tmp_path):
    with pytest.raises(eigenfast.UnsupportedModelError, match=f"{message}.*tokenizer=None"):
        to_gguf(base_model("llama"), tmp_path / "m.gguf", tokenizer=_bpe(**settings))
    assert list(tmp_path.iterdir()) == []


def test_regroup_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="eigenfast.serving.llamacpp"):
        to_gguf(extracted("llama"), tmp_path / "m.gguf")
    assert any("uneven groups written as 4 over 2" in r.getMessage() for r in caplog.records)


def test_every_uneven_layout_exact(tmp_path):
    """All ways to keep 3 of 4 heads over 2 KV heads, and 2 of 4 across KV heads, in one model each."""
    for kept in itertools.chain(itertools.combinations(range(4), 3), [(0, 2), (1, 3)]):
        removed = {1: [h for h in range(4) if h not in kept]}
        model = extracted("llama", heads=removed, mlps=[])
        path = to_gguf(model, tmp_path / f"{''.join(map(str, kept))}.gguf")
        ids = prompt(8)
        with torch.no_grad():
            torch.testing.assert_close(deci_reference.logits(path, ids), model(torch.tensor([ids])).logits[0],
                                       atol=1e-4, rtol=1e-4)


def test_missing_package_skips_only_outside_ci(monkeypatch):
    """.ci/run sets REQUIRE_ENV: there a missing optional package fails the test instead of skipping it."""
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="install failed"):
        requires("eigenfast_no_such_package")
    monkeypatch.delenv(REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        requires("eigenfast_no_such_package")
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert f"export {REQUIRE_ENV}=1" in ci
