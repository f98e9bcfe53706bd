"""GGUF files run in llama.cpp itself (llama-cpp-python): logits equal eager's within 1e-3 in f32, the same
argmax in f16, greedy tokens equal to ``generate()``'s, the word-level tokenizer splitting as the HF one does.
Skipped where llama-cpp-python is not installed, except under .ci/run (gguf_cases.REQUIRE_ENV)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eigenfast.builtin.tokenizer import build_tokenizer
from eigenfast.data.task_data import int_sum_pairs
from eigenfast.serving import to_gguf
from eigenfast.serving.llamacpp import engine

from gguf_cases import CONFIGS, base_model, extracted, prompt, requires

CASES = [(family, kind) for family in sorted(CONFIGS) for kind in ("base", "extracted")]


@pytest.fixture(autouse=True)
def _llama_cpp():
    requires("gguf")
    requires("llama_cpp")


def _model(family: str, kind: str) -> torch.nn.Module:
    return base_model(family) if kind == "base" else extracted(family)


def _eager(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family,kind", CASES)
def test_f32_logits_equal_eager(family, kind, tmp_path):
    model = _model(family, kind)
    llm = engine.load(to_gguf(model, tmp_path / "m.gguf"))
    for seed in range(2):
        ids = prompt(12, seed)
        assert np.abs(engine.logits(llm, ids) - _eager(model, ids)).max() < 1e-3


@pytest.mark.parametrize("family,kind", CASES)
def test_f16_argmax_equal(family, kind, tmp_path):
    model = _model(family, kind)
    llm = engine.load(to_gguf(model, tmp_path / "m.gguf", dtype="f16"))
    ids = prompt(12)
    np.testing.assert_array_equal(engine.logits(llm, ids).argmax(-1), _eager(model, ids).argmax(-1))


@pytest.mark.parametrize("family,kind", CASES)
def test_greedy_tokens_equal_generate(family, kind, tmp_path):
    model = _model(family, kind)
    llm = engine.load(to_gguf(model, tmp_path / "m.gguf"))
    ids = prompt(6, seed=3)
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert hf  # generate() stops at the EOS token; the engine's loop does not
    assert engine.greedy(llm, ids, 10)[: len(hf)] == hf


def test_q8_0_runs_close(tmp_path):
    model = extracted("llama")
    llm = engine.load(to_gguf(model, tmp_path / "m.gguf", dtype="q8_0"))
    ids = prompt(12)
    assert np.abs(engine.logits(llm, ids) - _eager(model, ids)).max() < 0.05


def test_word_level_tokenizer_splits_as_hf(tmp_path):
    tokenizer = build_tokenizer()
    model = base_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    llm = engine.load(to_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer))
    prompts, targets = int_sum_pairs()
    for text in [*prompts[::97], "12+7=", "401 + 3 =", "  5 x 6 = "]:
        hf = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False) == hf, text
    assert llm.detokenize(tokenizer(" 19", add_special_tokens=False)["input_ids"]).decode().strip() == "19"
