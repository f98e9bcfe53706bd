"""Eigenpruning (docs/MATH.md §2): SVD each selected matrix (``svd``), score every rank-one term
with a two-pass attribution estimate (``scoring``, the per-batch statistics in ``attribution``),
fold the lowest fraction into position-indexed biases (``freezing``), and the entry point with
``p="auto"`` and its report (``prune``). ``verification`` measures the lowest candidates exactly
(``estimate="verified"``); ``finetune`` is the table's fine-tuning baselines; ``table`` is the
paper's evaluation protocol."""
from .prune import PruneResult, prune
from .scoring import score

__all__ = ["PruneResult", "prune", "score"]
