"""``to_gguf``: a Llama-family model, whole or extracted, as a GGUF file llama.cpp runs.

The file uses llama.cpp's ``deci`` architecture, whose head counts and FFN widths are per-layer
arrays (eigenfast/serving/llamacpp/blocks.py). Everything is read and checked first; the file is
written to a temporary name beside ``path`` and renamed at the end, so a refusal or an
interruption leaves nothing half-written.
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
from ...rewrite.stand_ins import RemovedAttention
from .blocks import Block, build_blocks
from .engine import require
from .layers import read_layers
from .vocabulary import Vocabulary, vocabulary, write_vocabulary

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
ARCH = "deci"
Q8_BLOCK = 32  # values per Q8_0 block: a row must be a whole number of blocks


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    kind = parameters.get("rope_type", "default")
    if kind != "default":
        raise UnsupportedModelError(f"rope_type {kind!r} is not written to GGUF yet (only the plain rotary embedding "
                                    "is): export this model with eigenfast.serving.to_onnx")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _context_length(model: nn.Module, adapter: Any) -> int:
    """The trained context, or the sliding window where one is set: ``deci`` attends to every earlier
    position, which equals a windowed attention only while the sequence fits the window."""
    length = int(model.config.max_position_embeddings)
    attentions = [adapter.attention(layer) for layer in range(adapter.n_layers)]
    windows = [adapter.attention_options(a).get("sliding_window") for a in attentions if not isinstance(a, RemovedAttention)]
    window = min((w for w in windows if w is not None), default=None)
    if window is not None and window < length:
        log.warning("the model attends within a sliding window of %d positions and llama.cpp's deci graph attends "
                    "to all of them: outputs match up to %d tokens, the context length written", window, window)
        return int(window)
    return length


def _check(model: nn.Module, adapter: Any, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ArgumentError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if adapter.family != "Llama":
        raise UnsupportedModelError(
            f"GGUF export covers the Llama family (llama, mistral, qwen2); {model.config.model_type} is not written "
            "yet: export it with eigenfast.serving.to_onnx or export")
    activation = getattr(model.config, "hidden_act", "silu")
    if activation != "silu":
        raise UnsupportedModelError(f"llama.cpp's deci graph gates its FFN with SiLU, the model with {activation!r}: "
                                    "export it with eigenfast.serving.to_onnx")
    if adapter.d_head % 2:
        raise UnsupportedModelError(f"the rotary embedding needs an even head size, the model has {adapter.d_head}")


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


def _tensors(model: nn.Module, adapter: Any, blocks: list[Block]) -> dict[str, torch.Tensor]:
    backbone = model.get_submodule(adapter.backbone_path)
    tensors = {"token_embd.weight": model.get_input_embeddings().weight,
               "output_norm.weight": backbone.get_submodule(adapter.final_norm_path).weight}
    output = model.get_output_embeddings()
    if output.weight is not model.get_input_embeddings().weight:  # tied: llama.cpp reuses token_embd
        tensors["output.weight"] = output.weight
    if getattr(output, "bias", None) is not None:
        raise UnsupportedModelError("the LM head has a bias, which llama.cpp's deci graph does not add: "
                                    "export the model with eigenfast.serving.to_onnx")
    for index, block in enumerate(blocks):
        tensors.update({f"blk.{index}.{name}": value for name, value in block.tensors.items()})
    return tensors


def _metadata(writer: Any, model: nn.Module, adapter: Any, blocks: list[Block], vocab: Vocabulary, dtype: str) -> None:
    import gguf

    config = model.config
    writer.add_name(f"eigenfast {config.model_type}")
    writer.add_block_count(len(blocks))
    writer.add_context_length(_context_length(model, adapter))
    writer.add_embedding_length(adapter.d_model)
    writer.add_feed_forward_length([block.n_ff for block in blocks])
    writer.add_head_count([block.n_head for block in blocks])
    writer.add_head_count_kv([block.n_head_kv for block in blocks])
    writer.add_key_length(adapter.d_head)
    writer.add_value_length(adapter.d_head)
    writer.add_rope_dimension_count(adapter.d_head)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(int(file_types[dtype]))
    write_vocabulary(writer, vocab)


def to_gguf(model: nn.Module, path: str | Path, tokenizer: Any = None, dtype: str = "f32") -> Path:
    """Write ``model`` (a Llama, Mistral or Qwen2, whole or extracted) as a GGUF file for llama.cpp.

    ``tokenizer``: the model's word-level tokenizer, or None for a placeholder vocabulary of the model's
    size (the engine then runs on token ids). ``dtype``: ``"f32"``, ``"f16"`` or ``"q8_0"`` for the matrices
    (norms and biases stay f32). Raises an :class:`~eigenfast.errors.EigenfastError` naming what the format
    cannot hold (a position-indexed table, say) before any file is written.
    """
    gguf = require("gguf")
    adapter = get_adapter(model)
    _check(model, adapter, dtype)
    vocab = vocabulary(tokenizer, model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        like = next(model.parameters())
        blocks = build_blocks(read_layers(adapter), adapter.d_model, adapter.d_head, like)
        tensors = {name: _stored(name, tensor, dtype) for name, tensor in _tensors(model, adapter, blocks).items()}
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    try:
        _metadata(writer, model, adapter, blocks, vocab, dtype)
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
