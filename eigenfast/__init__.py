"""eigenfast: interpretability-driven pruning of Hugging Face causal LMs, made fast and real.

    result = eigenfast.prune(model, data, p=0.05)          # eigenpruning (docs/MATH.md §2)
    scores = eigenfast.score(model, data, components=("k",))
    model = eigenfast.load(directory)                      # after result.save(directory)
    circuit = eigenfast.extract_circuit(model, patch_data, val_data, threshold=0.01)   # docs/MATH.md §4
    edges = eigenfast.edge_prune(model, clean, corrupted, target_sparsity=0.95)       # docs/EDGES.md (also eap, acdc)

Every error eigenfast raises on purpose is an ``eigenfast.EigenfastError``.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    ArgumentError,
    ArgumentTypeError,
    CircuitFileError,
    DataError,
    EigenfastError,
    MissingFilesError,
    ModelLoadError,
    OutputExistsError,
    PositionIndexError,
    PositionLimitError,
    SavedModelError,
    SaveError,
    StateError,
    TransformersVersionError,
    UnknownAttributeError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# The public functions and classes, each with the module that defines it. They are imported on first
# use (PEP 562), so `import eigenfast` loads no torch: the command line starts at once and catches a
# Ctrl-C that comes while torch loads (eigenfast/cli.py), and the errors above stay importable alone.
_LAZY = {
    "SUPPORTED_MODEL_TYPES": ".adapters",
    "get_adapter": ".adapters",
    "CircuitResult": ".circuit",
    "extract_circuit": ".circuit",
    "TaskData": ".data.task_data",
    "as_task_data": ".data.task_data",
    "from_jsonl": ".data.task_data",
    "from_pairs": ".data.task_data",
    "int_mult": ".data.task_data",
    "int_sum": ".data.task_data",
    "induction": ".data.tasks",
    "load_task": ".data.tasks",
    "acdc": ".edges",
    "eap": ".edges",
    "edge_prune": ".edges",
    "PruneResult": ".eigenprune.prune",
    "prune": ".eigenprune.prune",
    "score": ".eigenprune.scoring",
    "evaluate": ".runtime.forward",
    "load_model": ".saving.loading",
    "load": ".saving.serialization",
}

__all__ = sorted([
    "ArgumentError",
    "ArgumentTypeError",
    "CircuitFileError",
    "DataError",
    "EigenfastError",
    "MissingFilesError",
    "ModelLoadError",
    "OutputExistsError",
    "PositionIndexError",
    "PositionLimitError",
    "SaveError",
    "SavedModelError",
    "StateError",
    "TransformersVersionError",
    "UnknownAttributeError",
    "UnsupportedModelError",
    *_LAZY,
])


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise UnknownAttributeError(f"module 'eigenfast' has no attribute {name!r}; its public names are "
                                    f"eigenfast.__all__")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
