"""``to_gguf``: a model, whole or extracted, as a GGUF file llama.cpp runs.

Llama-family models use llama.cpp's ``deci`` architecture, whose head counts and FFN widths are
per-layer arrays (blocks.py): removed heads and blocks are left out. GPT-2, NeoX and Phi use
llama.cpp's own ``gpt2``, ``gptneox`` and ``phi2``, whose layers all have the same heads: removed
parts are zero-filled (dense.py), exact but no faster. What is particular to one architecture
lives in architectures/. Everything is read and checked first; the file is written to a temporary
name beside ``path`` and renamed at the end, so a refusal or an interruption leaves nothing
half-written.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...adapters import get_adapter
from ...errors import ArgumentError, UnsupportedModelError
from .architectures import Architecture, architecture
from .blocks import Block
from .engine import require
from .layers import read_layers
from .vocabulary import vocabulary, write_vocabulary

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block: a row must be a whole number of blocks


def _stored(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The array to write and its quantized GGML type (None: the array's own dtype): 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; a
    q8_0 matrix whose rows are not whole blocks is written f16."""
    import gguf

    array = tensor.detach().to(torch.float32).cpu().numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "q8_0":
        log.info("%s: rows of %d values are not whole Q8_0 blocks of %d, written f16", name, array.shape[-1], Q8_BLOCK)
    return array.astype(np.float16), None


def _tensors(model: nn.Module, adapter: Any, arch: Architecture, blocks: list[Block]) -> dict[str, torch.Tensor]:
    embedding = model.get_input_embeddings().weight
    final_norm = adapter.final_norm()
    tensors = {"token_embd.weight": embedding, "output_norm.weight": final_norm.weight}
    if getattr(final_norm, "bias", None) is not None:
        tensors["output_norm.bias"] = final_norm.bias
    tensors.update(arch.extra_tensors())
    output = model.get_output_embeddings()
    if output.weight is not embedding or not arch.tied_output:
        tensors["output.weight"] = output.weight
    bias = getattr(output, "bias", None)
    if arch.output_bias:
        tensors["output.bias"] = embedding.new_zeros(output.weight.shape[0]) if bias is None else bias
    elif bias is not None:
        raise UnsupportedModelError(f"the LM head has a bias, which llama.cpp's {arch.name} graph does not add: "
                                    "export the model with eigenfast.serving.to_onnx")
    for index, block in enumerate(blocks):
        tensors.update({f"blk.{index}.{name}": value for name, value in block.tensors.items()})
    return tensors


def to_gguf(model: nn.Module, path: str | Path, tokenizer: Any = None, dtype: str = "f32") -> Path:
    """Write ``model`` (a Llama, Mistral, Qwen2, GPT-2, GPT-NeoX or Phi, whole or extracted) as a GGUF file for
    llama.cpp. GPT-2, NeoX and Phi keep every head and block in llama.cpp's graphs for them: removed ones are
    written as zeros, exact but no faster, and a warning names them.

    ``tokenizer``: the model's word-level or GPT-2-style byte-level BPE tokenizer (vocabulary.py), or None
    for a placeholder vocabulary of the model's size (the engine then runs on token ids). ``dtype``: ``"f32"``, ``"f16"`` or ``"q8_0"`` for the matrices
    (norms and biases stay f32). Raises an :class:`~eigenfast.errors.EigenfastError` naming what the format
    cannot hold (a position-indexed table, say) before any file is written.
    """
    gguf = require("gguf")
    if dtype not in DTYPES:
        raise ArgumentError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    adapter = get_adapter(model)
    arch = architecture(model, adapter)
    vocab = vocabulary(tokenizer, model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        blocks = arch.blocks(read_layers(adapter), model.get_input_embeddings().weight)
        tensors = {name: _stored(name, tensor, dtype) for name, tensor in _tensors(model, adapter, arch, blocks).items()}
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, arch.name)
    try:
        writer.add_name(f"eigenfast {model.config.model_type}")
        arch.metadata(writer, blocks)
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
        writer.add_file_type(int(file_types[dtype]))
        write_vocabulary(writer, vocab)
        for name, (array, kind) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path
