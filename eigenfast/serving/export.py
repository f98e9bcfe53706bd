"""Exporting pruned and extracted models for serving: ``torch.export``, AOTInductor packages, ONNX.

A model eigenfast changed is an ordinary HF model whose forward takes token positions
as arguments (eigenfast/rewrite/positional.py), so it exports like its base model. The one
thing an exporter may not know is eigenfast's token-bias operator: ONNX has no
kernel for it, so :func:`decompositions` rewrites it into standard ops (matmul,
gather, add) before the conversion. ``torch.export`` and AOTInductor keep the op
(its fake kernel traces it, its C++ kernel runs it).

Two things are exported, batch and lengths dynamic: ``logits = model(input_ids,
position_ids)`` without a KV cache (:func:`export`, :func:`to_onnx`), and for decoding
with a KV cache a prefill and a decode step that take and return the cache as plain
tensors (:class:`DecodeStep`, :func:`export_decoder`, :func:`decoder_to_onnx`).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from ..adapters import get_adapter
from ..adapters.calls import cache_keyword
from ..errors import UnsupportedModelError
from ..runtime.forward import model_device


class LogitsOnly(nn.Module):
    """``(input_ids, position_ids) -> logits``: the signature every exporter gets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def cached_layers(model: nn.Module) -> list[int]:
    """The layers whose attention keeps a KV cache: all but those extraction removed."""
    adapter = get_adapter(model)
    return [layer for layer in range(adapter.n_layers) if adapter.has_component(layer, "k")]


class DecodeStep(nn.Module):
    """``(input_ids, position_ids, past) -> (last position's logits, *present)``: one step of decoding
    with the KV cache as plain tensors, which exporters take as inputs and outputs.

    ``past`` holds ``keys, values`` of each :func:`cached_layers` layer in order, each ``(B, kv_heads, P,
    d_head)`` (kv_heads may differ per layer after extraction); ``present`` is the same with the new
    positions appended. An empty ``past`` is the prefill. The cache grows by concatenation (a
    ``DynamicCache``): StaticCache's in-place writes would be mutated inputs, which exporters handle badly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = cached_layers(model)
        if not self.layers:
            raise UnsupportedModelError("the model keeps no attention layer, so there is no KV cache to export: "
                                        "export its forward with to_onnx instead")
        self.n_layers = get_adapter(model).n_layers
        self.cache_keyword = cache_keyword(model)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: tuple[torch.Tensor, ...] = ()
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache()
        if past:
            # A removed attention appends a one-wide placeholder per position (transformers reads the cache
            # length off layer 0): rebuilt here rather than carried, it costs the exported graph no input.
            placeholder = past[0].new_zeros(past[0].shape[0], 1, past[0].shape[2], 1)
            kept = dict(zip(self.layers, zip(past[0::2], past[1::2])))
            cache = DynamicCache([kept.get(layer, (placeholder, placeholder)) for layer in range(self.n_layers)])
        logits = self.model(input_ids=input_ids, position_ids=position_ids, **{self.cache_keyword: cache},
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        return (logits, *(t for layer in self.layers for t in (cache.layers[layer].keys, cache.layers[layer].values)))


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


# Known-harmless messages of torch's exporters, filtered by message for the export only: the ONNX exporter
# lists the torchvision ops it skips when torchvision is absent (eigenfast exports none), and torch.export's
# own pytree code trips a deprecation of its LeafSpec class.
_ONNX_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_SKIPPED_TORCHVISION = "torchvision is not installed"
_LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _not_torchvision_skip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_SKIPPED_TORCHVISION)


@contextlib.contextmanager
def _known_warnings_off() -> Iterator[None]:
    registry = logging.getLogger(_ONNX_REGISTRY_LOGGER)
    registry.addFilter(_not_torchvision_skip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAFSPEC_DEPRECATION, category=FutureWarning)
            yield
    finally:
        registry.removeFilter(_not_torchvision_skip)


def _limit(model: nn.Module, max_length: int | None) -> int:
    return max_length or int(getattr(model.config, "max_position_embeddings", None) or 4096)


def export(model: nn.Module, max_batch: int = 1024, max_length: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (eval mode) with a dynamic batch and sequence length."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    length = torch.export.Dim("length", min=2, max=_limit(model, max_length))
    dims = {0: batch, 1: length}
    with torch.no_grad(), _known_warnings_off():
        return torch.export.export(LogitsOnly(model.eval()), example_inputs(model), dynamic_shapes=(dims, dims))


def export_decoder(
    model: nn.Module, max_batch: int = 1024, max_length: int | None = None
) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
    """``torch.export`` of :class:`DecodeStep` twice: the prefill (no past) and the decode step (a past),
    batch, new-token length and past length dynamic. Two programs: transformers branches on whether the cache is
    empty (``DynamicLayer.get_seq_length``), and an exported graph keeps one branch."""
    step = DecodeStep(model.eval())
    limit = _limit(model, max_length)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    tokens = {0: batch, 1: torch.export.Dim("length", min=1, max=limit)}
    past_dims = {0: batch, 2: torch.export.Dim("past", min=1, max=limit - 1)}
    # Contiguous examples of sizes distinct from each other, so no size is specialised on a coincidence.
    ids, positions = (t.contiguous() for t in example_inputs(model, batch=2, length=5))
    with torch.no_grad(), _known_warnings_off():
        prefill = torch.export.export(step, (ids, positions), dynamic_shapes=(tokens, tokens))
        _, *past = step(ids, positions)
        at = torch.arange(5, 8, device=ids.device).repeat(2, 1)
        decode = torch.export.export(step, (ids[:, :3].contiguous(), at, tuple(past)),
                                     dynamic_shapes=(tokens, tokens, tuple(past_dims for _ in past)))
    return prefill, decode


def _onnx_file(program: torch.export.ExportedProgram, path: str | Path, output_names: list[str] | None = None) -> Path:
    path = Path(path)
    with _known_warnings_off():
        # verbose=False: no "[torch.onnx] ..." line per export step
        torch.onnx.export(program.run_decompositions(decompositions()), f=str(path), dynamo=True,
                          output_names=output_names, verbose=False)
    return path


def to_onnx(model: nn.Module, path: str | Path, **limits: int) -> Path:
    """An ONNX file of ``model`` (dynamo exporter), the token-bias ops decomposed; run it with ONNX Runtime."""
    return _onnx_file(export(model, **limits), path)


def decoder_to_onnx(model: nn.Module, folder: str | Path, **limits: int) -> tuple[Path, Path]:
    """``prefill.onnx`` and ``decode_step.onnx`` of :func:`export_decoder` in ``folder``; ONNX Runtime
    decodes with them in :func:`eigenfast.serving.decode.onnx_decode`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefill, step = export_decoder(model, **limits)
    # Outputs named as the inputs they feed: present_i is the next step's past_i.
    names = ["logits"] + [f"present_{i}" for i in range(2 * len(cached_layers(model)))]
    return (_onnx_file(prefill, folder / "prefill.onnx", names), _onnx_file(step, folder / "decode_step.onnx", names))


def aoti_package(model: nn.Module, path: str | Path, **limits: int) -> Path:
    """An AOTInductor package (``.pt2``) of ``model``; load it with ``torch._inductor.aoti_load_package``.

    Inductor compiles C++ for the CPU (or CUDA), which takes a minute or more. The process
    that runs the package must ``import eigenfast.ops`` first: that registers the token-bias
    op a model with position tables calls (``import eigenfast`` alone loads nothing).
    """
    path = Path(path)
    return Path(torch._inductor.aoti_compile_and_package(export(model, **limits), package_path=str(path)))
