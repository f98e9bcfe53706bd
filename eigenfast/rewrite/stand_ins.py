"""Stand-ins for what circuit extraction removed or cut (eigenfast/rewrite/removal.py).

A cut projection keeps its source's memory layout (``PlainLinear`` or ``PlainConv1D``);
a removed component's output becomes a per-position mean (``PositionMean``, mean
ablation) or a constant (``ConstantOutput``, zero ablation); an attention with no head
left is a ``RemovedAttention`` around one of those; a norm nothing reads any more is a
``RemovedNorm``. Each records a JSON ``spec()`` and rebuilds empty ``from_spec``, so a
saved model loads without pickle.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.projection import PositionalModule
from .position_tables import PositionTable


class PlainLinear(nn.Linear):
    """A projection cut down to the kept heads; records its size so a saved model can be rebuilt."""

    kind = "linear"

    def spec(self) -> dict[str, Any]:
        return {"d_in": self.in_features, "d_out": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PlainLinear":
        return cls(spec["d_in"], spec["d_out"], bias=spec["bias"])


class PlainConv1D(Conv1D):
    """A GPT-2 projection cut down to the kept heads, still in Conv1D's (d_in, d_out) layout."""

    kind = "conv1d"

    def spec(self) -> dict[str, Any]:
        return {"d_in": self.nx, "d_out": self.nf}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PlainConv1D":
        return cls(spec["d_out"], spec["d_in"])


class PositionMean(PositionTable):
    """Stands in for a removed component under mean ablation: returns ``table[pos]``, whatever its input."""

    kind = "position_mean"

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.table.to(x.dtype)[self.read_at(positions, x.shape[:-1])]

    def spec(self) -> dict[str, Any]:
        return {"dim": self.table.shape[1], **self.spec_fields()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PositionMean":
        return cls(spec["calib_len"], spec["dim"], spec["extrapolate"])


class ConstantOutput(PositionalModule):
    """Stands in for a removed component under zero ablation: returns a constant (a leftover bias, or zeros)."""

    kind = "constant_output"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.value.to(x.dtype).expand(*x.shape[:-1], self.value.shape[0])

    def spec(self) -> dict[str, Any]:
        return {"dim": self.value.shape[0]}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ConstantOutput":
        return cls(spec["dim"])


# What a RemovedAttention may return: the two output stand-ins, by the kind its spec records.
OUTPUT_KINDS: dict[str, type[nn.Module]] = {}


class RemovedAttention(PositionalModule):
    """An attention layer with every head removed: returns its stand-in's output as attention does, ``(out, None)``.

    It still appends a one-wide placeholder to its KV-cache entry, because transformers
    reads the sequence length during generation off the cache (layer 0 first).
    """

    kind = "removed_attention"

    def __init__(self, output: nn.Module, layer_idx: int) -> None:
        super().__init__()
        self.output = output
        self.layer_idx = layer_idx

    def forward(
        self, hidden_states: torch.Tensor, positions: torch.Tensor, attention_mask: Any, cache: Any, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        if cache is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return self.output(hidden_states, positions), None

    def spec(self) -> dict[str, Any]:
        return {"layer_idx": self.layer_idx, "output": {"kind": self.output.kind, "spec": self.output.spec()}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "RemovedAttention":
        output = OUTPUT_KINDS[spec["output"]["kind"]].from_spec(spec["output"]["spec"])
        return cls(output, spec["layer_idx"])


class RemovedNorm(nn.Identity):
    """Where a norm fed only removed components: nothing reads its output any more."""

    kind = "removed_norm"

    def spec(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "RemovedNorm":
        return cls()


OUTPUT_KINDS.update({cls.kind: cls for cls in (PositionMean, ConstantOutput)})
