"""What every result that holds a changed model offers: ``.model``, and ``.save(folder)`` for :func:`eigenfast.load`.

:class:`~eigenfast.prune.PruneResult`, :class:`~eigenfast.circuit.CircuitResult` and
:class:`~eigenfast.edges.NodeCircuitResult` each say what kind of change they made,
the report to keep beside the weights and the tensors that describe the change
(scores, masks); saving is the same for all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn


class ModelResult:
    """Mixin for a result dataclass with fields ``model`` and ``tokenizer``."""

    kind: ClassVar[str]  # recorded in the save's eigenfast.json
    model: nn.Module
    tokenizer: Any

    def saved_report(self) -> dict[str, Any]:
        """The run's report, kept in eigenfast.json."""
        raise NotImplementedError

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors kept beside the weights (extras.safetensors, read with :func:`eigenfast.serialization.load_extras`)."""
        raise NotImplementedError

    def save(self, directory: str | Path, format: str = "eigenfast") -> Path:
        """safetensors + JSON (and the tokenizer, when the result has one); reload with :func:`eigenfast.load`.

        ``format="hf"`` writes a plain transformers checkpoint instead, which
        ``AutoModelForCausalLM.from_pretrained(folder)`` loads without eigenfast; only a model
        that is still an ordinary instance of its HF class can be (eigenfast/saving/hf_checkpoint.py).
        """
        from .serialization import save_model

        return save_model(self.model, directory, kind=self.kind, report=self.saved_report(),
                          tensors=self.saved_tensors(), tokenizer=self.tokenizer, format=format)


def kept_masks(heads: list[tuple[int, int]], mlps: list[int], n_layers: int, n_heads: int) -> dict[str, torch.Tensor]:
    """A node circuit's kept heads ``(layers, heads)`` and MLPs ``(layers,)`` as uint8 masks."""
    head_mask = torch.zeros(n_layers, n_heads, dtype=torch.uint8)
    for layer, head in heads:
        head_mask[layer, head] = 1
    mlp_mask = torch.zeros(n_layers, dtype=torch.uint8)
    mlp_mask[list(mlps)] = 1
    return {"circuit.heads": head_mask, "circuit.mlps": mlp_mask}


def heads_by_layer(heads: Sequence[tuple[int, int]]) -> str:
    """Kept heads as a result prints them: ``L0:1,3 L2:0``."""
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(layer, []).append(head)
    return " ".join(f"L{layer}:{','.join(map(str, hs))}" for layer, hs in sorted(layers.items())) or "none"
