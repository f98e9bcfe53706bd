"""The edge methods by name, listed here (not registered on import), and the one runner over them."""
from __future__ import annotations

from typing import Mapping

from torch import nn

from ..data.task_data import TaskData
from ..errors import ArgumentError
from .acdc import METHOD as ACDC
from .eap import METHOD as EAP
from .eap_ig import ACTIVATIONS as EAP_IG_ACTIVATIONS
from .eap_ig import INPUTS as EAP_IG_INPUTS
from .ensemble import ENSEMBLE
from .edge_prune import METHOD as EDGE_PRUNE
from .evaluate import EdgeCircuit
from .options import EdgeOptions
from .runner import EdgeMethod, run_method
from .warm_start import WARM_EDGE_PRUNE

METHODS: Mapping[str, EdgeMethod] = {m.name: m for m in (EDGE_PRUNE, EAP, EAP_IG_INPUTS, EAP_IG_ACTIVATIONS, ENSEMBLE,
                                                          WARM_EDGE_PRUNE, ACDC)}


def method_named(name: str, methods: Mapping[str, EdgeMethod] = METHODS) -> EdgeMethod:
    if name not in methods:
        raise ArgumentError(f"unknown method {name!r}; choose from {', '.join(methods)}")
    return methods[name]


def run(
    model: nn.Module,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    method: str,
    options: EdgeOptions | None = None,
) -> EdgeCircuit:
    """Find ``method``'s circuit: the clean and corrupted forwards run once, the search is timed, and with
    ``options.evaluate`` the circuit is judged on those same batches (sharded by rank under torch.distributed)."""
    return run_method(model, clean, corrupted, method_named(method), options or EdgeOptions())
