"""True token positions for hook-based analysis (the ablation reference of eigenfast/circuit/ablation.py).

Hooks that replace a component's output by its mean need each token's true position
(left padding does not count; KV-cache decoding continues where the prompt stopped).
A forward pre-hook on the backbone works them out once per call (from ``position_ids``,
else the attention mask, else the cache length) for the hooks to read. This is for
analysis only: models eigenfast *changes* take positions as forward arguments instead
(eigenfast/rewrite/positional.py) and run no hooks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters.calls import cache_keyword
from ..data.task_data import positions_from_mask
from ..errors import StateError


class PositionTracker:
    """Holds the positions of the backbone call in flight, for the ablation hooks of that call."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = _infer_positions(args, kwargs, cache_keyword(module))
            # Hand the same positions to the model itself, so learned/rotary
            # position embeddings agree with the bias tables under left padding.
            kwargs["position_ids"] = position_ids
        self.positions = position_ids
        return args, kwargs

    def current(self) -> torch.Tensor:
        if self.positions is None:
            raise StateError(
                "an ablation hook ran outside a model forward, so it has no token positions; "
                "call the whole model (or its backbone), not the module alone"
            )
        return self.positions


def _infer_positions(args: tuple, kwargs: dict[str, Any], cache_name: str) -> torch.Tensor:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs["inputs_embeds"]
    length = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return positions_from_mask(mask)[:, -length:]
    cache = kwargs.get(cache_name)
    start = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return (torch.arange(length, device=tokens.device) + start).unsqueeze(0)
