"""The cost model the serving benchmark judges measured speed-ups against.

A decode step reads every weight and the whole KV cache once (bandwidth-bound:
``decode_step_bytes``); prefill is FLOP-bound (``forward_flops``, torch's FLOP counter
taught eigenfast's op by ``register_flop_formulas``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from ..adapters import get_adapter, projection_matrix
from .export import cached_layers


def _token_bias_linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """The op is a matmul plus a gather-add: count it like ``nn.Linear``."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """torch counts the CUDA attention kernels only; the CPU one does the same work."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@functools.cache
def register_flop_formulas() -> None:
    """Teach torch's FLOP counter eigenfast's op and the CPU attention kernel (once per process;
    :func:`forward_flops` calls it, so importing this module changes nothing global)."""
    register_flop_formula(torch.ops.eigenfast.token_bias_linear)(_token_bias_linear_flops)
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)(_cpu_attention_flops)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the matrices a decode step reads in full: every projection and the LM head
    (embeddings and position tables are read one row per token, which is negligible)."""
    total = 0
    for module in model.modules():
        try:
            matrix = projection_matrix(module)
        except TypeError:
            continue
        total += matrix.numel() * matrix.element_size()
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):  # an nn.Linear LM head was counted above
        total += head.weight.numel() * head.weight.element_size()
    return total


def kv_cache_bytes(model: nn.Module, batch: int, length: int) -> int:
    """Bytes of a static KV cache of ``length`` positions: what attention reads at each decode step
    (a static cache is read in full, the mask hiding the unwritten positions). Counts each layer's
    KV heads as they are now; a removed attention caches nothing."""
    adapter = get_adapter(model)
    element = next(model.parameters()).element_size()
    per_position = sum(adapter.layer_heads(layer)[1] for layer in cached_layers(model)) * 2 * adapter.d_head * element
    return batch * length * per_position


def decode_step_bytes(model: nn.Module, batch: int, length: int) -> int:
    """Bytes one decode step reads: the weights (:func:`weight_bytes`) and a ``length``-position KV cache."""
    return weight_bytes(model) + kv_cache_bytes(model, batch, length)


@torch.no_grad()
def forward_flops(model: nn.Module, batch: int, length: int, all_logits: bool = True) -> int:
    """FLOPs of one forward over ``batch`` x ``length`` tokens, counted by torch's FLOP counter; with
    ``all_logits=False`` the LM head runs at the last position only (what :func:`decode`'s prefill does)."""
    register_flop_formulas()
    ids = torch.zeros(batch, length, dtype=torch.long, device=model.get_output_embeddings().weight.device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, position_ids=torch.arange(length, device=ids.device).expand(batch, length), use_cache=False,
              logits_to_keep=0 if all_logits else 1)
    return counter.get_total_flops()
