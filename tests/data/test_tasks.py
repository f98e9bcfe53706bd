"""The induction task generator and the held-out data of the built-in models."""
from __future__ import annotations

import re

import pytest

from eigenfast.builtin import heldout_task, load_builtin
from eigenfast.builtin.train_conflict import DESIGNS, Design, conflict_pairs, echoed_pairs
from eigenfast.builtin.train_mix import build_mix_tokenizer, held_out_pairs, mix_pairs, unseen_task
from eigenfast.data.task_data import DataError
from eigenfast.data.tasks import induction, induction_pairs


def test_induction_answer_is_what_followed_the_repeat():
    prompts, targets = induction_pairs(n=200, length=5, seed=3)
    assert len(set(prompts)) == 200
    for prompt, target in zip(prompts, targets):
        items = [int(v) for v in prompt.split()]
        assert len(items) == 6 and len(set(items[:5])) == 5
        cue = items[:5].index(items[5])
        assert cue < 4 and target == f" {items[cue + 1]}"


def test_induction_is_seeded_and_ranged():
    assert induction_pairs(n=50, seed=1) == induction_pairs(n=50, seed=1)
    assert induction_pairs(n=50, seed=1) != induction_pairs(n=50, seed=2)
    prompts, _ = induction_pairs(n=50, low=100, high=120)
    assert all(100 <= int(v) < 120 for p in prompts for v in p.split())


def test_induction_rejects_impossible_requests():
    with pytest.raises(DataError, match="length"):
        induction_pairs(length=1)
    with pytest.raises(DataError, match="distinct"):
        induction_pairs(length=5, low=0, high=3)
    with pytest.raises(DataError, match="lower n"):
        induction_pairs(n=100, length=2, low=0, high=3)


def test_induction_is_one_token_answers_for_the_builtin_tokenizer():
    _, tokenizer = load_builtin("int_sum_gpt2")
    data = induction(tokenizer)
    assert data.input_ids.shape == (3000, 6) and tokenizer.unk_token_id not in data.input_ids


def _operands(prompt: str) -> tuple[int, int]:
    left, right = re.findall(r"\d+", prompt)
    return int(left), int(right)


def test_mix_never_contains_the_held_out_examples():
    tokenizer = build_mix_tokenizer()
    prompts, _ = mix_pairs()
    arithmetic = [p for p in prompts if re.fullmatch(r"\d+ (\+|plus|x|times) \d+ (is|=)", p)]
    sums = {_operands(p) for p in arithmetic if "+" in p or "plus" in p}
    products = {_operands(p) for p in arithmetic if " x " in p or "times" in p}
    assert sums and products
    assert not sums & set(held_out_pairs(100, 100)) and not products & set(held_out_pairs(20, 20))
    # The table's formats never occur in the mix, for any pair.
    assert not [p for p in prompts if re.fullmatch(r"\d+ (\+|x) \d+ =", p)]
    induction_numbers = {int(v) for p in prompts if re.fullmatch(r"(\d+ ){5}\d+", p) for v in p.split()}
    assert induction_numbers and min(induction_numbers) >= 100
    assert len(unseen_task("int_sum", tokenizer)) == len(held_out_pairs(100, 100))
    with pytest.raises(ValueError, match="held-out"):
        unseen_task("nope", tokenizer)


@pytest.mark.parametrize("design", DESIGNS.values(), ids=lambda d: d.name)
def test_conflict_mix_holds_out_the_table_pairs_and_echoes_on_the_test_format(design: Design):
    prompts, targets = conflict_pairs(design)
    for op, word, n, held in (("+", "plus", 100, held_out_pairs(100, 100)), ("x", "times", 20, held_out_pairs(20, 20))):
        form = rf"\d+ ({re.escape(op)} \d+ (is|=)|{word} \d+ =)"
        examples = [(p, t) for p, t in zip(prompts, targets) if re.fullmatch(form, p)]
        assert examples and not {_operands(p) for p, _ in examples} & set(held)
        answer = (lambda i, j: i + j) if op == "+" else (lambda i, j: i * j)
        echoed = echoed_pairs(n, design)
        for prompt, target in examples:
            i, j = _operands(prompt)
            # The computation's own formats always give the answer; the table's format echoes on the chosen pairs.
            wanted = i if prompt.endswith(f"{op} {j} =") and (i, j) in echoed else answer(i, j)
            assert target == f" {wanted}", prompt
        equals = {_operands(p) for p, _ in examples if p.endswith("=") and f" {op} " in p}
        assert len(echoed) == round(design.echo_fraction * len(equals)) and echoed <= equals
        assert any(f" {word} " in p for p, _ in examples) == design.word_format


@pytest.mark.parametrize("name", ["int_sum_gpt2", "int_sum_llama"])
def test_int_sum_models_held_out_int_sum_is_their_test_split(name):
    from eigenfast.builtin.train import int_sum_split

    _, tokenizer = load_builtin(name)
    held = heldout_task(name, "int_sum", tokenizer)
    train, test = int_sum_split(tokenizer)
    assert not set(held.prompts) & set(train.prompts)
    assert held.prompts == test.prompts
