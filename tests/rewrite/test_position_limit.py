"""Sequences past a model's learned positions get an error naming the limit, never a bare IndexError."""
from __future__ import annotations

import json

import pytest
import torch

import eigenfast
from eigenfast.adapters.position_table import position_limit
from eigenfast.builtin import load_builtin
from eigenfast.cli import main
from eigenfast.rewrite.position_limit import LimitedPositionEmbedding, guard_positions

from conftest import make_data, make_model
from hook_references import removed

LIMIT = 32  # conftest's gpt2 n_positions


def changed(kind: str) -> torch.nn.Module:
    model = make_model("gpt2")
    if kind == "pruned":
        return eigenfast.prune(model, make_data(), p=0.3, components=("k",), progress=False).model
    return removed(model, make_data(n=8, seed=1), heads={0: [0, 2]}, mlps=(1,))


def test_only_learned_position_tables_set_a_limit():
    assert position_limit(make_model("gpt2")) == LIMIT
    for family in ("neox", "llama", "phi"):  # rotary: no table, no hard limit
        assert position_limit(make_model(family)) is None


@pytest.mark.parametrize("kind", ["pruned", "extracted"])
def test_a_changed_model_names_the_limit_in_forward_and_generate(kind):
    model = changed(kind)
    assert isinstance(model.transformer.wpe, LimitedPositionEmbedding)
    long = torch.randint(1, 40, (1, LIMIT + 3))
    with pytest.raises(eigenfast.PositionLimitError, match=f"position {LIMIT + 2}, but the model reads at most {LIMIT}"):
        model(long)
    prompt = make_data(n=2, length=6).input_ids
    for cache in ("dynamic", "static"):
        with pytest.raises(eigenfast.PositionLimitError, match=f"must fit in {LIMIT}"):
            model.generate(prompt, max_new_tokens=LIMIT, do_sample=False, pad_token_id=0, cache_implementation=cache)
    out = model.generate(prompt, max_new_tokens=LIMIT - 6, do_sample=False, pad_token_id=0)  # exactly fits
    assert out.shape == (2, LIMIT)


def test_the_guard_changes_no_number_and_survives_a_save(tmp_path):
    model = make_model("gpt2")
    data = make_data()
    with torch.no_grad():
        before = model(**data.model_inputs()).logits
        guard_positions(model)
        torch.testing.assert_close(model(**data.model_inputs()).logits, before, rtol=0, atol=0)
    result = eigenfast.prune(model, data, p=0.2, progress=False)
    loaded = eigenfast.load(result.save(tmp_path / "m"))
    assert type(loaded.transformer.wpe) is LimitedPositionEmbedding
    assert set(loaded.state_dict()) == set(result.model.state_dict())


def test_data_longer_than_the_positions_is_refused_before_any_work():
    model = make_model("gpt2")
    long = make_data(n=4, length=LIMIT + 1)
    message = f"longest prompt is {LIMIT + 1} tokens, but the model reads at most {LIMIT} positions"
    for call in (
        lambda: eigenfast.prune(model, long, p=0.1, progress=False),
        lambda: eigenfast.evaluate(model, long),
        lambda: eigenfast.score(model, long, progress=False),
        lambda: eigenfast.extract_circuit(model, long, long, progress=False, latency_repeats=0),
        lambda: eigenfast.eap(model, long, long, progress=False),
    ):
        with pytest.raises(eigenfast.DataError, match=message):
            call()
    eigenfast.evaluate(make_model("llama"), make_data(n=4, length=40))  # rotary: longer than max_position_embeddings is fine


def test_a_jsonl_task_with_prompts_past_the_limit_is_a_clear_cli_error(tmp_path, capsys):
    task = tmp_path / "long.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "target": f" {2 * i}"} for i in range(9)]
    rows.append({"prompt": " ".join(["1 +"] * 10) + " 1 =", "target": " 11"})  # 22 tokens; the built-in models read 16
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["eval", "--model", "int_sum_gpt2", "--task", str(task), "--split", "all"]) == 1
    err = capsys.readouterr().err
    assert "error: the longest prompt is 22 tokens, but the model reads at most 16 positions" in err, err


def test_the_builtin_model_names_the_limit_in_generate():
    model, tokenizer = load_builtin("int_sum_gpt2")
    batch = tokenizer(["12 + 34 ="], return_tensors="pt")
    with pytest.raises(eigenfast.PositionLimitError, match="at most 16 positions"):
        model.generate(**batch, max_new_tokens=32, cache_implementation="static")
