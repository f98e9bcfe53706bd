"""Exporting pruned and extracted models for serving: ``torch.export``, AOTInductor packages, ONNX.

A model eigenfast changed is an ordinary HF model whose forward takes token positions
as arguments (eigenfast/positional.py), so it exports like its base model. The one
thing an exporter may not know is eigenfast's token-bias operator: ONNX has no
kernel for it, so :func:`decompositions` rewrites it into standard ops (matmul,
gather, add) before the conversion. ``torch.export`` and AOTInductor keep the op
(its fake kernel traces it, its C++ kernel runs it).

What is exported is ``logits = model(input_ids, position_ids)`` without a KV cache,
batch and sequence length dynamic.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .forward import model_device


class LogitsOnly(nn.Module):
    """``(input_ids, position_ids) -> logits``: the signature every exporter gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _gathered(table: torch.Tensor, pos: torch.Tensor, clamp_pos: bool) -> torch.Tensor:
    return table[pos.clamp(0, table.shape[0] - 1) if clamp_pos else pos]


def _linear(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, clamp_pos: bool = False) -> torch.Tensor:
    return torch.matmul(x, weight.t()) + _gathered(table, pos, clamp_pos)


def _add(y: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, clamp_pos: bool = False) -> torch.Tensor:
    return y + _gathered(table, pos, clamp_pos)


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """eigenfast's token-bias ops as standard ops, for ``ExportedProgram.run_decompositions``."""
    return {torch.ops.eigenfast.token_bias_linear.default: _linear, torch.ops.eigenfast.token_bias_add.default: _add}


def example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and positions to trace with (any values in the vocabulary do)."""
    device = model_device(model)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, length), device=device)
    return ids, torch.arange(length, device=device).expand(batch, length)


def export(model: nn.Module, max_batch: int = 1024, max_length: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (eval mode) with a dynamic batch and sequence length."""
    limit = max_length or int(getattr(model.config, "max_position_embeddings", None) or 4096)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    length = torch.export.Dim("length", min=2, max=limit)
    dims = {0: batch, 1: length}
    with torch.no_grad():
        return torch.export.export(LogitsOnly(model.eval()), example_inputs(model), dynamic_shapes=(dims, dims))


def to_onnx(model: nn.Module, path: str | Path, **limits: int) -> Path:
    """An ONNX file of ``model`` (dynamo exporter), the token-bias ops decomposed; run it with ONNX Runtime."""
    program = export(model, **limits).run_decompositions(decompositions())
    path = Path(path)
    torch.onnx.export(program, f=str(path), dynamo=True)
    return path


def aoti_package(model: nn.Module, path: str | Path, **limits: int) -> Path:
    """An AOTInductor package (``.pt2``) of ``model``; load it with ``torch._inductor.aoti_load_package``.

    Inductor compiles C++ for the CPU (or CUDA), which takes a minute or more.
    """
    path = Path(path)
    return Path(torch._inductor.aoti_compile_and_package(export(model, **limits), package_path=str(path)))
