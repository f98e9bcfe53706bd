"""The one result type and the one evaluation every circuit-discovery method goes through.

A circuit is judged at edge level: its edges carry the clean activations, every
other edge the counterfactual ones (the same masked forward the methods use).
Algorithm 1's node-level circuits are judged the same way, with every edge out
of a kept node kept. On a task whose true structure is known, the edges that can
matter are the positives (see :func:`true_edges`) for TPR, FPR and ROC AUC.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..data.task_data import TaskData, model_data
from ..errors import ArgumentError, DataError
from ..runtime import distributed
from ..runtime.deprecation import renamed_keywords
from ..runtime.forward import eval_mode
from ..runtime.metrics import kl_divergence
from .graph import EdgeGraph
from .masked_forward import EdgeForward, Prepared


@dataclass
class EdgeReport:
    """How a circuit does: KL(f‖circuit), accuracy, what it keeps, its wall time and agreement with a known circuit."""

    method: str
    kl: float
    accuracy: float
    full_accuracy: float
    edges_kept: int
    n_edges: int
    heads_kept: int
    n_heads: int
    mlps_kept: int
    n_layers: int
    seconds: float
    n: int
    tpr: float | None = None
    fpr: float | None = None
    auc: float | None = None

    HEADER = f"{'method':<22}{'KL':>9}{'acc':>8}{'edges':>13}{'heads':>9}{'MLPs':>7}{'time s':>9}{'TPR':>6}{'FPR':>6}{'AUC':>6}"

    def row(self) -> str:
        known = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        return (
            f"{self.method:<22}{self.kl:>9.4f}{self.accuracy:>8.1%}{f'{self.edges_kept}/{self.n_edges}':>13}"
            f"{f'{self.heads_kept}/{self.n_heads}':>9}{f'{self.mlps_kept}/{self.n_layers}':>7}{self.seconds:>9.2f}"
            f"{known(self.tpr):>6}{known(self.fpr):>6}{known(self.auc):>6}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class EdgeCircuit:
    """A circuit over the edge graph: the kept edges, their scores, and how it was found."""

    method: str
    graph: EdgeGraph
    kept: torch.Tensor  # (E,) bool
    # (E,) higher means more important; EAP's and EAP-IG's keep their sign (negative: the edge works against the
    # answer). ROC curves rank |scores|; MIB's CPR ranks them as they are.
    scores: torch.Tensor
    seconds: float
    trace: list[dict[str, float]] = field(default_factory=list)
    report: EdgeReport | None = None

    @property
    def edges(self) -> list[tuple[str, str]]:
        """The kept writer→reader pairs, by node name."""
        return [name for name, keep in zip(self.graph.edge_names, self.kept.tolist()) if keep]

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Heads with at least one kept outgoing edge, as ``(layer, head)``."""
        return self.graph.nodes_of(self.kept)[0]

    @property
    def mlps(self) -> list[int]:
        """Layers whose MLP has at least one kept outgoing edge."""
        return self.graph.nodes_of(self.kept)[1]

    @property
    def kl_trace(self) -> list[dict[str, float]]:
        return self.trace


def kept_edges(graph: EdgeGraph, circuit: Any) -> torch.Tensor:
    """``(E,)`` bool of any method's circuit: its kept edges, or for a node-level circuit every edge out of its nodes."""
    kept = getattr(circuit, "kept", None)
    if isinstance(kept, torch.Tensor):
        if kept.shape != (graph.n_edges,):
            raise ArgumentError(f"the circuit has {kept.numel()} edge flags; this model's graph has {graph.n_edges} edges")
        return kept.bool()
    return graph.edges_of_nodes(circuit.heads, circuit.mlps)


def true_edges(graph: EdgeGraph, true_heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``(E,)`` bool: the edges that can matter when only ``true_heads`` write among the heads.

    A writer counts when it is the embeddings, an MLP or a true head; a reader when it
    is an MLP, the logits, a true head's q input or the k/v input of a KV head a true
    head reads. Every other edge carries a zero difference or feeds a head that writes nothing.
    """
    truth = {(int(l), int(h)) for l, h in true_heads}
    group_size = graph.n_heads // graph.n_kv_heads
    writers = torch.ones(graph.n_writers, dtype=torch.bool)
    for layer in range(graph.n_layers):
        for head in range(graph.n_heads):
            writers[graph.head_writer(layer, head)] = (layer, head) in truth
    parts = []
    for g in graph.groups:
        if g.kind == "q":
            readers = torch.tensor([(g.layer, h) in truth for h in range(g.n_readers)])
        elif g.kind in ("k", "v"):
            readers = torch.tensor([any((g.layer, kv * group_size + i) in truth for i in range(group_size))
                                    for kv in range(g.n_readers)])
        else:
            readers = torch.ones(1, dtype=torch.bool)
        parts.append((readers[:, None] & writers[None, : g.n_writers]).flatten())
    return torch.cat(parts)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(a positive outscores a negative), ties counting half."""
    scores, labels = scores.double().cpu(), labels.bool().cpu()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ArgumentError("ROC AUC needs at least one positive and one negative edge")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts
    average_rank = below.double() + (counts.double() + 1) / 2  # 1-based ranks, ties averaged
    rank_sum = float(average_rank[inverse][labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class PreparedTask:
    """One task's clean and corrupted forwards, run once: what every method and the evaluation read.

    ``batches`` are this rank's rows of each batch of ``batch_size`` (the whole batch in
    one process); ``batch_sizes`` are the batches' sizes over every rank, so sums over
    rows divided by them are the one-process means once summed over ranks.
    """

    model: nn.Module
    forward: EdgeForward
    clean: TaskData
    corrupted: TaskData
    batches: list[Prepared]
    batch_sizes: list[int]
    seconds: float  # the wall time of the forwards
    rows: list[range] = field(default_factory=list)  # which examples of clean/corrupted each batch holds

    @property
    def corrupted_labels(self) -> list[torch.Tensor]:
        """Each batch's counterfactual answers (the corrupted examples' own labels), on the batch's device."""
        return [self.corrupted.labels[list(r)].to(b.clean.labels.device) for r, b in zip(self.rows, self.batches)]

    @property
    def graph(self) -> EdgeGraph:
        return self.forward.graph


def prepare_batches(forward: EdgeForward, clean: TaskData, corrupted: TaskData, batch_size: int) -> list[Prepared]:
    """Pair the clean and corrupted data batch by batch and run both once (f's logits, ỹ): this rank's rows."""
    return _prepare_rows(forward, clean, corrupted, batch_size)[0]


def _prepare_rows(forward: EdgeForward, clean: TaskData, corrupted: TaskData,
                  batch_size: int) -> tuple[list[Prepared], list[int], list[range]]:
    """This rank's rows of each batch, prepared, each batch's size over every rank, and the rows themselves."""
    if len(clean) != len(corrupted):
        raise DataError(f"clean ({len(clean)}) and corrupted ({len(corrupted)}) data must pair up one to one")
    rows = distributed.local_rows(len(clean), batch_size, "the edge methods' data")
    prepared = [forward.prepare(clean.subset(r), corrupted.subset(r)) for r, _ in rows]
    return prepared, [n for _, n in rows], [r for r, _ in rows]


def prepare(model: nn.Module, clean: TaskData, corrupted: TaskData, batch_size: int) -> PreparedTask:
    """The masked forward of ``model`` and the batches' clean and corrupted forwards, each run once."""
    start = time.perf_counter()
    forward = EdgeForward(model)
    with eval_mode(model):
        batches, sizes, rows = _prepare_rows(forward, clean, corrupted, batch_size)
    return PreparedTask(model, forward, clean, corrupted, batches, sizes, time.perf_counter() - start, rows)


@torch.no_grad()
def circuit_quality(forward: EdgeForward, batches: Sequence[Prepared], kept: torch.Tensor) -> tuple[float, float, float]:
    """(KL(f‖circuit), the circuit's accuracy, the full model's accuracy) over the batches of every rank."""
    sums = torch.zeros(4, dtype=torch.float64)  # KL, circuit correct, full correct, examples
    for batch in batches:
        logits = forward.logits(batch, kept.float())
        labels = batch.clean.labels
        sums += torch.tensor([
            float(kl_divergence(torch.log_softmax(batch.clean.logits, -1), logits).sum()),
            float((logits.argmax(-1) == labels).sum()),
            float((batch.clean.logits.argmax(-1) == labels).sum()),
            len(labels),
        ], dtype=torch.float64)
    kl, correct, full, n = distributed.summed(sums).tolist()
    return kl / n, correct / n, full / n


def judge(
    task: PreparedTask,
    circuit: Any,
    method: str | None = None,
    seconds: float | None = None,
    true_heads: Sequence[tuple[int, int]] | None = None,
) -> EdgeReport:
    """:func:`evaluate_circuit` on batches already prepared: no clean or corrupted forward runs again."""
    graph = task.graph
    kept = kept_edges(graph, circuit)
    with eval_mode(task.model):
        kl, accuracy, full_accuracy = circuit_quality(task.forward, task.batches, kept)
    heads, mlps = graph.nodes_of(kept)
    tpr = fpr = auc = None
    if true_heads is not None:
        truth = true_edges(graph, true_heads)
        tpr = float((kept & truth).sum()) / max(1, int(truth.sum()))
        fpr = float((kept & ~truth).sum()) / max(1, int((~truth).sum()))
        scores = getattr(circuit, "scores", None)
        auc = roc_auc(scores.abs() if isinstance(scores, torch.Tensor) else kept.double(), truth)
    if seconds is None:
        seconds = float(getattr(circuit, "seconds", float("nan")))
    return EdgeReport(
        method=method or getattr(circuit, "method", type(circuit).__name__),
        kl=kl, accuracy=accuracy, full_accuracy=full_accuracy,
        edges_kept=int(kept.sum()), n_edges=graph.n_edges,
        heads_kept=len(heads), n_heads=graph.n_layers * graph.n_heads,
        mlps_kept=len(mlps), n_layers=graph.n_layers,
        seconds=seconds, n=len(task.clean), tpr=tpr, fpr=fpr, auc=auc,
    )


@renamed_keywords(clean_data="clean", corrupted_data="corrupted")
def evaluate_circuit(
    model: nn.Module,
    circuit: Any,
    clean: "TaskData | dict",
    corrupted: "TaskData | dict",
    method: str | None = None,
    seconds: float | None = None,
    true_heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 32,
) -> EdgeReport:
    """Judge any method's circuit (an :class:`EdgeCircuit`, or Algorithm 1's result with ``.heads``/``.mlps``).

    ``seconds`` defaults to the circuit's own; ``true_heads`` (a known circuit) adds TPR,
    FPR and, when the circuit has edge scores, ROC AUC over the edges. The edge methods
    judge their circuits on the batches they prepared (:func:`judge`); this runs the
    clean and corrupted forwards for a circuit found elsewhere.
    """
    task = prepare(model, model_data(clean, model), model_data(corrupted, model), batch_size)
    return judge(task, circuit, method, seconds, true_heads)
