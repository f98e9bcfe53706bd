"""Any method's node-level circuit, physically extracted: a smaller, faster model (docs/MATH.md §4, the removal path).

A head or MLP with no kept outgoing edge leaves the model. The circuit was found
with the counterfactual activations in its place; the extracted model puts the
node's mean over ``patch_data`` there instead (the corrupted set is the natural
choice), or zero, since a removed module no longer sees any particular input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..data.task_data import TaskData
from ..errors import ArgumentError
from ..rewrite.removal import check_ablation, check_plain_removal, remove_pruned
from ..runtime.means import component_means
from ..runtime.sizes import ParameterCount, count_parameters
from ..saving.results import ModelResult, heads_by_layer, kept_masks


@dataclass
class NodeCircuitResult(ModelResult):
    """The model cut down to a circuit's nodes (same HF class, physically smaller); ``.save(folder)``."""

    kind = "node circuit"
    model: nn.Module
    heads: list[tuple[int, int]]  # kept (layer, head)
    mlps: list[int]  # layers whose MLP was kept
    method: str  # what found the circuit
    ablation: str  # what the removed nodes output: their mean over patch_data, or zero
    n_layers: int
    n_heads: int
    size_before: ParameterCount
    size_after: ParameterCount
    tokenizer: Any = None

    def table(self) -> str:
        removed = 1 - self.size_after.non_embedding / self.size_before.non_embedding
        return "\n".join([
            f"node circuit of {self.method}, removed nodes output their {self.ablation}",
            f"  heads kept   {len(self.heads)}/{self.n_layers * self.n_heads}: {heads_by_layer(self.heads)}",
            f"  MLPs kept    {len(self.mlps)}/{self.n_layers}: {self.mlps}",
            f"  size before  {self.size_before.describe()}",
            f"  size after   {self.size_after.describe()}; {removed:.1%} of non-embedding removed",
        ])

    def saved_report(self) -> dict[str, Any]:
        return {
            "method": self.method, "ablation": self.ablation, "heads": [list(h) for h in self.heads], "mlps": self.mlps,
            "size_before": self.size_before.as_dict(), "size_after": self.size_after.as_dict(),
        }

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return kept_masks(self.heads, self.mlps, self.n_layers, self.n_heads)


def extract_nodes(
    model: nn.Module,
    circuit: Any,
    patch_data: "TaskData | dict | None",
    ablation: str = "mean",
    extrapolate: str = "mean",
    batch_size: int = 64,
    inplace: bool = False,
    tokenizer: Any = None,
    positions: str = "indexed",
) -> NodeCircuitResult:
    """``model`` cut down to ``circuit.heads`` and ``circuit.mlps`` (any method's result), everything else removed.

    ``tokenizer``, if given, is saved with the model by ``.save(folder)``, so the folder
    works as ``--model`` on the command line. ``positions="mean"`` gives removed nodes their mean
    over all positions, in ordinary biases (see :func:`eigenfast.extract_circuit`).
    """
    check_ablation(ablation, extrapolate, positions)
    if ablation == "mean" and patch_data is None:
        raise ArgumentError("mean ablation needs patch_data for the removed nodes' means (e.g. the corrupted data)")
    check_plain_removal(model, ablation, positions)
    adapter = get_adapter(model)
    kept_heads, kept_mlps = set(map(tuple, circuit.heads)), set(circuit.mlps)
    pruned_heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in kept_heads]
    pruned_mlps = [l for l in range(adapter.n_layers) if l not in kept_mlps]
    means = component_means(model, patch_data, batch_size) if ablation == "mean" else None
    size_before = count_parameters(model)  # before an inplace removal changes it
    smaller = remove_pruned(model, pruned_heads, pruned_mlps, means, ablation, extrapolate, inplace, positions)
    return NodeCircuitResult(
        smaller, sorted(kept_heads), sorted(kept_mlps), getattr(circuit, "method", type(circuit).__name__),
        "mean over patch_data" if ablation == "mean" else "zero", adapter.n_layers, adapter.n_heads,
        size_before, count_parameters(smaller), tokenizer,
    )
