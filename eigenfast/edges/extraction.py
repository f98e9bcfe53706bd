"""Any method's node-level circuit, physically extracted: a smaller, faster model (docs/MATH.md §4, the removal path).

A head or MLP with no kept outgoing edge leaves the model. The circuit was found
with the counterfactual activations in its place; the extracted model puts the
node's mean over ``patch_data`` there instead (the corrupted set is the natural
choice), or zero, since a removed module no longer sees any particular input.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import get_adapter
from ..data.task_data import TaskData
from ..rewrite.removal import check_ablation, remove_pruned
from ..runtime.means import component_means


def extract_nodes(
    model: nn.Module,
    circuit: Any,
    patch_data: "TaskData | dict | None",
    ablation: str = "mean",
    extrapolate: str = "mean",
    batch_size: int = 64,
    inplace: bool = False,
) -> nn.Module:
    """``model`` cut down to ``circuit.heads`` and ``circuit.mlps`` (any method's result), everything else removed."""
    check_ablation(ablation, extrapolate)
    if ablation == "mean" and patch_data is None:
        raise ValueError("mean ablation needs patch_data for the removed nodes' means (e.g. the corrupted data)")
    adapter = get_adapter(model)
    kept_heads, kept_mlps = set(map(tuple, circuit.heads)), set(circuit.mlps)
    pruned_heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in kept_heads]
    pruned_mlps = [l for l in range(adapter.n_layers) if l not in kept_mlps]
    means = component_means(model, patch_data, batch_size) if ablation == "mean" else None
    return remove_pruned(model, pruned_heads, pruned_mlps, means, ablation, extrapolate, inplace)
