"""Edge Pruning started from EAP-IG-inputs' scores, as one registry method so every evaluation can run it.

The shared task's best entries initialise Edge Pruning's masks from EAP-IG scores; here
the scores are EAP-IG-inputs' with ``options.ig_steps`` steps, handed to Edge Pruning
as ``init_scores`` (the edges of largest ``|score|`` start on, the smallest off), and everything
else (sparsity or target, steps, learning rates) is Edge Pruning's own.
"""
from __future__ import annotations

from dataclasses import replace

from . import edge_prune
from .eap_ig import integrated_attributions
from .evaluate import PreparedTask
from .options import EdgeOptions
from .runner import EdgeMethod, Found


def search(task: PreparedTask, options: EdgeOptions) -> Found:
    """EAP-IG-inputs' scores, then Edge Pruning from them (by |score|)."""
    scores = integrated_attributions(task.forward, task.batches, "ig-inputs", options.ig_steps,
                                     "warm start: EAP-IG-inputs" if options.progress else None)
    return edge_prune.search(task, replace(options, init_scores=scores.float()))


WARM_EDGE_PRUNE = EdgeMethod("edge_prune_warm", "edge pruning from EAP-IG", "target_sparsity", "s", search)
