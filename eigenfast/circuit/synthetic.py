"""A task whose circuit is known by construction, for checking discovery (TPR/FPR).

A small random model keeps the output projection of a chosen set of heads and
has every other head's slice of it zeroed: those heads write nothing to the
residual stream, so ablating them (zero or mean: their mean is zero too)
leaves every logit unchanged, while the kept heads' slices are scaled up so
that each visibly matters. Labels are the model's own predictions, so the full
model is 100% accurate and a circuit's accuracy says how much of it survives.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import get_adapter, projection_matrix
from ..data.task_data import TaskData
from ..runtime.forward import last_logits


class SyntheticTask(NamedTuple):
    model: nn.Module
    patch_data: TaskData
    val_data: TaskData
    true_heads: list[tuple[int, int]]


def synthetic_task(
    model_type: str = "gpt2",
    n_layers: int = 3,
    n_heads: int = 4,
    d_model: int = 64,
    true_heads: Sequence[tuple[int, int]] = ((0, 1), (1, 3), (2, 0)),
    n_patch: int = 32,
    n_val: int = 16,
    length: int = 8,
    vocab: int = 64,
    head_scale: float = 4.0,
    seed: int = 0,
) -> SyntheticTask:
    """A random ``model_type`` model in which only ``true_heads`` write to the residual stream."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * d_model,
        max_position_embeddings=max(length, 16),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    adapter = get_adapter(model)
    truth = sorted({(int(l), int(h)) for l, h in true_heads})
    with torch.no_grad():
        for layer in range(n_layers):
            site = adapter.site(layer, "o")
            A = projection_matrix(model.get_submodule(site.path))
            for head in range(n_heads):
                A[site.in_index[head]] *= head_scale if (layer, head) in truth else 0.0

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n_patch + n_val, length), generator=g)
    with torch.no_grad():
        labels = last_logits(adapter, TaskData(ids, torch.zeros(len(ids), dtype=torch.long))).argmax(-1)
    data = TaskData(ids, labels)
    return SyntheticTask(model, data.subset(range(n_patch)), data.subset(range(n_patch, n_patch + n_val)), truth)


def head_rates(
    found: Sequence[tuple[int, int]], truth: Sequence[tuple[int, int]], n_layers: int, n_heads: int
) -> tuple[float, float]:
    """(TPR, FPR) of a found set of heads against the true circuit."""
    found, truth = set(found), set(truth)
    negatives = n_layers * n_heads - len(truth)
    tpr = len(found & truth) / len(truth) if truth else 1.0
    fpr = len(found - truth) / negatives if negatives else 0.0
    return tpr, fpr
