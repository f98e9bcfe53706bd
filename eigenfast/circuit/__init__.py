"""Circuit extraction (docs/MATH.md §4): find the heads and MLPs a task needs, then cut the rest out."""
from ..rewrite.removal import ABLATIONS, ComponentMeans, remove_components
from ..runtime.means import component_means
from .ablation import Ablation, ablated
from .discovery import Component, Discovery, Step, discover

__all__ = [
    "ABLATIONS",
    "Ablation",
    "Component",
    "ComponentMeans",
    "Discovery",
    "Step",
    "ablated",
    "component_means",
    "discover",
]

# Physical removal and the extraction pipeline (docs/MATH.md §4, "truly pruning").
from .extract import CircuitResult, extract_circuit  # noqa: E402
from .report import CircuitReport  # noqa: E402
from .sweep import Sweep, sweep  # noqa: E402

__all__ += ["CircuitReport", "CircuitResult", "Sweep", "extract_circuit", "remove_components", "sweep"]
