"""Fine-tuning baselines for the eigenpruning table: what plain training does with the same data.

The paper's reference pipeline trains every parameter (Adam, lr 0.01, one pass over the
training split) before it scores and prunes, so its pruned numbers may include that step.
Here it is a baseline of its own, on the table's scoring third (the data pruning gets):

* :func:`finetune` - every parameter, Adam, one pass, next-token cross-entropy at the
  answer position (the loss eigenpruning scores).
* :func:`finetune_low_rank` - only a rank-``r`` update ``ΔA = L R`` of each selected matrix
  (the matrices eigenpruning edits; ``L`` seeded small, ``R`` zero, so training starts at
  the model), folded into the weights afterwards: the model keeps its class and size.

Both are deterministic: the example order and the low-rank start are seeded, and training
runs in eval mode (no dropout).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..adapters import get_adapter, projection_matrix
from ..data.task_data import TaskData, model_data
from ..errors import ArgumentError
from ..runtime.forward import last_logits
from ..runtime.hooks import Hooks
from .scoring import select_sites

REFERENCE_LR = 0.01  # the reference pipeline's Adam learning rate


@dataclass
class Tuned:
    """A fine-tuned copy of a model and how many values training could change."""

    model: nn.Module
    trainable: int
    lr: float


def finetune(
    model: nn.Module, data: "TaskData | dict", lr: float = REFERENCE_LR, batch_size: int = 32, epochs: int = 1,
    seed: int = 0,
) -> Tuned:
    """A copy of ``model`` with every parameter trained by Adam on ``data`` (``model`` is untouched)."""
    _check(lr, batch_size, epochs)
    tuned = copy.deepcopy(model)
    params = [p for p in tuned.parameters() if p.is_floating_point()]
    _train(tuned, model_data(data, tuned), params, lr, batch_size, epochs, seed)
    return Tuned(tuned.eval(), sum(p.numel() for p in params), lr)


def finetune_low_rank(
    model: nn.Module, data: "TaskData | dict", components: Sequence[str] = ("k",), rank: int = 1,
    lr: float = REFERENCE_LR, batch_size: int = 32, epochs: int = 1, seed: int = 0,
) -> Tuned:
    """A copy of ``model`` where only a rank-``rank`` update of each selected site's block was trained."""
    _check(lr, batch_size, epochs)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ArgumentError(f"rank must be an integer >= 1, got {rank!r}")
    tuned = copy.deepcopy(model)
    adapter = get_adapter(tuned)
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for site in select_sites(adapter, components, None):
        module = tuned.get_submodule(site.path)
        rows, cols = _block(site, projection_matrix(module).shape)
        left = nn.Parameter(torch.randn(len(rows), rank, generator=generator, dtype=torch.float64).float() / len(rows) ** 0.5)
        right = nn.Parameter(torch.zeros(rank, len(cols)))
        updates.append((module, rows.to(module.weight.device), cols.to(module.weight.device),
                        left.to(module.weight.device), right.to(module.weight.device)))
    params = [p for *_, left, right in updates for p in (left, right)]
    with Hooks(tuned) as hooks:
        for module, rows, cols, left, right in updates:
            hooks.post(module, _low_rank_hook(rows, cols, left, right))
        _train(tuned, model_data(data, tuned), params, lr, batch_size, epochs, seed)
    with torch.no_grad():
        for module, rows, cols, left, right in updates:
            A = projection_matrix(module)  # a view of the weight: the update lands in it
            A[rows.unsqueeze(1), cols.unsqueeze(0)] += (left @ right).to(A.dtype)
    return Tuned(tuned.eval(), sum(p.numel() for p in params), lr)


def matching_rank(model: nn.Module, components: Sequence[str], p: float) -> int:
    """The rank at which :func:`finetune_low_rank` trains about as many values as the rank-one terms
    that eigenpruning at ``p`` freezes hold (a term ``s u vᵀ`` of a head is ``d_in_h + d_out_h`` values)."""
    adapter = get_adapter(model)
    per_rank, terms = 0, {}
    for site in select_sites(adapter, components, None):
        rows, cols = _block(site, projection_matrix(model.get_submodule(site.path)).shape)
        per_rank += len(rows) + len(cols)
        d_in = len(rows) if site.in_index is None else site.in_index.shape[1]
        d_out = len(cols) if site.out_index is None else site.out_index.shape[1]
        count, size = terms.get(site.component, (0, 0))
        terms[site.component] = (count + site.heads * min(d_in, d_out), d_in + d_out)
    values = sum(math.floor(round(p * count, 9)) * size for count, size in terms.values())
    return max(1, round(values / per_rank))


def _check(lr: float, batch_size: int, epochs: int) -> None:
    if not lr > 0:
        raise ArgumentError(f"lr must be > 0, got {lr!r}")
    if batch_size < 1 or epochs < 1:
        raise ArgumentError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")


def _block(site, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the site's part of its module's matrix (every head of it)."""
    rows = torch.arange(shape[0]) if site.in_index is None else site.in_index.flatten().unique()
    cols = torch.arange(shape[1]) if site.out_index is None else site.out_index.flatten().unique()
    return rows, cols


def _low_rank_hook(rows: torch.Tensor, cols: torch.Tensor, left: nn.Parameter, right: nn.Parameter):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        change = (args[0][..., rows] @ left) @ right
        return output.index_add(-1, cols, change.to(output.dtype))

    return hook


def _train(
    model: nn.Module, data: TaskData, params: list[nn.Parameter], lr: float, batch_size: int, epochs: int, seed: int,
) -> None:
    """Adam over ``params`` only, the model in eval mode (no dropout: the run is a function of ``seed``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), batch_size):
                batch = data.subset(order[start:start + batch_size])
                logits = last_logits(adapter, batch)
                loss = nn.functional.cross_entropy(logits, batch.labels.to(logits.device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        for p in params:
            p.requires_grad_(False)
