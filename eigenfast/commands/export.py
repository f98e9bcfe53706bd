"""Export a model (whole, or a saved circuit) for a serving engine: --gguf writes a GGUF file for llama.cpp.

Llama, Mistral and Qwen2 models, whole or extracted with zero ablation (per-layer head counts,
removed attention and MLPs); GPT-2, NeoX and Phi too, their removed heads and blocks zero-filled
(exact, no faster), which the export's warning, printed here, says. The model's tokenizer
(word-level, or GPT-2's byte-level BPE) goes into the file; --no-tokenizer writes a placeholder
vocabulary of the model's size instead (the engine then runs on token ids). What the format
cannot hold (a position-indexed table: mean ablation, eigenpruning) is refused before anything is
written. docs/SERVING.md says which engine serves which change.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

from ..errors import ArgumentError
from ..saving.loading import check_model_name, load_model
from ..serving.llamacpp.writer import DTYPES, to_gguf
from .arguments import MODEL_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file to write (llama.cpp, ollama)")
    parser.add_argument("--dtype", choices=DTYPES, default="f32", help="storage of the matrices (norms and biases stay f32)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write a placeholder vocabulary instead of the model's tokenizer")


@contextlib.contextmanager
def _warnings_printed() -> Iterator[None]:
    """The export's warnings (zero-filled parts, approximations) on stderr, whatever logging is set up."""
    logger = logging.getLogger(to_gguf.__module__.rsplit(".", 1)[0])
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    if not args.gguf.parent.is_dir():
        raise ArgumentError(f"{args.gguf.parent} is not a folder: create it, or write the file elsewhere")
    loaded = load_model(args.model)
    with _warnings_printed():
        path = to_gguf(loaded.model, args.gguf, tokenizer=None if args.no_tokenizer else loaded.tokenizer,
                       dtype=args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0
