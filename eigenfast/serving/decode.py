"""Greedy decoding loops as serving stacks run them, timed.

``decode`` is the loop a serving stack runs around a (possibly compiled) model: one
prefill over the prompt, then one token per step, positions passed explicitly, a ``StaticCache`` so every step has the same shapes (what CUDA
graphs need). ``onnx_decode`` is the same loop in ONNX Runtime over the two files of
:func:`eigenfast.serving.export.decoder_to_onnx`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy
import torch
from transformers import StaticCache

from ..adapters.calls import cache_keyword


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
    :func:`eigenfast.serving.export.decoder_to_onnx`'s two files; the KV cache goes out of one call and into
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
