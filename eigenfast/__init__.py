"""eigenfast: interpretability-driven pruning of Hugging Face causal LMs, made fast and real.

    result = eigenfast.prune(model, data, p=0.05)          # eigenpruning (SPEC §2)
    scores = eigenfast.score(model, data, components=("k",))
    model = eigenfast.load(directory)                      # after result.save(directory)
    circuit = eigenfast.extract_circuit(model, patch_data, val_data, threshold=0.01)   # SPEC §3
    edges = eigenfast.edge_prune(model, clean, corrupted, target_sparsity=0.95)       # SPEC §4 (also eap, acdc)
"""
from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter
from .circuit import CircuitResult, extract_circuit
from .edges import acdc, eap, edge_prune
from .data import DataError, TaskData, as_task_data, from_jsonl, from_pairs, int_mult, int_sum, load_task
from .forward import evaluate
from .modules import PositionIndexError
from .prune import PruneResult, prune
from .scoring import score
from .serialization import SavedModelError, load

__version__ = "0.1.0"

__all__ = [
    "CircuitResult",
    "DataError",
    "PositionIndexError",
    "PruneResult",
    "SUPPORTED_MODEL_TYPES",
    "SavedModelError",
    "TaskData",
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
    "int_mult",
    "int_sum",
    "load",
    "load_task",
    "prune",
    "score",
]
