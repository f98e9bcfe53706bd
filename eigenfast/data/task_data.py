"""Task data: single-token-answer prompts as tensors.

A task is a set of examples ``(prompt, target)`` whose target is exactly one
token. Tensors are left-padded so that every example's last real token sits in
the last column: the loss and the KL read position ``T - 1`` of every row.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..adapters.position_table import position_limit
from ..errors import ArgumentError, DataError


@dataclass
class TaskData:
    """``input_ids (N, T)``, ``labels (N,)`` and an optional left-padding ``attention_mask (N, T)``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: list[str] | None = field(default=None, repr=False)
    targets: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _validate(self.input_ids, self.labels, self.attention_mask)
        if self.attention_mask is not None and bool(self.attention_mask.all()):
            self.attention_mask = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def mask(self) -> torch.Tensor:
        """The attention mask, all ones when the data has no padding."""
        if self.attention_mask is None:
            return torch.ones_like(self.input_ids)
        return self.attention_mask

    @property
    def position_ids(self) -> torch.Tensor:
        """True token positions (left padding does not count); padded slots get 0."""
        return positions_from_mask(self.mask)

    @property
    def max_length(self) -> int:
        """The longest real sequence: the calibration length of statistics taken on this data."""
        return int(self.mask.sum(dim=1).max())

    def subset(self, index: torch.Tensor | Sequence[int]) -> "TaskData":
        index = torch.as_tensor(index, dtype=torch.long)
        mask = None if self.attention_mask is None else self.attention_mask[index]
        ids = self.input_ids[index]
        if mask is not None:
            # Drop columns that are padding in every remaining row.
            keep = int(mask.sum(dim=1).max())
            ids, mask = ids[:, -keep:], mask[:, -keep:]
        pick = index.tolist()
        return TaskData(
            ids,
            self.labels[index],
            mask,
            None if self.prompts is None else [self.prompts[i] for i in pick],
            None if self.targets is None else [self.targets[i] for i in pick],
        )

    def split(self, train_fraction: float = 0.8, seed: int = 0) -> tuple["TaskData", "TaskData"]:
        """A seeded random split into (train, test)."""
        if not 0.0 < train_fraction < 1.0:
            raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
        if len(self) < 2:
            raise DataError(f"cannot split {len(self)} example(s); give at least 2")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_train = min(max(1, round(train_fraction * len(self))), len(self) - 1)
        return self.subset(order[:n_train]), self.subset(order[n_train:])

    def batches(self, batch_size: int) -> Iterator["TaskData"]:
        """Consecutive batches, in order (the last may be smaller)."""
        check_batch_size(batch_size)
        for start in range(0, len(self), batch_size):
            yield self.subset(range(start, min(start + batch_size, len(self))))

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for a HF forward: ids, mask and true position ids."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ArgumentError(f"batch_size must be a whole number >= 1, got {batch_size!r}")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, as HF ``generate`` computes them."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _validate(input_ids: Any, labels: Any, attention_mask: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError("input_ids and labels must be torch tensors")
    if input_ids.dim() != 2:
        raise DataError(f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise DataError("the data set is empty: give at least one example with at least one token")
    if labels.dim() != 1:
        raise DataError(
            f"labels must be (N,) with one target token per example, got shape {tuple(labels.shape)}; "
            "eigenfast scores single-token answers: shorten multi-token targets to their first token "
            "or choose a task whose answers are one token"
        )
    if labels.shape[0] != input_ids.shape[0]:
        raise DataError(
            f"length mismatch: {input_ids.shape[0]} input rows but {labels.shape[0]} labels; "
            "give exactly one label per example"
        )
    if input_ids.dtype not in (torch.int64, torch.int32) or labels.dtype not in (torch.int64, torch.int32):
        raise DataError("input_ids and labels must be integer token ids")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise DataError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise DataError(
            f"attention_mask must hold only 0 (padding) and 1 (real token), got {attention_mask.unique().tolist()[:8]}; "
            "pass the mask the tokenizer returned"
        )
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise DataError("some examples have no real token (their attention_mask row is all zeros)")
    if not bool((attention_mask[:, -1] == 1).all()) or bool((attention_mask.diff(dim=1) < 0).any()):
        raise DataError(
            "attention_mask must be left padding (0s then 1s, last column real); "
            "re-tokenize with tokenizer.padding_side = 'left'"
        )


def as_task_data(data: "TaskData | Mapping[str, torch.Tensor]") -> TaskData:
    """Accept the package's TaskData or a plain dict of tensors."""
    if isinstance(data, TaskData):
        return data
    if isinstance(data, Mapping):
        missing = {"input_ids", "labels"} - set(data)
        if missing:
            raise DataError(f"data dict is missing {sorted(missing)}; it needs 'input_ids' and 'labels'")
        extra = set(data) - {"input_ids", "labels", "attention_mask"}
        if extra:
            raise DataError(f"data dict has unknown keys {sorted(extra)}; allowed: input_ids, labels, attention_mask")
        return TaskData(data["input_ids"], data["labels"], data.get("attention_mask"))
    raise DataError(f"expected TaskData or a dict of tensors, got {type(data).__name__}")


def from_pairs(prompts: Sequence[str], targets: Sequence[str], tokenizer: Any) -> TaskData:
    """Tokenize prompts (left-padded) and single-token targets with any HF tokenizer."""
    if len(prompts) == 0:
        raise DataError("the data set is empty: give at least one (prompt, target) pair")
    if len(prompts) != len(targets):
        raise DataError(f"length mismatch: {len(prompts)} prompts but {len(targets)} targets")
    labels = []
    # One call per list: a fast tokenizer encodes a batch in one pass, ten times quicker than per string.
    for prompt, target, ids in zip(prompts, targets, _encode(tokenizer, targets)):
        if not ids:
            raise DataError(
                f"target {target!r} (prompt {prompt!r}) tokenizes to nothing: the tokenizer has no vocabulary "
                "for it; check that the tokenizer files were loaded (tokenizer.json, vocab.json...)"
            )
        if len(ids) != 1:
            raise DataError(
                f"target {target!r} (prompt {prompt!r}) is {len(ids)} tokens {ids}; eigenfast needs one-token "
                "targets: shorten it, or use a tokenizer where it is a single token"
            )
        if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
            raise DataError(
                f"target {target!r} (prompt {prompt!r}) tokenizes to the unknown token {tokenizer.unk_token!r}: "
                "the tokenizer has no token for it, so the model cannot predict it; use targets in its vocabulary"
            )
        labels.append(ids[0])
    encoded = _encode(tokenizer, prompts)
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise DataError(f"prompt {prompt!r} tokenizes to nothing")
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    return TaskData(input_ids, torch.tensor(labels), mask, list(prompts), list(targets))


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def int_sum_pairs() -> tuple[list[str], list[str]]:
    """All "i + j =" for i, j in 0..99 with answer " i+j" (paper, appendix A)."""
    pairs = [(f"{i} + {j} =", f" {i + j}") for i in range(100) for j in range(100)]
    return [p for p, _ in pairs], [t for _, t in pairs]


def int_mult_pairs() -> tuple[list[str], list[str]]:
    """All "i x j =" for i, j in 0..19 with answer " i*j" (paper, appendix A)."""
    pairs = [(f"{i} x {j} =", f" {i * j}") for i in range(20) for j in range(20)]
    return [p for p, _ in pairs], [t for _, t in pairs]


def int_sum(tokenizer: Any) -> TaskData:
    return from_pairs(*int_sum_pairs(), tokenizer)


def int_mult(tokenizer: Any) -> TaskData:
    return from_pairs(*int_mult_pairs(), tokenizer)


def from_jsonl(path: str | Path, tokenizer: Any) -> TaskData:
    """Load ``{"prompt": ..., "target": ...}`` lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start} cannot be read); save it as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    prompts, targets = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("target"), str):
            raise DataError(f'{path}:{number}: each line must be {{"prompt": "...", "target": "..."}}')
        prompts.append(row["prompt"])
        targets.append(row["target"])
    if not prompts:
        raise DataError(f"{path} holds no examples")
    return from_pairs(prompts, targets, tokenizer)


def model_data(data: "TaskData | Mapping[str, torch.Tensor]", model: Any) -> TaskData:
    """``data`` as :class:`TaskData`, refused before any work if ``model`` cannot read it (:func:`check_fits_model`)."""
    data = as_task_data(data)
    check_fits_model(data, model)
    return data


def check_fits_model(data: TaskData, model: Any) -> None:
    """Refuse data the model cannot read: ids outside its vocabulary, sequences longer than its positions,
    or left padding without a mask."""
    if any(p.is_meta for p in model.parameters()):
        raise ArgumentError(
            "the model's weights are on the meta device (created without data, e.g. under init_empty_weights): "
            "load real weights (from_pretrained, or to_empty() then load_state_dict()) before calling eigenfast"
        )
    limit = position_limit(model)
    if limit is not None and data.max_length > limit:
        raise DataError(
            f"the longest prompt is {data.max_length} tokens, but the model reads at most {limit} positions "
            "(its config's max_position_embeddings); shorten the prompts or leave out the long ones"
        )
    n_inputs = model.get_input_embeddings().num_embeddings
    n_outputs = model.get_output_embeddings().weight.shape[0]
    for name, ids, size in (("an input id", data.input_ids, n_inputs), ("a label", data.labels, n_outputs)):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise DataError(
                f"{name} is {high if high >= size else low}, outside the model's vocabulary of {size} tokens: "
                "the data was tokenized with another tokenizer; tokenize it with the model's own"
            )
    pad = getattr(model.config, "pad_token_id", None)
    if data.attention_mask is None and isinstance(pad, int):
        starts_with_pad = data.input_ids[:, 0] == pad
        if bool(starts_with_pad.any()) and not bool(starts_with_pad.all()):
            raise DataError(
                f"{int(starts_with_pad.sum())} of {len(data)} rows start with the pad token id {pad} but the data "
                "has no attention_mask: padded slots would be read as real tokens; give the attention_mask "
                "(0 for padding, 1 for real tokens) with the input_ids"
            )

