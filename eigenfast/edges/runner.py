"""What an edge method is, and the one way to run one: prepare once, search, time, judge on the same batches."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..data.task_data import TaskData, model_data
from ..runtime.forward import eval_mode, frozen_parameters
from .evaluate import EdgeCircuit, PreparedTask, judge, prepare
from .options import EdgeOptions


@dataclass
class Found:
    """A method's answer over the edge graph."""

    kept: torch.Tensor  # (E,) bool
    scores: torch.Tensor  # (E,) higher means more important
    trace: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class EdgeMethod:
    """One circuit-discovery method as the runner and the comparison see it."""

    name: str  # the registry key, e.g. "eap"
    label: str  # the circuit's method name, e.g. "EAP"
    setting: str  # the EdgeOptions field a comparison sweeps: "target_sparsity" or "threshold"
    symbol: str  # how a report names that setting, e.g. "s" or "τ"
    search: Callable[[PreparedTask, EdgeOptions], Found]
    # A node-level method that runs its own forwards leaves the shared preparation out of its time.
    reads_batches: bool = True

    def find(self, task: PreparedTask, options: EdgeOptions) -> EdgeCircuit:
        """The method's circuit on prepared batches, timed (with the preparation when it reads the batches)."""
        start = time.perf_counter()
        found = self.search(task, options)
        seconds = time.perf_counter() - start + (task.seconds if self.reads_batches else 0.0)
        return EdgeCircuit(self.label, task.graph, found.kept.bool().cpu(), found.scores.detach().float().cpu(),
                           seconds, found.trace)


def run_method(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    method: EdgeMethod,
    options: EdgeOptions,
) -> EdgeCircuit:
    """Prepare the batches once, find ``method``'s circuit and, with ``options.evaluate``, judge it on them."""
    clean, corrupted = model_data(clean, model), model_data(corrupted, model)
    with eval_mode(model), frozen_parameters(model):
        task = prepare(model, clean, corrupted, options.batch_size)
        circuit = method.find(task, options)
        if options.evaluate:
            circuit.report = judge(task, circuit)
    return circuit
