"""Counterfactual inputs for a task without a hand-built corrupted set."""
from __future__ import annotations

import torch

from ..data.task_data import TaskData


def corrupt_by_shuffling(data: TaskData, seed: int = 0) -> TaskData:
    """Each example paired with another of the same real length (so padding matches row for row).

    Within each length the rows are shuffled and shifted by one, so no example is its
    own counterfactual unless it is the only one of its length.
    """
    lengths = data.mask.sum(dim=1)
    generator = torch.Generator().manual_seed(seed)
    source = torch.arange(len(data))
    for length in lengths.unique().tolist():
        rows = torch.nonzero(lengths == length).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        source[rows] = rows.roll(1)
    # Left padding and equal lengths: every source row's mask is its target row's mask.
    return TaskData(data.input_ids[source], data.labels[source], data.attention_mask)
