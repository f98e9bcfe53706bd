"""Lets ``transformers`` load an eigenfast save through its custom-code convention.

This file is copied into every saved folder (as ``modeling_eigenfast.py``) and named
by the folder's ``config.json`` ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

returns exactly what ``eigenfast.load(folder)`` returns. Without
``trust_remote_code`` transformers refuses the folder (on an interactive terminal it
first asks whether to run this file; only "y" loads, through eigenfast): its
``model_type`` is ``"eigenfast"``, which no built-in class reads, so the weights (which
only make sense with eigenfast's modules) are never loaded into a plain model. It imports
nothing from eigenfast at module level: transformers copies it on its own.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class EigenfastConfig(PretrainedConfig):
    """The stub config of a saved folder; the real one is in ``eigenfast.json``."""

    model_type = "eigenfast"


class EigenfastForCausalLM:
    """Not a model class: ``from_pretrained`` rebuilds the saved model with ``eigenfast.load``."""

    config_class = EigenfastConfig

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModelForCausalLM") -> None:
        """transformers calls this on remote classes; there is nothing to register."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            import eigenfast
        except ImportError as err:
            raise ImportError(
                f"{pretrained_model_name_or_path} was saved by eigenfast; install eigenfast to load it"
            ) from err
        model = eigenfast.load(pretrained_model_name_or_path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype is not None and dtype != "auto":
            import torch

            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model
