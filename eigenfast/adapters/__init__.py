"""Per-architecture adapters onto one common view; pick one with :func:`get_adapter`."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import (
    COMPONENTS,
    Adapter,
    Site,
    head_inputs,
    head_matrices,
    head_outputs,
    projection_matrix,
)
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .neox import NeoXAdapter
from .phi import PhiAdapter

ADAPTERS: tuple[type[Adapter], ...] = (GPT2Adapter, NeoXAdapter, LlamaAdapter, PhiAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a HF causal LM, or an error naming the supported architectures (or the
    transformers call the adapter cannot make: :meth:`Adapter.check_calls`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for kind in ADAPTERS:
        if model_type in kind.model_types:
            adapter = kind(model)
            adapter.check_calls()
            return adapter
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r} ({type(model).__name__}); eigenfast supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} causal LMs (GPT-2, GPT-NeoX/Pythia, Llama/Mistral/Qwen2, Phi)"
    )


__all__ = [
    "COMPONENTS",
    "Adapter",
    "Site",
    "UnsupportedModelError",
    "SUPPORTED_MODEL_TYPES",
    "get_adapter",
    "head_inputs",
    "head_matrices",
    "head_outputs",
    "projection_matrix",
]
