"""How big a model is: parameters plus every buffer its forward reads, in elements and bytes.

Pruning adds position-indexed bias tables and extraction turns removed components into
position-indexed means; both are buffers, so a count of parameters alone would hide
them. Tied weights and shared buffers count once.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterCount:
    parameters: int
    buffers: int  # elements of every buffer (position tables, rotary frequencies, masks...)
    non_embedding: int  # parameters + buffers outside token/position embeddings and the LM head
    bytes: int  # storage of the parameters and buffers

    @property
    def total(self) -> int:
        """Parameters and buffer elements: everything the forward reads."""
        return self.parameters + self.buffers

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total, "parameters": self.parameters, "buffers": self.buffers,
            "non_embedding": self.non_embedding, "bytes": self.bytes,
        }

    def describe(self) -> str:
        return (
            f"{self.total:,} ({self.parameters:,} parameters + {self.buffers:,} buffer elements; "
            f"{self.non_embedding:,} non-embedding; {self.bytes / 2**20:.2f} MiB)"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Sizes of ``model``: see :class:`ParameterCount`."""
    tensors = {id(t): t for t in model.parameters()}
    buffers = {id(t): t for t in model.buffers() if id(t) not in tensors}
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)] + [model.get_output_embeddings()]
    embedding = {id(t) for m in tables if m is not None for t in [*m.parameters(), *m.buffers()]}
    everything = {**tensors, **buffers}
    return ParameterCount(
        parameters=sum(t.numel() for t in tensors.values()),
        buffers=sum(t.numel() for t in buffers.values()),
        non_embedding=sum(t.numel() for key, t in everything.items() if key not in embedding),
        bytes=sum(t.numel() * t.element_size() for t in everything.values()),
    )
