"""Edge scores of several methods combined: each turned into ranks in [0, 1], then averaged.

Scores of different methods live on different scales (gradients, KL increases, mask
logits), so only their orders are comparable. ``ENSEMBLE`` averages EAP's and
EAP-IG-inputs' ranks and then chooses edges like any score method.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ArgumentError
from . import target
from .eap import edge_attributions
from .eap_ig import integrated_attributions
from .evaluate import PreparedTask
from .options import EdgeOptions
from .runner import EdgeMethod, Found


def rank_normalised(scores: torch.Tensor) -> torch.Tensor:
    """Each score's rank scaled to [0, 1] (1 the highest; ties by index)."""
    ranks = torch.empty(len(scores))
    ranks[torch.argsort(scores.detach().cpu().float(), stable=True)] = torch.arange(len(scores), dtype=torch.float32)
    return ranks / max(1, len(scores) - 1)


def average_ranks(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of each method's rank-normalised scores ``(E,)`` (e.g. ``[c.scores for c in circuits]``)."""
    if not scores or len({len(s) for s in scores}) != 1:
        raise ArgumentError(f"average_ranks needs one or more score vectors of one length (one per edge), got "
                            f"lengths {[len(s) for s in scores]}: pass circuits found on the same model")
    return torch.stack([rank_normalised(s) for s in scores]).mean(0)


def search(task: PreparedTask, options: EdgeOptions) -> Found:
    """EAP's and EAP-IG-inputs' |scores| as averaged ranks; keep a fraction or the fewest that reach the target."""
    quiet = not options.progress
    eap = edge_attributions(task.forward, task.batches, None if quiet else "ensemble: EAP")
    ig = integrated_attributions(task.forward, task.batches, "ig-inputs", options.ig_steps,
                                 None if quiet else "ensemble: EAP-IG-inputs")
    return target.choose(task, average_ranks([eap.abs(), ig.abs()]), options)


ENSEMBLE = EdgeMethod("ensemble", "EAP+EAP-IG ranks", "target_sparsity", "s", search)
