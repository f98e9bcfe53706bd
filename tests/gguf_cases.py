"""Models for the GGUF tests: random-init Llama, Mistral and Qwen2 extracted with uneven kept GQA groups,
attention removed in the first and in later layers, MLPs removed, and (Llama, with biases everywhere)
nonzero constants left by the removed parts; and the optional packages, whose absence skips a test
except where CI asks for them."""
from __future__ import annotations

import copy
import importlib
import os
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from eigenfast.rewrite.removal import remove_components

# .ci/run sets it: there a missing gguf or llama-cpp-python is a failed install, not a reason to skip.
REQUIRE_ENV = "EIGENFAST_REQUIRE_GGUF"

SIZES = {"hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 96, "vocab_size": 96, "max_position_embeddings": 64,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True),
    "mistral": lambda: MistralConfig(**SIZES, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SIZES, tie_word_embeddings=True),
}
# Layer 0: attention gone (a padding head carries its constant); 1: one head of KV head 0 gone (groups 1 and 2)
# and the MLP; 2: attention gone (its constant moves to layer 1); 3: both gone (identity, or a constant); 4: kept.
HEADS = {0: [0, 1, 2, 3], 1: [1], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
MLPS = [1, 3]


def requires(name: str) -> ModuleType:
    """The optional package, or a skip that names it (a failure where CI requires it)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {name} is not installed ({exc}): the [gguf] extra's install failed")
        pytest.skip(f"{name} is not installed (pip install 'eigenfast[gguf]')")


def base_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager").eval()
    with torch.no_grad():  # HF starts biases and norms at 0 and 1: random ones exercise every slot they go into
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def extracted(family: str, heads: dict[int, list[int]] = HEADS, mlps: list[int] = MLPS) -> torch.nn.Module:
    """Zero ablation: the removed parts leave constants (their leftover biases), which GGUF can hold."""
    model = copy.deepcopy(base_model(family))
    remove_components(model, heads, mlps, None, ablation="zero")
    return model


def prompt(length: int = 12, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SIZES["vocab_size"], (length,), generator=g).tolist()
