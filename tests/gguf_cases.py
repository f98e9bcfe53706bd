"""Models for the GGUF tests: random-init Llama, Mistral and Qwen2 extracted with uneven kept GQA groups,
attention removed in the first and in later layers, MLPs removed, and (Llama, with biases everywhere)
nonzero constants left by the removed parts; GPT-2, GPT-NeoX (parallel and sequential residual) and Phi
(GQA, partial rotary) extracted with uneven head counts and removed blocks (written zero-filled); and the
optional packages, whose absence skips a test except where CI asks for them."""
from __future__ import annotations

import copy
import importlib
import os
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, PhiConfig, Qwen2Config

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
IDS = {"vocab_size": 96, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
NEOX = {"hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4, "intermediate_size": 96,
        "max_position_embeddings": 64, "hidden_act": "gelu_new", **IDS}
# llama.cpp's own architectures for these, every layer with the same heads: removed parts are zero-filled.
DENSE_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=5, n_head=4, n_positions=64, **IDS),
    "gpt_neox": lambda: GPTNeoXConfig(**NEOX, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.5}),
    "gpt_neox_sequential": lambda: GPTNeoXConfig(**NEOX, use_parallel_residual=False, attention_bias=False),
    "phi": lambda: PhiConfig(**{**NEOX, "num_key_value_heads": 2}),
}
# Layers 0 and 1: uneven heads left (2 and 3 of 4; with Phi's GQA, one KV head read by one query head and the
# other by two); 2: attention gone; 3: MLP gone; 4: both gone.
DENSE_HEADS = {0: [1, 3], 1: [0], 2: [0, 1, 2, 3], 4: [0, 1, 2, 3]}
DENSE_MLPS = [3, 4]
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
    config = {**CONFIGS, **DENSE_CONFIGS}[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF starts biases and norms at 0 and 1: random ones exercise every slot they go into
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def extracted(family: str, heads: dict[int, list[int]] | None = None, mlps: list[int] | None = None) -> torch.nn.Module:
    """Zero ablation: the removed parts leave constants (their leftover biases), which GGUF can hold."""
    dense = family in DENSE_CONFIGS
    heads = (DENSE_HEADS if dense else HEADS) if heads is None else heads
    mlps = (DENSE_MLPS if dense else MLPS) if mlps is None else mlps
    model = copy.deepcopy(base_model(family))
    remove_components(model, heads, mlps, None, ablation="zero")
    return model


def prompt(length: int = 12, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SIZES["vocab_size"], (length,), generator=g).tolist()


# Strings for byte-level BPE: contractions, digits, runs of spaces and newlines, accents, CJK, emoji, code.
BPE_TEXTS = [
    "Hello world", " leading space", "trailing space ", "two  spaces", "tabs\tand\nnewlines\n\n",
    "don't I'll we're you've he'd I'm it's", "12+7=19", "3.14159 and 1,000,000", "naïve café résumé", "日本語のテキスト",
    "emoji 🙂🙃", "  \n  ", "UPPER lower MiXeD", "a" * 30, "x=f(y)//2; z[0] += 1", "The quick brown fox.",
    "unseen words: zebra quixotic", "'s 's'", "-- -> => !== ???",
]


def byte_level_bpe():
    """A GPT-2-style byte-level BPE tokenizer trained in code on a small varied corpus (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The quick brown fox jumps over the lazy dog.", "I don't think they'll see it; we're sure you've done it.",
              "12 + 7 = 19, 401 + 3 = 404", "naïve café résumé — 日本語のテキスト 🙂", "def f(x):\n    return x * 2\n"] * 20
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
