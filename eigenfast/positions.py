"""True token positions for position-indexed biases.

Pruned projections add ``bias_table[pos]`` where ``pos`` is each token's true
position: left padding does not count and KV-cache decoding continues where the
prompt stopped. A forward pre-hook on the model's backbone works the positions
out once per call (from ``position_ids``, else the attention mask, else the
cache length) and every pruned module of that model reads them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import positions_from_mask


class PositionTracker:
    """Holds the positions of the backbone call in flight; shared by a model's pruned modules."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = _infer_positions(args, kwargs)
            # Hand the same positions to the model itself, so learned/rotary
            # position embeddings agree with the bias tables under left padding.
            kwargs["position_ids"] = position_ids
        self.positions = position_ids
        return args, kwargs

    def current(self) -> torch.Tensor:
        if self.positions is None:
            raise RuntimeError(
                "a pruned eigenfast module ran outside a model forward, so it has no token positions; "
                "call the whole model (or its backbone), not the module alone"
            )
        return self.positions


def _infer_positions(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    length = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return positions_from_mask(mask)[:, -length:]
    cache = kwargs.get("past_key_values")
    start = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return (torch.arange(length, device=tokens.device) + start).unsqueeze(0)
