"""Folding a constant into a projection's ordinary bias, so the model stays a plain instance of its HF class.

``positions="mean"`` (eigenpruning's frozen terms, extraction's mean ablation) replaces a
per-position table by its count-weighted mean over the calibration tokens: one vector,
which an ordinary bias holds. A projection built without a bias gets one the way its HF
class would build it: the config flag that covers it (Llama's ``attention_bias`` covers
q/k/v/o, ``mlp_bias`` the three MLP projections; NeoX's ``attention_bias`` covers
``query_key_value`` and ``dense``) is turned on and every projection it covers, in every
layer, gets a zero bias, so ``from_pretrained`` on the saved config builds the same shapes.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..adapters import Adapter, projection_matrix
from ..errors import ArgumentError, UnsupportedModelError
from .position_tables import PositionTable

POSITIONS = ("indexed", "mean")


def validate_positions(positions: str) -> str:
    """The one check of ``positions``, for every entry point that takes it."""
    if positions in POSITIONS:
        return positions
    raise ArgumentError(
        f"positions must be one of {POSITIONS} (what replaces a removed or frozen part: its mean at each token "
        f"position, a table, or its mean over all positions, an ordinary bias), got {positions!r}"
    )


def mean_over_positions(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(..., T, d)`` per-position means → ``(..., d)``: their mean weighted by the tokens seen at each position,
    which is the mean over every calibration token."""
    weights = counts.to(device=rows.device, dtype=torch.float64)
    return (torch.einsum("...td,t->...d", rows.double(), weights) / weights.sum()).to(rows.dtype)


def _needs_flag(module: nn.Module) -> bool:
    return not isinstance(module, PositionTable) and getattr(module, "bias", None) is None


def check_bias_possible(adapter: Adapter, sites: Iterable[tuple[int, str]]) -> None:
    """Refuse, before any work, a projection that has no bias and whose HF class cannot be given one."""
    for layer, component in sites:
        if not adapter.has_component(layer, component):
            continue
        module = adapter.model.get_submodule(adapter.site(layer, component).path)
        if _needs_flag(module) and adapter.bias_flag(component) is None:
            raise _no_bias(adapter, component)


def _no_bias(adapter: Adapter, component: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(adapter.model).__name__}'s {component!r} projection has no bias and its config has no flag that "
        "gives it one, so positions='mean' has no plain bias to fold into; use positions='indexed' "
        "(a position-indexed table, served by eigenfast)"
    )


@torch.no_grad()
def add_to_bias(adapter: Adapter, layer: int, component: str, value: torch.Tensor) -> None:
    """Add ``value`` (d_out) to what ``component``'s projection of ``layer`` adds to its output: its bias (made, with
    the config flag, if missing) or, for a projection that already holds a position table, every row of it."""
    module = adapter.model.get_submodule(adapter.site(layer, component).path)
    if isinstance(module, PositionTable):
        module.table += value.to(module.table)
        return
    if module.bias is None:
        _enable_bias(adapter, component)
    module.bias += value.to(module.bias)


def _enable_bias(adapter: Adapter, component: str) -> None:
    flag = adapter.bias_flag(component)
    if flag is None:
        raise _no_bias(adapter, component)
    setattr(adapter.config, flag, True)
    covered = [c for c in adapter.components() if adapter.bias_flag(c) == flag]
    for layer in range(adapter.n_layers):
        for c in covered:
            if not adapter.has_component(layer, c):
                continue
            module = adapter.model.get_submodule(adapter.site(layer, c).path)
            if _needs_flag(module):
                weight = module.weight
                module.bias = nn.Parameter(weight.new_zeros(projection_matrix(module).shape[1]))
