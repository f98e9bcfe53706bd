"""Serving measurements: greedy decoding with a static KV cache, timed as serving stacks run it.

``decode`` is the loop a serving stack runs around a (possibly compiled) model: one
prefill over the prompt, then one token per step, positions passed explicitly, a ``StaticCache`` so every step has the same shapes (what CUDA
graphs need). ``decode_step_bytes`` and ``forward_flops`` give the ideal speed-ups the
measured ones are judged against: a decode step reads every weight and the whole KV
cache once (bandwidth-bound), prefill is FLOP-bound.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count
from transformers import StaticCache

from .adapters import get_adapter, projection_matrix
from .adapters.calls import cache_keyword
from .export import cached_layers


@register_flop_formula(torch.ops.eigenfast.token_bias_linear)
def _token_bias_linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """The op is a matmul plus a gather-add: count it like ``nn.Linear``."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """torch counts the CUDA attention kernels only; the CPU one does the same work."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass
class Decoded:
    tokens: torch.Tensor  # (B, new_tokens)
    logits: torch.Tensor | None  # (B, new_tokens, vocab) when kept
    prefill_s: float  # time to first token
    decode_s: float  # the remaining new_tokens - 1 steps

    def tokens_per_s(self) -> float:
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(
    forward: Callable, config, prompt: torch.Tensor, new_tokens: int, keep_logits: bool = False,
    after_first_step: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> Decoded:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` (B, T) with ``forward`` (the model, or
    its compiled form) and a StaticCache; ``after_first_step`` runs once the first decode step is done.

    ``clock`` times it: wall time by default; ``time.process_time`` (CPU time, which other jobs on a
    shared CPU barely move) for CPU runs."""
    batch, length = prompt.shape
    device = prompt.device
    cache = {cache_keyword(forward): StaticCache(config=config, max_cache_len=length + new_tokens)}
    positions = torch.arange(length + new_tokens, device=device)
    _sync(device)
    start = clock()
    # The LM head at the last position only, as generate() does: the other positions' logits go unread.
    last = forward(input_ids=prompt, position_ids=positions[:length].expand(batch, length), **cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    tokens, kept = [last.argmax(-1)], [last] if keep_logits else []
    _sync(device)
    prefill = clock() - start
    start = clock()
    for step in range(new_tokens - 1):
        at = positions[length + step: length + step + 1]
        last = forward(input_ids=tokens[-1].unsqueeze(1), position_ids=at.expand(batch, 1), **cache,
                       use_cache=True).logits[:, -1]
        tokens.append(last.argmax(-1))
        if keep_logits:
            kept.append(last)
        if step == 0 and after_first_step is not None:
            after_first_step()
    _sync(device)
    return Decoded(torch.stack(tokens, 1), torch.stack(kept, 1) if keep_logits else None, prefill,
                   clock() - start)


@torch.no_grad()
def onnx_decode(
    prefill, step, prompt: torch.Tensor, new_tokens: int, keep_logits: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> Decoded:
    """:func:`decode` in ONNX Runtime: ``prefill`` and ``step`` are ``InferenceSession``s of
    :func:`eigenfast.export.decoder_to_onnx`'s two files; the KV cache goes out of one call and into
    the next as arrays, growing a position per step."""
    batch, length = prompt.shape
    names = [i.name for i in step.get_inputs()]
    positions = torch.arange(length + new_tokens).expand(batch, -1).contiguous().numpy()
    start = clock()
    last, *cache = prefill.run(None, {names[0]: prompt.cpu().numpy(), names[1]: positions[:, :length]})
    tokens, kept = [last.argmax(-1)], [last] if keep_logits else []
    prefill_s = clock() - start
    start = clock()
    for step_index in range(new_tokens - 1):
        at = length + step_index
        feed = {names[0]: tokens[-1][:, None], names[1]: positions[:, at: at + 1], **dict(zip(names[2:], cache))}
        last, *cache = step.run(None, feed)
        tokens.append(last.argmax(-1))
        if keep_logits:
            kept.append(last)
    as_tensor = lambda arrays: torch.from_numpy(numpy.stack(arrays, 1))  # noqa: E731
    return Decoded(as_tensor(tokens), as_tensor(kept) if keep_logits else None, prefill_s, clock() - start)


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
    ids = torch.zeros(batch, length, dtype=torch.long, device=model.get_output_embeddings().weight.device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, position_ids=torch.arange(length, device=ids.device).expand(batch, length), use_cache=False,
              logits_to_keep=0 if all_logits else 1)
    return counter.get_total_flops()
