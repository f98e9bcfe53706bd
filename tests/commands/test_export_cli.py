"""``eigenfast export --gguf``: a saved extracted Llama circuit with its tokenizer becomes a GGUF file whose
forward is the model's, and so does a GPT-2 one, zero-filled with the warning printed; what the format cannot
hold is an error with nothing written."""
from __future__ import annotations

import pytest
import torch

from eigenfast.builtin.tokenizer import build_tokenizer
from eigenfast.cli import main
from eigenfast.rewrite.removal import ComponentMeans, remove_components
from eigenfast.saving.serialization import save_model

import deci_reference
import dense_reference
from gguf_cases import base_model, extracted, requires


def test_saved_circuit_exported(tmp_path, capsys):
    gguf = requires("gguf")
    tokenizer = build_tokenizer()
    model = extracted("llama")
    model.resize_token_embeddings(len(tokenizer))
    save_model(model, tmp_path / "circuit", kind="node circuit", tokenizer=tokenizer)
    out = tmp_path / "circuit.gguf"
    assert main(["export", "--model", str(tmp_path / "circuit"), "--gguf", str(out), "--dtype", "f32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    fields = {name: f.contents() for name, f in gguf.GGUFReader(str(out)).fields.items()}
    assert fields["tokenizer.ggml.model"] == "bert" and len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    ids = tokenizer("12 + 7 =", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(deci_reference.logits(out, ids), model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)


def test_saved_gpt2_circuit_exported_zero_filled(tmp_path, capsys):
    requires("gguf")
    tokenizer = build_tokenizer()
    model = extracted("gpt2")
    model.resize_token_embeddings(len(tokenizer))
    save_model(model, tmp_path / "circuit", kind="node circuit", tokenizer=tokenizer)
    out = tmp_path / "circuit.gguf"
    assert main(["export", "--model", str(tmp_path / "circuit"), "--gguf", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out
    assert "warning: GGUF gpt2: layer 0: 2 of 4 heads removed" in printed.err
    assert "no speed-up in llama.cpp for this architecture" in printed.err
    ids = tokenizer("12 + 7 =", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(dense_reference.logits(out, ids), model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)


def test_refusal_writes_nothing(tmp_path, capsys):
    """A mean-ablated circuit keeps a position-indexed table, which GGUF cannot hold."""
    requires("gguf")
    tokenizer = build_tokenizer()
    model = base_model("gpt2")
    model.resize_token_embeddings(len(tokenizer))
    g = torch.Generator().manual_seed(0)
    means = ComponentMeans(heads=torch.randn(5, 4, 6, 64, generator=g), mlps=torch.randn(5, 6, 64, generator=g),
                           counts=torch.full((6,), 4))
    remove_components(model, {1: [0]}, [3], means, ablation="mean")
    save_model(model, tmp_path / "circuit", kind="node circuit", tokenizer=tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(tmp_path / "circuit"), "--gguf", str(out)]) == 1
    assert "position-indexed table" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--gguf", "x.gguf"], ["--model", "int_sum_gpt2", "--gguf", "x.gguf", "--dtype", "q4"]])
def test_usage_errors(argv):
    assert main(["export", *argv]) == 2
