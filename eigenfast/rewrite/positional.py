"""Decoder layers whose forward hands token positions to eigenfast's modules as arguments.

A pruned projection adds ``bias_table[pos]`` (docs/MATH.md §2), so it needs each
token's position. Serving stacks (static KV caches, CUDA graphs, ``torch.export``,
ONNX) need those positions to flow through the forward, not through hooks or state
kept between calls (docs/MATH.md §6). Transformers already passes every decoder layer
its ``position_ids``; what it does not do is hand them on to the attention's and
MLP's projections. So a model that eigenfast changed gets, for each decoder layer,
attention and MLP, a subclass (same module, same parameters and state-dict keys) whose
forward passes ``positions`` down explicitly:

    block(hidden, position_ids=...)  ->  attention(x, positions, ...)  ->  project(q_proj, x, positions)
                                     ->  mlp(x, positions)             ->  project(up_proj, x, positions)

The architecture-specific pieces (how Q/K/V are laid out, the rotary embedding, the
MLP's parts, how a layer is called) come from the adapter, so this file is
architecture-blind. ``install`` swaps the classes in place; it is idempotent and runs
after freezing, after removal and after loading.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..adapters.calls import LayerParameters, attention_function, layer_parameters
from ..adapters.projection import PositionalModule, project
from ..errors import ArgumentError, SavedModelError, UnsupportedModelError


class PositionalBlock(nn.Module):
    """Mixin for a HF decoder layer: the same computation, with positions handed down."""

    eigenfast_adapter: type[Adapter]
    # Attribute names inside the layer, read once per class by _subclass (a per-call lookup
    # of the adapter's paths costs microseconds on every layer of every decode step).
    eigenfast_attn: str
    eigenfast_mlp: str
    eigenfast_attn_norm: str
    eigenfast_mlp_norm: str | None
    eigenfast_layer: LayerParameters  # the HF layer class's parameter names, read off its forward

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.eigenfast_adapter
        call = adapter.layer_call(self.eigenfast_layer, args, kwargs)
        if call.position_ids is None:
            raise ArgumentError(
                "a model changed by eigenfast needs the decoder layers' position_ids; call the whole model "
                "(transformers passes them), or pass position_ids when running a layer directly"
            )
        # Every projection of the layer reads rows of this leading shape: expand once here, not per projection.
        positions = call.position_ids.expand(hidden_states.shape[:-1])
        attention = getattr(self, self.eigenfast_attn)
        mlp = getattr(self, self.eigenfast_mlp)
        x = getattr(self, self.eigenfast_attn_norm)(hidden_states)
        attn_out, _ = attention(
            x, positions, call.attention_mask, call.cache, call.position_embeddings, **call.kwargs
        )
        if adapter.parallel_layer(self):
            mlp_in = x if self.eigenfast_mlp_norm is None else getattr(self, self.eigenfast_mlp_norm)(hidden_states)
            return hidden_states + attn_out + mlp(mlp_in, positions)
        hidden_states = hidden_states + attn_out
        return hidden_states + mlp(getattr(self, self.eigenfast_mlp_norm)(hidden_states), positions)


KV_SLOTS = "eigenfast_kv_slots"  # attribute (saved with the model): the KV slot each query slot reads
# Non-persistent buffers derived from it (None for even groups), on the attention's device:
Q_PAD = "eigenfast_q_pad"  # padded query slot -> the query slot it copies
Q_UNPAD = "eigenfast_q_unpad"  # query slot -> its padded slot


class PositionalAttention(nn.Module):
    """Mixin for a HF attention module: Q/K/V and O projections get the positions.

    After extraction with uneven GQA groups (eigenfast/rewrite/removal.py) the layer keeps
    each KV head once (weights and cache) and has ``num_key_value_groups`` set to the
    largest kept group. Before the attention function, Q is padded to that many heads
    per KV head with copies of a query head of the same group; after it, the copies'
    outputs are dropped. The attention function then sees even groups: transformers'
    own GQA handling (``repeat_kv``, or SDPA packing the heads of a one-token query)
    reads the cache as it is, and padding costs index-selects on Q and on the output.
    """

    eigenfast_adapter: type[Adapter]
    eigenfast_output: str  # the output projection's attribute name (set by _subclass)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        adapter = self.eigenfast_adapter
        q, k, v = adapter.project_qkv(self, hidden_states, positions)  # each (B, heads, T, d_head)
        q, k = adapter.rotate(self, q, k, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        pad = self.eigenfast_q_pad
        if pad is not None:  # uneven GQA groups: evened out with copies of query heads, whose outputs are dropped
            q = q.index_select(1, pad)
        out, weights = attention_function(self, adapter.eager_attention())(
            self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
            **adapter.attention_options(self), **kwargs,
        )
        if pad is not None:
            out = out.index_select(2, self.eigenfast_q_unpad)  # out is (B, T, heads, d_head)
        out = out.reshape(*hidden_states.shape[:-1], -1)
        return project(getattr(self, self.eigenfast_output), out, positions), weights


class PositionalMLP(nn.Module):
    """Mixin for a HF MLP: ``out(act(gate(x)) * in(x))`` or ``out(act(in(x)))``, positions handed down."""

    eigenfast_adapter: type[Adapter]
    eigenfast_parts: tuple[str, str | None, str]  # (in, gate or None, out) attribute names (set by _subclass)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        up, gate, down = self.eigenfast_parts
        act = getattr(self, self.eigenfast_adapter.mlp_activation)
        h = project(getattr(self, up), x, positions)
        h = act(project(getattr(self, gate), x, positions)) * h if gate is not None else act(h)
        return project(getattr(self, down), h, positions)


def _attribute(name: str | None) -> str | None:
    if name is not None and "." in name:
        raise UnsupportedModelError(f"an adapter's paths inside a layer must be attribute names, got {name!r}")
    return name


def _names(mixin: type[nn.Module], base: type[nn.Module], adapter: type[Adapter]) -> dict[str, Any]:
    """The attribute names the mixin's forward reads, from the adapter's paths (and for a layer, how it is called)."""
    if mixin is PositionalBlock:
        return {"eigenfast_attn": _attribute(adapter.attn_path), "eigenfast_mlp": _attribute(adapter.mlp_path),
                "eigenfast_attn_norm": _attribute(adapter.attn_norm_path),
                "eigenfast_mlp_norm": _attribute(adapter.mlp_norm_path),
                "eigenfast_layer": layer_parameters(base, adapter.layer_arguments)}
    if mixin is PositionalAttention:
        return {"eigenfast_output": _attribute(adapter.output_projection())}
    return {"eigenfast_parts": tuple(_attribute(name) for name in adapter.mlp_parts())}


@lru_cache(maxsize=None)
def _subclass(mixin: type[nn.Module], base: type[nn.Module], adapter: type[Adapter]) -> type[nn.Module]:
    # One class per (mixin, HF class): named so that repr() and tracebacks say what it is.
    return type(f"Positional{base.__name__}", (mixin, base), {"eigenfast_adapter": adapter, **_names(mixin, base, adapter)})


def _swap(module: nn.Module, mixin: type[nn.Module], adapter: type[Adapter]) -> None:
    if not isinstance(module, (mixin, PositionalModule)):
        module.__class__ = _subclass(mixin, type(module), adapter)


def _padding(slots: Any, heads: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(:data:`Q_PAD`, :data:`Q_UNPAD`) from an attention's saved :data:`KV_SLOTS`.

    ``heads`` is the layer's (query heads, KV heads) as its projections hold them.
    """
    _check_slots(slots, heads)
    groups = [[slot for slot, kv in enumerate(slots) if kv == group] for group in range(max(slots) + 1)]
    width = max(map(len, groups))
    pad: list[int] = []
    unpad: list[int] = []
    for members in groups:  # query slots are sorted by KV slot, so unpad comes out in query-slot order
        unpad += range(len(pad), len(pad) + len(members))
        pad += members + members[:1] * (width - len(members))
    return torch.tensor(pad, device=device), torch.tensor(unpad, device=device)


def _check_slots(slots: Any, heads: tuple[int, int]) -> None:
    """A saved slot list must give each query head a KV head, in order, and use every KV head (else the save is damaged)."""
    n_q, n_kv = heads
    valid = (
        isinstance(slots, list) and len(slots) == n_q and all(type(kv) is int for kv in slots)
        and slots == sorted(slots) and set(slots) == set(range(n_kv))
    )
    if not valid:
        raise SavedModelError(
            f"{KV_SLOTS} = {slots!r} does not fit an attention with {n_q} query heads and {n_kv} KV heads: it must "
            f"list, in ascending order, the KV head (0..{n_kv - 1}, each used) that each query head reads. The saved "
            "model's eigenfast.json is damaged or was edited; save the model again from its source."
        )


def install(model: nn.Module) -> None:
    """Give every decoder layer of ``model`` (and its attention and MLP) the positional forward."""
    adapter = get_adapter(model)
    kind = type(adapter)
    for index, layer in enumerate(adapter.layers()):
        _swap(layer, PositionalBlock, kind)
        attention = adapter.attention(index)
        _swap(attention, PositionalAttention, kind)
        if isinstance(attention, PositionalAttention):
            slots = getattr(attention, KV_SLOTS, None)  # None: even groups, nothing to pad
            padding = (None, None) if slots is None else _padding(
                slots, adapter.layer_heads(index), next(attention.parameters()).device)
            # Derived from the saved attribute, so not in the state dict; a buffer so that .to(device) moves it.
            for name, index_tensor in zip((Q_PAD, Q_UNPAD), padding):
                attention.register_buffer(name, index_tensor, persistent=False)
        _swap(adapter.mlp(index), PositionalMLP, kind)
