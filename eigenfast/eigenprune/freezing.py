"""Choose the lowest-scoring rank-one terms and freeze them into position-indexed biases.

Freezing term i of a matrix: ``A' = A − E_i`` and ``b'[t] = b + x̄[t] E_i``.
All sites that live in one projection module (GPT-2 and NeoX fuse q, k and v)
are folded into that module together, then it is replaced by a
:class:`~eigenfast.rewrite.position_tables.TokenBiasLinear`.
With ``positions="mean"`` the frozen terms take their mean over every calibration token
instead, ``b' = b + x̄ E_i`` with ``x̄`` the count-weighted mean of the ``x̄[t]``: the module
keeps its class and the shift joins its ordinary bias (eigenfast/rewrite/plain_bias.py).

A model sharded by FSDP2 holds each weight as a DTensor that its FSDP unit all-gathers
by reference to the module and the Parameter object, so there the module keeps both:
its class becomes TokenBiasLinear in place and the new weight's local shard is copied
into the existing Parameter. The position table, a small buffer, is whole on every rank.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..adapters import get_adapter, projection_matrix
from ..errors import ArgumentError
from ..rewrite.plain_bias import add_to_bias, mean_over_positions, validate_positions
from ..rewrite.position_limit import guard_positions
from ..rewrite.position_tables import (
    TokenBiasLinear,
    bias_table,
    extend_rows,
    resample_table,
    stores_linear_layout,
    validate_extrapolate,
)
from ..rewrite.positional import install
from ..rewrite.surgery import replace_module
from ..runtime.distributed import full_tensor, reshard
from .scoring import Attribution, Key


def validate_fraction(p: object, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ArgumentError(f"{name} must be a fraction in [0, 1] (or 'auto'), got {p!r}")
    return float(p)


def select_frozen(scores: dict[Key, torch.Tensor], p: float) -> dict[Key, torch.Tensor]:
    """Per component type c, mark the ``floor(p · n_c)`` lowest scores across all layers and heads."""
    p = validate_fraction(p)
    by_component: dict[str, list[Key]] = defaultdict(list)
    for key in scores:
        by_component[key[1]].append(key)
    frozen = {key: torch.zeros_like(value, dtype=torch.bool) for key, value in scores.items()}
    for keys in by_component.values():
        flat = torch.cat([scores[k].flatten() for k in keys])
        # round() first so that e.g. 0.29 * 100 counts as 29, not 28.999...
        count = math.floor(round(p * flat.numel(), 9))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.argsort(flat, stable=True)[:count]] = True
        for key, part in zip(keys, chosen.split([scores[k].numel() for k in keys])):
            frozen[key] = part.view_as(scores[key])
    return frozen


def freeze(
    model: nn.Module, attribution: Attribution, frozen: dict[Key, torch.Tensor], extrapolate: str = "mean",
    positions: str = "indexed",
) -> None:
    """Fold the frozen terms into ``model`` in place; modules with nothing frozen stay untouched.

    ``positions="indexed"``: per-position biases (TokenBiasLinear); ``"mean"``: their mean over all
    calibration tokens, folded into the projection's ordinary bias.
    """
    if validate_positions(positions) == "mean":
        _freeze_mean(model, attribution, frozen)
        return
    reshard(model)  # FSDP2: edit the sharded Parameters, not whole copies left by a forward
    by_module = _frozen_by_module(attribution, frozen)
    for path, keys in by_module.items():
        module = model.get_submodule(path)
        sharded = isinstance(module.weight, DTensor)
        if sharded:
            check_foldable_in_place(model, [path])
        # Whole on every rank, in the same module order everywhere (full_tensor is a collective).
        A = full_tensor(projection_matrix(module).detach()).double()
        delta = torch.zeros_like(A)
        for key in keys:
            _add_frozen_terms(delta, attribution, key, frozen[key].to(A.device))
        # x̄[t] ΔA sums x̄[t] E_i over every frozen term: ΔA is zero outside each head's block.
        delta_rows = extend_rows(attribution.mean_input(keys[0]).to(A.device) @ delta, extrapolate)
        # A module pruned before may hold a table of another calibration length: add both, read on the longer.
        length = max(attribution.calib_len, getattr(module, "calib_len", 0))
        # A sharded nn.Linear has no bias (checked): its plain table is zeros, made here since new_zeros
        # on its DTensor weight would be a DTensor.
        plain_zeros = sharded and not isinstance(module, TokenBiasLinear)
        before = A.new_zeros(length + 1, A.shape[1]) if plain_zeros else bias_table(module, length).double()
        table = before + resample_table(delta_rows, length)
        if sharded:
            _fold_in_place(module, A - delta, table, length, extrapolate)
            continue
        new = TokenBiasLinear(A.shape[0], A.shape[1], length, extrapolate, linear_layout=stores_linear_layout(module))
        new = new.to(device=module.weight.device, dtype=module.weight.dtype)
        new.set_matrix(A - delta)
        new.set_table(table)
        replace_module(model, path, new)
    if by_module:
        install(model)
        guard_positions(model)


def _frozen_by_module(attribution: Attribution, frozen: dict[Key, torch.Tensor]) -> dict[str, list[Key]]:
    by_module: dict[str, list[Key]] = defaultdict(list)
    for key, mask in frozen.items():
        if bool(mask.any()):
            by_module[attribution.stats[key].site.path].append(key)
    return by_module


@torch.no_grad()
def _freeze_mean(model: nn.Module, attribution: Attribution, frozen: dict[Key, torch.Tensor]) -> None:
    """``A' = A − ΔA`` in the module's own weight, ``b' = b + x̄ ΔA`` in its bias (prune refuses sharded models here)."""
    adapter = get_adapter(model)
    for path, keys in _frozen_by_module(attribution, frozen).items():
        module = model.get_submodule(path)
        A = projection_matrix(module).detach().double()
        delta = torch.zeros_like(A)
        for key in keys:
            _add_frozen_terms(delta, attribution, key, frozen[key].to(A.device))
        x_mean = mean_over_positions(attribution.mean_input(keys[0]).to(A.device), attribution.counts)
        projection_matrix(module).copy_(A - delta)
        layer, component = keys[0]  # any site of the module names it: the fold is into the module's one bias
        add_to_bias(adapter, layer, component, x_mean @ delta)


def check_foldable_in_place(model: nn.Module, paths: list[str]) -> None:
    """Refuse a sharded projection that freezing could not rewrite in place (FSDP2-sharded models only).

    Only an nn.Linear (or a TokenBiasLinear) without a bias Parameter can change class in place
    without FSDP2 losing track of a Parameter or meeting a new shape.
    """
    for path in paths:
        module = model.get_submodule(path)
        linear = isinstance(module, (nn.Linear, TokenBiasLinear))
        if not linear or getattr(module, "bias", None) is not None:
            what = "a projection with a bias" if linear else f"a {type(module).__name__}"
            raise ArgumentError(
                f"{path} is sharded by FSDP2 and is {what}: freezing can rewrite a sharded projection in place "
                "only when it is an nn.Linear without bias (Llama- and Mistral-style models); prune this model "
                "unsharded, or shard it after pruning"
            )


@torch.no_grad()
def _fold_in_place(module: nn.Module, A: torch.Tensor, table: torch.Tensor, length: int, extrapolate: str) -> None:
    """Make ``module`` a TokenBiasLinear with matrix ``A`` (d_in, d_out) without replacing it or its (DTensor)
    Parameter, which keeps its layout."""
    param, linear_layout = module.weight, stores_linear_layout(module)
    weight = A.T if linear_layout else A
    param.copy_(distribute_tensor(weight.to(param.dtype), param.device_mesh, param.placements))
    if not isinstance(module, TokenBiasLinear):
        module.__class__ = TokenBiasLinear
        module.linear_layout = linear_layout
        for name in ("in_features", "out_features"):  # nn.Linear's; TokenBiasLinear reads them off the weight
            vars(module).pop(name, None)
        module._parameters.pop("bias", None)  # None here: checked above
    module.calib_len, module.extrapolate = length, validate_extrapolate(extrapolate)
    module.register_buffer("table", table.to(param.device, param.dtype))


def _add_frozen_terms(delta: torch.Tensor, attribution: Attribution, key: Key, mask: torch.Tensor) -> None:
    st = attribution.stats[key]
    site, factors = st.site, st.factors
    for head in range(site.heads):
        index = mask[head].nonzero().flatten()
        if index.numel() == 0:
            continue
        terms = factors.terms(head, index.to(factors.U.device)).to(delta.device)
        if site.out_index is not None:
            delta[:, site.out_index[head]] += terms
        elif site.in_index is not None:
            delta[site.in_index[head], :] += terms
        else:
            delta += terms
