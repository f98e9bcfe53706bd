"""Kept heads as llama.cpp's attention takes them: ``n_head`` query heads in ``n_head_kv`` equal
groups, query head ``i`` reading KV head ``i // (n_head / n_head_kv)`` (ggml broadcasts K and V
over the query heads that way, and needs ``n_head_kv`` to divide ``n_head``).

Extraction may keep uneven groups (KV head A read by 2 kept query heads, B by 1). Two exact
ways make them even, and :func:`regroup` mixes them with one group size ``g``: a KV head read by
``c`` query heads is written ``ceil(c / g)`` times (a copy costs its K and V rows and a cache
entry per token), and its groups are padded to ``g`` query heads with padding heads (zero Q
rows and zero O columns: they attend uniformly and add exactly nothing; each costs its Q rows
and O columns). ``g`` is chosen for the fewest added weights, the larger on a tie (fewer KV
heads, a smaller cache); the cost is reported so a user sees what the format charged.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Grouping:
    """The heads to write: the kept query slot of each written query head (None: padding) and the kept
    KV slot each written KV head copies."""

    query_slots: tuple[int | None, ...]
    kv_copies: tuple[int, ...]

    @property
    def added_heads(self) -> int:
        """Padding query heads plus KV copies: each adds ``2 * d_model * d_head`` weights."""
        kv_slots = set(self.kv_copies)
        return self.query_slots.count(None) + len(self.kv_copies) - len(kv_slots)


def readers(kv_slots: list[int], n_kv: int) -> list[list[int]]:
    """The query slots reading each KV slot."""
    return [[q for q, slot in enumerate(kv_slots) if slot == kv] for kv in range(n_kv)]


def grouped(by_kv: list[list[int]], group: int) -> Grouping:
    """Each KV head's readers in chunks of ``group`` query heads, padded, one KV copy per chunk."""
    query_slots: list[int | None] = []
    kv_copies: list[int] = []
    for kv, queries in enumerate(by_kv):
        for start in range(0, len(queries), group):
            chunk = queries[start:start + group]
            query_slots.extend([*chunk, *[None] * (group - len(chunk))])
            kv_copies.append(kv)
    return Grouping(tuple(query_slots), tuple(kv_copies))


def regroup(kv_slots: list[int], n_kv: int) -> Grouping:
    """Equal groups for query slots reading ``kv_slots`` (one KV slot per query slot), fewest added heads."""
    by_kv = readers(kv_slots, n_kv)
    widest = max(len(queries) for queries in by_kv)
    options = [grouped(by_kv, group) for group in range(widest, 0, -1)]
    return min(options, key=lambda grouping: grouping.added_heads)  # min keeps the first: the larger group


def even_groups(kv_slots: list[int], n_kv: int) -> bool:
    """Whether the kept query slots already read their KV heads in equal consecutive groups."""
    group = len(kv_slots) // n_kv
    return len(kv_slots) == group * n_kv and kv_slots == [slot // group for slot in range(len(kv_slots))]


def describe(grouping: Grouping, n_q: int, n_kv: int) -> str:
    n_head, n_head_kv = len(grouping.query_slots), len(grouping.kv_copies)
    return (f"{n_q} query heads over {n_kv} KV heads in uneven groups written as {n_head} over {n_head_kv} "
            f"(groups of {n_head // n_head_kv}): {grouping.added_heads} added head(s), "
            f"{grouping.added_heads / (n_q + n_kv):.0%} more attention weights")
