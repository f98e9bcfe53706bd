"""Circuits of a given size from a method's edge scores, as the MIB benchmark builds them.

Two rules, each ranking edges by their scores as they are (``absolute=False``) or by
``|score|`` (``absolute=True``). MIB uses both: circuits of the signed scores for CPR,
where an edge that works against the answer should come last, and of ``|score|`` for
CMD, where any edge that moves the metric matters.

* **top-n**: the ``n`` highest-scoring edges, then :func:`prune_dangling`;
* **greedy**: grow the circuit from the logits backwards. The candidates are the
  edges into nodes already in the circuit (at first only the logits); the best
  candidate joins, and when its writer was not yet in the circuit, the edges into
  that writer become candidates too. ``n`` edges are taken this way (fewer when the
  candidates run out), then :func:`prune_dangling`. Every edge taken is connected
  to the logits, so a greedy circuit keeps its size better than a top-n one.

:func:`prune_dangling` removes what cannot carry anything from the inputs to the
logits: a head or MLP with no kept edge out of it or none into it, and every edge
out of or into such a node, repeated until nothing changes (the embeddings count
as having an input, the logits as having an output). Edges can only be removed,
so a circuit may end smaller than ``n``.
"""
from __future__ import annotations

import heapq
from functools import lru_cache

import torch

from ..errors import ArgumentError
from .graph import EdgeGraph

SELECTIONS = ("top_n", "greedy")


@lru_cache(maxsize=16)
def _readers(graph: EdgeGraph) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(reader of every edge ``(E,)``, which writer nodes each reader feeds ``(R, W)``, the logits' reader index)."""
    of_edge, feeds = [], []
    group_size = graph.n_heads // graph.n_kv_heads
    for g in graph.groups:
        for reader in range(g.n_readers):
            row = torch.zeros(graph.n_writers, dtype=torch.bool)
            if g.kind == "q":
                row[graph.head_writer(g.layer, reader)] = True
            elif g.kind in ("k", "v"):  # a KV head feeds every query head that shares it (GQA)
                for head in range(reader * group_size, (reader + 1) * group_size):
                    row[graph.head_writer(g.layer, head)] = True
            elif g.kind == "mlp":
                row[graph.mlp_writer(g.layer)] = True
            of_edge.append(torch.full((g.n_writers,), len(feeds), dtype=torch.long))
            feeds.append(row)
    return torch.cat(of_edge), torch.stack(feeds), len(feeds) - 1


def prune_dangling(graph: EdgeGraph, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` without the edges of nodes that have no kept edge in or no kept edge out (to a fixed point)."""
    of_edge, feeds, logits = _readers(graph)
    writers = graph.edge_writers
    kept = kept.bool().cpu().clone()
    while True:
        has_out = torch.zeros(graph.n_writers, dtype=torch.bool)
        has_out[writers[kept]] = True
        has_in = feeds[of_edge[kept]].any(0)
        has_in[0] = True  # the embeddings read the input
        nodes = has_out & has_in
        reader_on = (feeds & nodes).any(1)
        reader_on[logits] = True
        pruned = kept & nodes[writers] & reader_on[of_edge]
        if torch.equal(pruned, kept):
            return kept
        kept = pruned


def _check(graph: EdgeGraph, scores: torch.Tensor, n: int, absolute: bool) -> torch.Tensor:
    if scores.shape != (graph.n_edges,):
        raise ArgumentError(f"got {tuple(scores.shape)} edge scores; this model's graph has {graph.n_edges} edges: "
                            "pass one score per edge, in the graph's edge order")
    if not 0 <= n <= graph.n_edges:
        raise ArgumentError(f"a circuit of {n} edges is impossible: choose 0 to {graph.n_edges}")
    if not torch.isfinite(scores).all():
        raise ArgumentError("edge scores must be finite; replace NaN or infinite scores before building circuits")
    scores = scores.detach().double().cpu()
    return scores.abs() if absolute else scores


def top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``(E,)`` bool: the ``n`` edges with the highest scores (ties: the earlier edge)."""
    kept = torch.zeros(len(scores), dtype=torch.bool)
    kept[torch.argsort(scores.cpu(), descending=True, stable=True)[:n]] = True
    return kept


def top_n(graph: EdgeGraph, scores: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """``(E,)`` bool: the ``n`` edges of largest ``|score|`` (or score) (ties: the earlier edge), dangling ones pruned."""
    return prune_dangling(graph, top(_check(graph, scores, n, absolute), n))


def greedy(graph: EdgeGraph, scores: torch.Tensor, n: int, absolute: bool = True) -> torch.Tensor:
    """``(E,)`` bool: ``n`` edges taken best-first (by ``|score|``, or score) from the logits backwards, dangling
    ones pruned."""
    rank_by = _check(graph, scores, n, absolute).tolist()
    of_edge, feeds, logits = _readers(graph)
    into_writer = feeds[of_edge].T  # (W, E): the edges whose reader feeds each writer node
    writers = graph.edge_writers.tolist()
    queued = (of_edge == logits).clone()
    heap = [(-rank_by[e], e) for e in torch.nonzero(queued).flatten().tolist()]
    heapq.heapify(heap)
    kept = torch.zeros(graph.n_edges, dtype=torch.bool)
    reached = torch.zeros(graph.n_writers, dtype=torch.bool)
    for _ in range(n):
        if not heap:
            break
        _, edge = heapq.heappop(heap)
        kept[edge] = True
        writer = writers[edge]
        if not reached[writer]:
            reached[writer] = True
            new = into_writer[writer] & ~queued
            queued |= new
            for e in torch.nonzero(new).flatten().tolist():
                heapq.heappush(heap, (-rank_by[e], e))
    return prune_dangling(graph, kept)


def select(graph: EdgeGraph, scores: torch.Tensor, n: int, selection: str = "top_n",
           absolute: bool = True) -> torch.Tensor:
    """The circuit of ``n`` edges by ``selection`` ("top_n" or "greedy"), ranking ``|scores|`` or, with
    ``absolute=False``, the scores as they are."""
    if selection == "top_n":
        return top_n(graph, scores, n, absolute)
    if selection == "greedy":
        return greedy(graph, scores, n, absolute)
    raise ArgumentError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
