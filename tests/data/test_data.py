"""Task data: the paper's synthetic tasks, JSONL, left padding, and clear errors for bad input."""
from __future__ import annotations

import json

import pytest
import torch

import eigenfast
from eigenfast.builtin.tokenizer import build_tokenizer
from eigenfast.data.task_data import (
    DataError,
    TaskData,
    as_task_data,
    check_fits_model,
    from_jsonl,
    from_pairs,
    int_mult,
    int_mult_pairs,
    int_sum,
    int_sum_pairs,
    positions_from_mask,
)
from eigenfast.data.tasks import check_task, load_task


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_int_sum_and_int_mult_match_the_paper(tok):
    prompts, targets = int_sum_pairs()
    assert len(prompts) == 10_000 and prompts[0] == "0 + 0 =" and targets[-1] == " 198"
    prompts, targets = int_mult_pairs()
    assert len(prompts) == 400 and prompts[-1] == "19 x 19 =" and targets[-1] == " 361"
    data = int_sum(tok)
    assert data.input_ids.shape == (10_000, 4) and data.attention_mask is None
    assert tok.decode(data.labels[:3]).split() == ["0", "1", "2"]
    assert len(int_mult(tok)) == 400


def test_split_is_seeded_80_20_and_disjoint(tok):
    data = int_mult(tok)
    train, test = data.split(0.8, seed=0)
    again, _ = data.split(0.8, seed=0)
    other, _ = data.split(0.8, seed=1)
    assert (len(train), len(test)) == (320, 80)
    assert train.prompts == again.prompts and train.prompts != other.prompts
    assert not set(train.prompts) & set(test.prompts)


def test_left_padding_and_true_positions(tok):
    data = from_pairs(["1 + 2 =", "3 ="], [" 3", " 3"], tok)
    assert data.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert data.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert data.max_length == 4
    short = data.subset([1])
    assert short.input_ids.shape == (1, 2) and short.attention_mask is None


def test_positions_from_mask_counts_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2]]


def test_multi_token_target_is_refused_with_the_fix(tok):
    with pytest.raises(DataError, match=r"target ' 1 2' .* is 2 tokens.*one-token"):
        from_pairs(["1 + 0 ="], [" 1 2"], tok)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.zeros(0, 4, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}, "length mismatch"),
        ({"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": torch.zeros(3, 2, dtype=torch.long)}, "one target token"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long),
          "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, "left padding"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long),
          "attention_mask": torch.ones(2, 4, dtype=torch.long)}, "shape of input_ids"),
        ({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)}, "integer token ids"),
    ],
)
def test_bad_tensors_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        as_task_data(kwargs)


def test_dicts_need_the_right_keys():
    with pytest.raises(DataError, match="missing"):
        as_task_data({"input_ids": torch.zeros(1, 1, dtype=torch.long)})
    with pytest.raises(DataError, match="unknown keys"):
        as_task_data({"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.zeros(1, dtype=torch.long), "x": 1})
    with pytest.raises(DataError, match="expected TaskData"):
        as_task_data([1, 2])


def test_jsonl_loader(tmp_path, tok):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "target": f" {i + 1}"}) for i in range(5)) + "\n")
    data = from_jsonl(path, tok)
    assert isinstance(data, TaskData) and len(data) == 5
    assert len(load_task(str(path), tok)) == 5
    path.write_text('{"prompt": "1 ="}\n')
    with pytest.raises(DataError, match=":1: each line must be"):
        from_jsonl(path, tok)
    path.write_text("not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        from_jsonl(path, tok)
    path.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        from_jsonl(path, tok)
    with pytest.raises(DataError, match="unknown task"):
        load_task("int_div", tok)


def test_targets_that_tokenize_to_the_unknown_token_are_refused(tok):
    with pytest.raises(DataError, match=r"target ' apple' .* unknown token '<unk>'"):
        from_pairs(["1 + 0 ="], [" apple"], tok)


def test_task_names_are_checked_without_a_tokenizer(tmp_path):
    check_task("int_sum")
    (tmp_path / "t.jsonl").write_text("")
    check_task(str(tmp_path / "t.jsonl"))
    with pytest.raises(DataError, match="no such data file"):
        check_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown task"):
        check_task("int_div")


def _tiny_model():
    from conftest import make_model

    return make_model("gpt2")  # vocabulary of 40, pad token id 0


@pytest.mark.parametrize("field, message", [("input_ids", "an input id is 40"), ("labels", "a label is 45")])
def test_ids_outside_the_vocabulary_are_refused_before_any_work(field, message):
    from conftest import VOCAB, make_data

    data = make_data()
    if field == "input_ids":
        data.input_ids[3, 2] = VOCAB
    else:
        data.labels[1] = VOCAB + 5
    model = _tiny_model()
    with pytest.raises(DataError, match=f"{message}, outside the model's vocabulary of 40 tokens"):
        check_fits_model(data, model)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        eigenfast.prune(model, data, p=0.1, progress=False)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        eigenfast.extract_circuit(model, data, data, threshold=0.1, progress=False, latency_repeats=0)


def test_left_padding_without_a_mask_is_refused():
    from conftest import make_data

    padded = make_data(padded=True)
    model = _tiny_model()
    check_fits_model(padded, model)  # with its mask: fine
    unmasked = {"input_ids": padded.input_ids, "labels": padded.labels}
    with pytest.raises(DataError, match="start with the pad token id 0 but the data has no attention_mask"):
        eigenfast.prune(model, unmasked, p=0.1, progress=False)


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("-inf")])
def test_bad_thresholds_are_refused_before_any_work(threshold):
    from conftest import make_data

    data = make_data()
    with pytest.raises(eigenfast.ArgumentError, match="threshold must be a number >= 0"):
        eigenfast.extract_circuit(_tiny_model(), data, data, threshold=threshold, progress=False)


def test_a_target_that_tokenizes_to_nothing_names_the_likely_cause(tok):
    with pytest.raises(DataError, match="tokenizes to nothing.*tokenizer files"):
        from_pairs(["1 + 0 ="], [""], tok)
