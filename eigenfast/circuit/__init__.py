"""Circuit extraction (SPEC §3): find the heads and MLPs a task needs, then cut the rest out."""
from .ablation import ABLATIONS, Ablation, ablated
from .discovery import Component, Discovery, Step, discover
from .means import ComponentMeans, component_means

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
