"""eigenfast: interpretability-driven pruning of Hugging Face causal LMs, made fast and real.

    result = eigenfast.prune(model, data, p=0.05)          # eigenpruning (docs/MATH.md §2)
    scores = eigenfast.score(model, data, components=("k",))
    model = eigenfast.load(directory)                      # after result.save(directory)
    circuit = eigenfast.extract_circuit(model, patch_data, val_data, threshold=0.01)   # docs/MATH.md §4
    edges = eigenfast.edge_prune(model, clean, corrupted, target_sparsity=0.95)       # docs/EDGES.md (also eap, acdc)

Every error eigenfast raises on purpose is an ``eigenfast.EigenfastError``.
"""
from .adapters import SUPPORTED_MODEL_TYPES, get_adapter
from .circuit import CircuitResult, extract_circuit
from .data.task_data import TaskData, as_task_data, from_jsonl, from_pairs, int_mult, int_sum
from .data.tasks import induction, load_task
from .edges import acdc, eap, edge_prune
from .eigenprune.prune import PruneResult, prune
from .eigenprune.scoring import score
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
from .runtime.forward import evaluate
from .saving.loading import load_model
from .saving.serialization import load

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "CircuitFileError",
    "CircuitResult",
    "DataError",
    "EigenfastError",
    "MissingFilesError",
    "ModelLoadError",
    "OutputExistsError",
    "PositionIndexError",
    "PositionLimitError",
    "PruneResult",
    "SUPPORTED_MODEL_TYPES",
    "SaveError",
    "SavedModelError",
    "StateError",
    "TaskData",
    "TransformersVersionError",
    "UnknownAttributeError",
    "UnsupportedModelError",
    "acdc",
    "as_task_data",
    "eap",
    "edge_prune",
    "evaluate",
    "extract_circuit",
    "from_jsonl",
    "from_pairs",
    "get_adapter",
    "induction",
    "int_mult",
    "int_sum",
    "load",
    "load_model",
    "load_task",
    "prune",
    "score",
]
