"""The edge graph over the disentangled residual stream, the same for every family.

Writers (in topological order): the embeddings, then per layer its heads and its
MLP. Readers come in *groups*, one per (layer, input kind): the q inputs of the
layer's query heads, the k and v inputs of its KV heads, the MLP's input, and
finally the logits. A group reads a prefix of the writers: everything written
before it (a parallel block's MLP does not read its own layer's heads). Every
writer→reader pair of a group is an edge; a group's masks are one
``(readers, writers)`` matrix, and the graph's edges are those matrices
flattened row-major in group order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from ..adapters import Adapter


@dataclass(frozen=True)
class ReaderGroup:
    layer: int  # n_layers for the logits
    kind: str  # "q", "k", "v", "mlp" or "logits"
    n_readers: int
    n_writers: int  # the group reads writers [0, n_writers)

    @property
    def n_edges(self) -> int:
        return self.n_readers * self.n_writers

    def reader_names(self) -> list[str]:
        if self.kind == "mlp":
            return [f"L{self.layer}.MLP"]
        if self.kind == "logits":
            return ["logits"]
        return [f"L{self.layer}.H{h}.{self.kind}" for h in range(self.n_readers)]


@dataclass(frozen=True)
class EdgeGraph:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool

    @classmethod
    def of(cls, adapter: Adapter) -> "EdgeGraph":
        return cls(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, bool(adapter.parallel))

    # --- writers ----------------------------------------------------------
    def first_writer(self, layer: int) -> int:
        """Index of ``layer``'s first head; the writers before it are what the layer's attention reads."""
        return 1 + layer * (self.n_heads + 1)

    def head_writer(self, layer: int, head: int) -> int:
        return self.first_writer(layer) + head

    def mlp_writer(self, layer: int) -> int:
        return self.first_writer(layer) + self.n_heads

    @property
    def n_writers(self) -> int:
        return self.first_writer(self.n_layers)

    @cached_property
    def writer_names(self) -> list[str]:
        names = ["emb"]
        for layer in range(self.n_layers):
            names += [f"L{layer}.H{h}" for h in range(self.n_heads)] + [f"L{layer}.MLP"]
        return names

    # --- readers ----------------------------------------------------------
    @cached_property
    def groups(self) -> list[ReaderGroup]:
        """Reader groups in topological order (per layer: q, k, v, mlp; then the logits)."""
        groups = []
        for layer in range(self.n_layers):
            before = self.first_writer(layer)
            groups += [
                ReaderGroup(layer, "q", self.n_heads, before),
                ReaderGroup(layer, "k", self.n_kv_heads, before),
                ReaderGroup(layer, "v", self.n_kv_heads, before),
                ReaderGroup(layer, "mlp", 1, before if self.parallel else before + self.n_heads),
            ]
        return groups + [ReaderGroup(self.n_layers, "logits", 1, self.n_writers)]

    @cached_property
    def offsets(self) -> list[int]:
        """Where each group's edges start in the flat edge order (plus the total at the end)."""
        out = [0]
        for g in self.groups:
            out.append(out[-1] + g.n_edges)
        return out

    @property
    def n_edges(self) -> int:
        return self.offsets[-1]

    @cached_property
    def edge_names(self) -> list[tuple[str, str]]:
        """(writer, reader) of every edge, in the flat edge order."""
        names = []
        for g in self.groups:
            for reader in g.reader_names():
                names += [(w, reader) for w in self.writer_names[: g.n_writers]]
        return names

    @cached_property
    def edge_writers(self) -> torch.Tensor:
        """The writer index of every edge ``(E,)``."""
        return torch.cat([torch.arange(g.n_writers).repeat(g.n_readers) for g in self.groups])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Flat ``(..., E)`` → per group ``(..., readers, writers)`` views."""
        return [
            flat[..., a:b].unflatten(-1, (g.n_readers, g.n_writers))
            for g, a, b in zip(self.groups, self.offsets, self.offsets[1:])
        ]

    def flatten(self, per_group: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([m.flatten(-2) for m in per_group], dim=-1)

    # --- nodes ------------------------------------------------------------
    def nodes_of(self, kept: torch.Tensor) -> tuple[list[tuple[int, int]], list[int]]:
        """The heads and MLPs with at least one kept outgoing edge (``kept``: ``(E,)`` bool)."""
        used = torch.zeros(self.n_writers, dtype=torch.bool)
        used[self.edge_writers[kept.bool().cpu()]] = True
        heads = [(l, h) for l in range(self.n_layers) for h in range(self.n_heads) if used[self.head_writer(l, h)]]
        mlps = [l for l in range(self.n_layers) if used[self.mlp_writer(l)]]
        return heads, mlps

    def edges_of_nodes(self, heads: Sequence[tuple[int, int]], mlps: Sequence[int]) -> torch.Tensor:
        """``(E,)`` bool: every edge out of the embeddings and the given heads and MLPs."""
        on = torch.zeros(self.n_writers, dtype=torch.bool)
        on[0] = True
        for layer, head in heads:
            on[self.head_writer(layer, head)] = True
        for layer in mlps:
            on[self.mlp_writer(layer)] = True
        return on[self.edge_writers]
