"""Timing a GGUF file in llama.cpp at batch 1: prefill and greedy decoding, and the bytes a decode step reads."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .engine import require


@dataclass
class Timing:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def time_engine(engine: Any, prompt: Sequence[int], new_tokens: int, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """One run from an empty cache: the prompt in one batch, then ``new_tokens`` greedy steps of one token."""
    engine.reset()
    start = clock()
    engine.eval(list(prompt))
    prefilled = clock()
    for _ in range(new_tokens):
        engine.eval([int(np.argmax(engine.scores[engine.n_tokens - 1]))])
    done = clock()
    return Timing(len(prompt) / (prefilled - start), new_tokens / (done - prefilled))


def decode_weight_bytes(path: str | Path) -> int:
    """Bytes of the weights one decode step reads: every tensor but the token embedding, of which a step reads
    one row (unless the LM head is tied to it, when it reads all of it). The KV cache is left out: at batch 1
    and these lengths it is a small share, and the same in kind for both models."""
    gguf = require("gguf")
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or tied)
