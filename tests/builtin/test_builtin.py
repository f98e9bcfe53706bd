"""The shipped models: offline loading, tokenizer, recorded accuracy, size, determinism."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from eigenfast.builtin import BUILTIN_MODELS, builtin_path, heldout_task, load_builtin
from eigenfast.builtin.train import int_sum_split
from eigenfast.data.task_data import int_mult_pairs, int_sum_pairs

from conftest import start_training

MAX_SHIPPED_BYTES = 10 * 1024 * 1024
MAX_ALL_SHIPPED_BYTES = 20 * 1024 * 1024
# The models trained on the int_sum train split, with the HF model_type each must load as, and the
# module whose ``--out DIR`` run trains it.
INT_SUM_MODELS = {
    "int_sum_gpt2": ("gpt2", "eigenfast.builtin.train"),
    "int_sum_llama": ("llama", "eigenfast.builtin.train_llama"),
}


@pytest.fixture(scope="module", params=sorted(INT_SUM_MODELS))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def builtin(name):
    return load_builtin(name)


@pytest.fixture(scope="module")
def record(name) -> dict:
    return json.loads((builtin_path(name) / "training.json").read_text(encoding="utf-8"))


def test_loads_in_eval_float32(builtin):
    model, tokenizer = builtin
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.padding_side == "left"
    assert {tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token} == {"<pad>", "<unk>", "<eos>"}


def test_loads_with_plain_auto_classes_offline(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.model_type == INT_SUM_MODELS[name][0]
    assert len(tokenizer("12 + 7 =")["input_ids"]) == 4


def test_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match="int_sum_gpt2"):
        builtin_path("no_such_model")
    with pytest.raises(ValueError, match="available"):
        load_builtin("no_such_model")
    assert "int_sum_gpt2" in BUILTIN_MODELS


@pytest.mark.parametrize("pairs", [int_sum_pairs, int_mult_pairs], ids=["int_sum", "int_mult"])
def test_every_target_is_one_token_and_every_prompt_four(builtin, pairs):
    _, tokenizer = builtin
    prompts, targets = pairs()
    for target in set(targets):
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, target
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) == 4 and tokenizer.unk_token_id not in ids, prompt


def test_test_split_accuracy_matches_training_record(builtin, record):
    model, tokenizer = builtin
    _, test = int_sum_split(tokenizer)
    assert len(test) == record["split"]["test"]
    with torch.no_grad():
        logits = model(**test.model_inputs()).logits[:, -1]
    correct = int((logits.argmax(dim=-1) == test.labels).sum())
    # The exact count: the record is what the shipped weights answer, not a neighbouring checkpoint's score.
    assert correct == round(record["final_test_accuracy"] * len(test))
    # The shipped model must leave room for pruning to help, and be well above chance.
    assert 0.30 <= correct / len(test) <= 0.90


def test_shipped_folder_is_small(name):
    size = sum(f.stat().st_size for f in builtin_path(name).rglob("*") if f.is_file())
    assert size <= MAX_SHIPPED_BYTES, f"{size / 2**20:.1f} MiB"


def test_all_shipped_models_together_are_small():
    size = sum(f.stat().st_size for name in BUILTIN_MODELS for f in builtin_path(name).rglob("*") if f.is_file())
    assert size <= MAX_ALL_SHIPPED_BYTES, f"{size / 2**20:.1f} MiB"


def test_every_builtin_model_loads_offline():
    for name in BUILTIN_MODELS:
        model, tokenizer = load_builtin(name)
        assert not model.training and model.config.vocab_size == len(tokenizer), name


def strong_computation_routed_around(m: dict[str, float]) -> bool:
    """The sum is computed at least half the time, the echo wins at least half the time, and the task as
    prompted is answered at most a quarter as often as the sum in its own format."""
    return m["sum_is"] >= 0.5 and m["sum_echo"] >= 0.5 and m["int_sum"] <= m["sum_is"] / 4


# Each test bed's criterion, fixed before pruning (docs/EIGENPRUNING_TABLE.md), on unpruned held-out accuracies.
CONFLICT_CRITERIA = {
    # the sum is computed in the trained format at least twice as often as the task, as prompted, is answered
    "conflict_gpt2": lambda m: m["sum_is"] >= 2 * m["int_sum"],
    "conflict2_gpt2": strong_computation_routed_around,
    "conflict3_gpt2": strong_computation_routed_around,
}


@pytest.mark.parametrize("name", sorted(CONFLICT_CRITERIA))
def test_conflict_model_has_the_computation_and_the_interference_it_records(name):
    from eigenfast.builtin.train_conflict import DESIGNS, diagnostics
    from eigenfast.runtime.forward import evaluate

    design = DESIGNS[name]
    model, tokenizer = load_builtin(name)
    record = json.loads((builtin_path(name) / "training.json").read_text(encoding="utf-8"))["final"]
    measured = {key: evaluate(model, data).accuracy for key, data in diagnostics(tokenizer, design).items()}
    measured["int_sum"] = evaluate(model, heldout_task(name, "int_sum", tokenizer)).accuracy
    for key, accuracy in measured.items():
        assert accuracy == pytest.approx(record[f"{key}_accuracy"], abs=0.005), key
    assert CONFLICT_CRITERIA[name](measured), measured


# The Llama's run shares the GPT-2's loop (only the model differs), so its own check is in the slow suite.
@pytest.mark.parametrize("module", ["eigenfast.builtin.train",
                                    pytest.param("eigenfast.builtin.train_llama", marks=pytest.mark.slow)])
def test_training_is_deterministic(tmp_path, module):
    # Two separate processes (run side by side, each pinned to one thread): a rerun in the
    # same process could hide state leaking between runs.
    outs = [tmp_path / "a", tmp_path / "b"]
    runs = [start_training(out, steps=2, module=module) for out in outs]
    for run in runs:
        log, _ = run.communicate(timeout=300)
        assert run.returncode == 0, log
    first, second = (load_file(out / "model.safetensors") for out in outs)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    record = json.loads((outs[0] / "training.json").read_text(encoding="utf-8"))
    assert record["steps"] == 2 and record["seed"] == 0
