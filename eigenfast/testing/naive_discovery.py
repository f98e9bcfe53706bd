"""Algorithm 1 of the circuit-extraction paper, literally: the reference for :func:`eigenfast.circuit.discover`.

One full hook-ablated forward over D_v per candidate, KL read on the host
after each; nothing cached, stacked or skipped. Tests check the fast search
against it and benches/bench_discovery.py times it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..adapters import get_adapter
from ..circuit.ablation import ablated
from ..circuit.discovery import Component
from ..data.task_data import TaskData, as_task_data
from ..runtime.forward import last_logits
from ..runtime.means import component_means
from ..runtime.metrics import kl_divergence


class NaiveDiscovery(NamedTuple):
    heads: list[tuple[int, int]]  # kept
    mlps: list[int]  # kept
    trace: list[tuple[Component, float, float, bool]]  # (component, kl_before, kl_after, pruned)


@torch.no_grad()
def naive_discover(
    model: nn.Module,
    patch_data: "TaskData | dict | None",
    val_data: "TaskData | dict",
    threshold: float,
    *,
    ablation: str = "mean",
    include_mlps: bool = False,
    extrapolate: str = "mean",
) -> NaiveDiscovery:
    adapter = get_adapter(model)
    val = as_task_data(val_data)
    means = component_means(model, patch_data) if ablation == "mean" else None
    logp_f = torch.log_softmax(last_logits(adapter, val), dim=-1)
    heads: set[tuple[int, int]] = set()
    mlps: set[int] = set()
    kl, trace = 0.0, []
    for layer in reversed(range(adapter.n_layers)):
        candidates = [Component(layer, h) for h in range(adapter.n_heads)]
        candidates += [Component(layer, None)] if include_mlps else []
        for c in candidates:
            trial_heads = heads | ({(layer, c.head)} if c.head is not None else set())
            trial_mlps = mlps | ({layer} if c.head is None else set())
            with ablated(model, trial_heads, trial_mlps, means, ablation, extrapolate):
                kl_after = float(kl_divergence(logp_f, last_logits(adapter, val)).mean())
            pruned = kl_after - kl < threshold
            trace.append((c, kl, kl_after, pruned))
            if pruned:
                heads, mlps, kl = trial_heads, trial_mlps, kl_after
    kept = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in heads]
    return NaiveDiscovery(kept, [l for l in range(adapter.n_layers) if l not in mlps], trace)
