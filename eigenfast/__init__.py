"""eigenfast: interpretability-driven pruning of Hugging Face causal LMs, made fast and real.

    result = eigenfast.prune(model, data, p=0.05)          # eigenpruning (SPEC §2)
    scores = eigenfast.score(model, data, components=("k",))
    model = eigenfast.load(directory)                      # after result.save(directory)
    circuit = eigenfast.extract_circuit(model, patch_data, val_data, threshold=0.01)   # SPEC §3
"""
from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter
from .circuit import CircuitResult, extract_circuit
from .data import DataError, TaskData, as_task_data, from_jsonl, from_pairs, int_mult, int_sum, load_task
from .forward import evaluate
from .modules import PositionIndexError
from .prune import PruneResult, prune
from .scoring import score
from .serialization import SavedModelError, load
from .tasks import induction

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
    "as_task_data",
    "evaluate",
    "extract_circuit",
    "from_jsonl",
    "from_pairs",
    "get_adapter",
    "induction",
    "int_mult",
    "int_sum",
    "load",
    "load_task",
    "prune",
    "score",
]
