"""Running a GGUF file in llama.cpp through its Python binding (``llama-cpp-python``, the ``[gguf]`` extra):
logits over a prompt and greedy decoding, on token ids, batch 1, the CPU."""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

import numpy as np

from ...errors import StateError

INSTALL_HINT = "pip install 'eigenfast[gguf]' (llama-cpp-python builds llama.cpp from source, which takes a while)"


def require(name: str) -> ModuleType:
    """Import an optional package of the ``[gguf]`` extra, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise StateError(f"{name} is not installed ({exc}): {INSTALL_HINT}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp prints its load log from C to file descriptor 2, past Python's sys.stderr: silenced here."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


CACHE_TYPES = ("f16", "f32")


def load(path: str | Path, threads: int = 1, context: int = 512, all_logits: bool = True, cache: str = "f16") -> Any:
    """A ``llama_cpp.Llama`` on ``path``; ``all_logits`` keeps every position's logits (for comparisons).

    ``cache``: the KV cache's storage, llama.cpp's default ``"f16"``, or ``"f32"`` to compare with an f32 model
    (f16 keys and values round a trained model's logits by about 1e-2).
    """
    llama_cpp = require("llama_cpp")
    kind = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[cache]
    with _quiet():
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                               n_threads_batch=threads, logits_all=all_logits, type_k=kind, type_v=kind, verbose=False)


def logits(engine: Any, ids: Sequence[int]) -> np.ndarray:
    """``(len(ids), vocab)`` logits of one prompt, from an empty cache."""
    engine.reset()
    engine.eval(list(ids))
    return np.array(engine.scores[: len(ids)], dtype=np.float32)


def greedy(engine: Any, ids: Sequence[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``ids`` (argmax at every step, as ``generate(do_sample=False)``)."""
    engine.reset()
    engine.eval(list(ids))
    tokens: list[int] = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(engine.scores[engine.n_tokens - 1])))
        if len(tokens) < new_tokens:
            engine.eval([tokens[-1]])
    return tokens
