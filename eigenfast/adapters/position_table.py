"""Where a model keeps learned absolute positions, and so the longest sequence it can read.

GPT-2-style models have a table of ``max_position_embeddings`` rows and cannot read past
it; the rotary families have no table and no hard limit. Architecture-blind: the table is
the backbone's one embedding, besides the token embedding, with that many rows.
"""
from __future__ import annotations

from torch import nn


def position_table(model: nn.Module) -> nn.Embedding | None:
    """The model's learned absolute-position embedding, or None (rotary models have none)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    backbone = getattr(model, "base_model", model)
    tokens = model.get_input_embeddings()
    tables = (m for m in backbone.children() if isinstance(m, nn.Embedding) and m is not tokens)
    return next((m for m in tables if m.num_embeddings == limit), None)


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model can read (None: no hard limit)."""
    table = position_table(model)
    return None if table is None else table.num_embeddings
