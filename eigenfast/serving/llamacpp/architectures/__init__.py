"""llama.cpp's architectures eigenfast writes, one module each, picked by the model's adapter family:
what is particular to one architecture lives in its module, and writer.py above them is blind to it."""
from __future__ import annotations

from typing import Any

from torch import nn

from ....errors import UnsupportedModelError
from .base import Architecture
from .deci import Deci
from .gpt2 import GPT2
from .gptneox import GPTNeoX
from .phi2 import Phi2

BY_FAMILY: dict[str, type[Architecture]] = {"Llama": Deci, "GPT-2": GPT2, "GPT-NeoX": GPTNeoX, "Phi": Phi2}


def architecture(model: nn.Module, adapter: Any) -> Architecture:
    """The architecture ``model`` is written as, its checks run (before anything is written)."""
    kind = BY_FAMILY.get(adapter.family)
    if kind is None:
        raise UnsupportedModelError(f"no GGUF architecture is written for {adapter.family} models yet: export it "
                                    "with eigenfast.serving.to_onnx")
    chosen = kind(model, adapter)
    chosen.check()
    return chosen


__all__ = ["Architecture", "architecture"]
