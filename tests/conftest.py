"""Tiny randomly initialised models of every supported family, and task data for them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

from eigenfast.data.task_data import TaskData

os.environ.setdefault("EIGENFAST_QUIET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

VOCAB = 40
IDS = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
CONFIGS = {
    "gpt2": lambda: GPT2Config(**IDS, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "neox": lambda: GPTNeoXConfig(
        **IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, rotary_pct=0.5,
    ),
    "llama": lambda: LlamaConfig(
        **IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32,
    ),
    "mistral": lambda: MistralConfig(
        **IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=48, max_position_embeddings=32,
    ),
    "qwen2": lambda: Qwen2Config(
        **IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=32,
    ),
    "phi": lambda: PhiConfig(
        **IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, partial_rotary_factor=0.5,
    ),
}
FAMILIES = ("gpt2", "neox", "llama", "phi")  # one per adapter
ALL_CONFIGS = tuple(CONFIGS)


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            # Larger-than-default weights and biases so every term matters and nothing is trivially zero.
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def make_data(n: int = 12, length: int = 6, seed: int = 0, padded: bool = False) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    mask = None
    if padded:
        lengths = torch.randint(2, length + 1, (n,), generator=g)
        lengths[0] = length
        mask = (torch.arange(length).unsqueeze(0) >= (length - lengths).unsqueeze(1)).long()
        ids = ids * mask
    return TaskData(ids, labels, mask)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=ALL_CONFIGS)
def config_name(request) -> str:
    return request.param


def assert_static_cache_equals_dynamic(model: torch.nn.Module) -> None:
    """Greedy generate() with a static KV cache scores every step as with the dynamic one (left padding included)."""
    prompt = make_data(n=2, length=5, seed=5).input_ids
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    scores = {}
    for cache in ("dynamic", "static"):
        out = model.generate(
            prompt * mask, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True, cache_implementation=cache,
        )
        scores[cache] = torch.stack(out.scores, dim=1)
    torch.testing.assert_close(scores["static"], scores["dynamic"], rtol=0, atol=1e-5)


def start_training(out: Path, steps: int, module: str = "eigenfast.builtin.train") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", module, "--out", str(out), "--steps", str(steps)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
