"""Forwards that read only the last position: the loss, accuracy and KL all live there."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..data.task_data import TaskData, model_data
from .progress import progress


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the duration, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """The model's parameters out of autograd for the block (their flags restored after): gradients flow
    to activations (scoring) or masks (edge methods) only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def last_logits(adapter: Adapter, batch: TaskData) -> torch.Tensor:
    """Next-token logits ``(B, vocab)`` at each example's last real token (the LM head runs there only)."""
    inputs = batch.model_inputs(model_device(adapter.model))
    hidden = adapter.backbone()(**inputs, use_cache=False).last_hidden_state
    return adapter.lm_head()(hidden[:, -1]).float()


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    n: int
    # Per example, in the data's order: whether the argmax was the label (paired tests of two models need it).
    correct: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n}


@torch.inference_mode()  # also skips the Python autograd layer of eigenfast's ops
def evaluate(model: nn.Module, data: "TaskData | dict", batch_size: int = 64, desc: str | None = None) -> Evaluation:
    """Accuracy (argmax == label) and mean cross-entropy of the next token."""
    data = model_data(data, model)
    adapter = get_adapter(model)
    correct, loss = [], 0.0
    with eval_mode(model):
        for batch in progress(data.batches(batch_size), total=-(-len(data) // batch_size), desc=desc):
            logits = last_logits(adapter, batch)
            labels = batch.labels.to(logits.device)
            correct.append((logits.argmax(-1) == labels).cpu())
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    right = torch.cat(correct)
    return Evaluation(int(right.sum()) / len(data), loss / len(data), len(data), right)
