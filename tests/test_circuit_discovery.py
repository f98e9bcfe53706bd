"""Circuit discovery: means, hook ablation, and the fast search against a literal Algorithm 1."""
from __future__ import annotations

import pytest
import torch

from eigenfast.adapters import get_adapter
from eigenfast.circuit import Component, ablated, component_means, discover
from eigenfast.circuit.discovery import kl_divergence
from eigenfast.forward import last_logits
from eigenfast.modules import PositionIndexError

from conftest import make_data, make_model


@torch.no_grad()
def naive_discover(model, patch_data, val_data, threshold, ablation="mean", include_mlps=False):
    """Algorithm 1 as written: one full hook-ablated forward over D_v per candidate.

    Returns the kept heads, kept MLPs and the (component, kl_before, kl_after, pruned) trace.
    """
    adapter = get_adapter(model)
    means = component_means(model, patch_data) if ablation == "mean" else None
    logp_f = torch.log_softmax(last_logits(adapter, val_data), dim=-1)
    heads, mlps, kl, trace = set(), set(), 0.0, []
    for layer in reversed(range(adapter.n_layers)):
        candidates = [Component(layer, h) for h in range(adapter.n_heads)]
        candidates += [Component(layer, None)] if include_mlps else []
        for c in candidates:
            trial_heads = heads | ({(layer, c.head)} if c.head is not None else set())
            trial_mlps = mlps | ({layer} if c.head is None else set())
            with ablated(model, trial_heads, trial_mlps, means, ablation):
                kl_after = float(kl_divergence(logp_f, last_logits(adapter, val_data)).mean())
            pruned = kl_after - kl < threshold
            trace.append((c, kl, kl_after, pruned))
            if pruned:
                heads, mlps, kl = trial_heads, trial_mlps, kl_after
    kept = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in heads]
    return kept, [l for l in range(adapter.n_layers) if l not in mlps], trace
