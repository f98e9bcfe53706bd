"""Data parallelism over ``torch.distributed``: which rows a rank reads, and exact reductions of what it learned.

Every data pass of eigenfast (scoring's two passes, the means and KL sums of circuit
discovery, the steps of edge pruning) reduces per-example contributions with MAX, MIN
or SUM into statistics that do not depend on how the examples were grouped. So when a
process group is initialised each rank reads its own shard and the statistics are
all-reduced once after the pass: MAX for scores and Pmax, MIN for Pmin, SUM for input
sums, counts and KL sums. Every rank then holds the one-process result.

Sharding is **contiguous**: rank ``r`` of ``W`` reads the ``r``-th of ``W`` consecutive
blocks (the first ``n mod W`` blocks one item longer). Scoring shards whole batches
(:func:`local_batches`), so each batch a rank sees is bit for bit a batch of the
one-process run: MAX/MIN statistics come out identical, and ``pairs="shift"``, whose
partner is the previous example *in the batch*, keeps its partners. Discovery and edge
pruning shard examples (:func:`local_examples`, :func:`local_rows`). SUMs differ from
a one-process run only by float summation order.

With no process group (or a group of one) the sharding and reduction functions are
the identity and need nothing: a single process behaves exactly as without this
module. :func:`shard_model` (FSDP2) is for a group of two or more ranks.
"""
from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta
from typing import Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..data.task_data import TaskData, check_batch_size
from ..errors import ArgumentError, DataError, StateError, UnsupportedModelError

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes saves and shows progress."""
    return rank() == 0


def block(n: int, index: int | None = None, parts: int | None = None) -> range:
    """The ``index``-th of ``parts`` contiguous blocks of ``range(n)`` (default: this rank's of the world's)."""
    index = rank() if index is None else index
    parts = world_size() if parts is None else parts
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


class LocalBatches:
    """This rank's contiguous run of ``data.batches(batch_size)``: the same batches, a subset of them."""

    def __init__(self, data: TaskData, batch_size: int) -> None:
        if batch_size < 1:
            check_batch_size(batch_size)
        self.data, self.batch_size = data, batch_size
        self.indices = block(-(-len(data) // batch_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[TaskData]:
        n, size = len(self.data), self.batch_size
        for b in self.indices:
            yield self.data.subset(range(b * size, min((b + 1) * size, n)))


def local_batches(data: TaskData, batch_size: int, model: nn.Module | None = None) -> LocalBatches:
    """The batches of ``data`` this rank reads (all of them in a single process); may be none.

    A model sharded by FSDP2 all-gathers its parameters inside every forward, so then
    every rank must run as many batches as the others: that is checked here.
    """
    batches = LocalBatches(data, batch_size)
    n_batches = -(-len(data) // batch_size)
    if model is not None and is_sharded(model) and n_batches % world_size():
        raise DataError(
            f"the model is sharded over {world_size()} processes (FSDP2), so each must run the same number of "
            f"forwards, but {len(data)} examples make {n_batches} batches of {batch_size}: choose a batch_size or "
            f"a number of examples that gives a multiple of {world_size()} batches"
        )
    return batches


def is_sharded(model: nn.Module) -> bool:
    """True when some module of ``model`` is sharded by FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (parameters are DTensors again).

    A unit that is its own root keeps its parameters whole after a forward (FSDP2
    expects the backward to need them), so code that edits or gathers the sharded
    parameters calls this first.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_examples(data: TaskData, what: str = "the data") -> TaskData:
    """This rank's contiguous block of examples (``data`` itself in a single process)."""
    if not is_distributed():
        return data
    if len(data) < world_size():
        raise DataError(
            f"{what} has {len(data)} example(s) but {world_size()} processes share it; "
            "give at least one example per process or start fewer processes"
        )
    return data.subset(block(len(data)))


def local_rows(n: int, batch_size: int, what: str = "the data") -> list[tuple[range, int]]:
    """For each batch of ``batch_size`` of ``n`` rows: the rows this rank reads, and the batch's size.

    Used where one batch is one optimisation step (edge pruning): every rank takes
    part in every step with its slice of that step's batch (the whole batch in one process).
    """
    check_batch_size(batch_size)
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    smallest = min(len(b) for b in batches)
    if smallest < world_size():
        raise DataError(
            f"{what}: a batch of {smallest} example(s) cannot be shared by {world_size()} processes; make every "
            f"batch (batch_size={batch_size}; the last holds the rest of the {n}) at least {world_size()} "
            "examples, or start fewer processes"
        )
    return [(b[block(len(b)).start:block(len(b)).stop], len(b)) for b in batches]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter whole on every rank: FSDP2 (``fully_shard``) keeps only a shard of it outside forward.

    A collective for a sharded (DTensor) parameter, so every rank must ask for the same
    ones in the same order; any other tensor is returned as is.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model``'s parameters over the process group with FSDP2 (``fully_shard``), in place.

    eigenfast calls the backbone's layers, its other children (embeddings, final
    norm) and the LM head one by one, so each becomes its own FSDP unit: whichever
    is called all-gathers its parameters just for its own forward and backward, and
    frees them after. Statistics are kept beside the layer that produced them, on
    each rank's device, and reduced as in a plain data-parallel run.
    """
    from torch.distributed.fsdp import fully_shard  # only a sharded run needs it

    from ..adapters import get_adapter

    if not is_distributed():
        raise StateError("shard_model needs an initialised process group of 2+ ranks (start with torchrun)")
    adapter = get_adapter(model)
    head = adapter.lm_head()
    embeddings = model.get_input_embeddings()
    if embeddings is not None and head.weight is embeddings.weight:
        raise UnsupportedModelError(
            "the LM head shares its weight with the input embeddings (tied); FSDP2 cannot put one parameter "
            "in two units: untie them first (model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone()))"
        )
    layers = adapter.layers()
    units = [*layers, *(c for c in adapter.backbone().children() if c is not layers), head]
    for unit in units:
        if any(True for _ in unit.parameters()):
            fully_shard(unit)
    return model


def _all_reduce(op: "dist.ReduceOp", tensors: "torch.Tensor | Iterable[torch.Tensor | None]") -> None:
    if not is_distributed():
        return
    for tensor in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
        if tensor is not None:
            dist.all_reduce(tensor, op=op)


def all_max_(tensors: "torch.Tensor | Iterable[torch.Tensor | None]") -> None:
    """In place, elementwise max over ranks (``None`` entries are skipped)."""
    _all_reduce(dist.ReduceOp.MAX, tensors)


def all_min_(tensors: "torch.Tensor | Iterable[torch.Tensor | None]") -> None:
    """In place, elementwise min over ranks (``None`` entries are skipped)."""
    _all_reduce(dist.ReduceOp.MIN, tensors)


def all_sum_(tensors: "torch.Tensor | Iterable[torch.Tensor | None]") -> None:
    """In place, elementwise sum over ranks (``None`` entries are skipped)."""
    _all_reduce(dist.ReduceOp.SUM, tensors)


def broadcast_(tensors: Iterable[torch.Tensor], src: int) -> None:
    """In place, rank ``src``'s values everywhere (bitwise: the bytes are copied)."""
    if not is_distributed():
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=src)


def all_true(flags: list[bool]) -> list[bool]:
    """Elementwise: true where the flag is true on every rank (for choices that start collectives)."""
    if not is_distributed() or not flags:
        return flags
    agreed = torch.tensor(flags, dtype=torch.int32, device=_collective_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return [bool(v) for v in agreed.tolist()]


def sum_number(value: float) -> float:
    """A Python number summed over ranks (float64 on the CPU)."""
    if not is_distributed():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item())


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over ranks, where it was (it travels by the collectives' device)."""
    if not is_distributed():
        return tensor
    total = tensor.to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def max_number(value: float) -> float:
    """A Python number maxed over ranks: for choices every rank must make alike."""
    if not is_distributed():
        return value
    top = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return float(top.item())


def _collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_writing = False  # inside on_main's write: a nested on_main just writes (one barrier per outer call)


def on_main(write: Callable[[], T]) -> T | None:
    """Run ``write`` on rank 0 only; every rank waits until it is done (so all see the files it wrote).

    Every rank must call it (it ends in a barrier), except from inside another
    ``on_main``'s ``write``, where it simply runs ``write``.
    """
    global _writing
    if not is_distributed() or _writing:
        return write()
    try:
        if not is_main_process():
            return None
        _writing = True
        try:
            return write()
        finally:
            _writing = False
    finally:
        dist.barrier()


TIMEOUT_VARIABLE = "EIGENFAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds: far longer than any one collective of eigenfast's, short enough to notice


def timeout() -> float:
    """How long, in seconds, a rank waits for the others (to join, or in one collective): $EIGENFAST_DIST_TIMEOUT."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"{TIMEOUT_VARIABLE}={text!r}: give the seconds a rank waits for the others, e.g. 300")
    return value


@contextlib.contextmanager
def launched_by_torchrun() -> Iterator[None]:
    """Inside, a ``torchrun`` launch (``WORLD_SIZE`` > 1 in the environment) has its process group.

    gloo on the CPU, NCCL with one GPU per local rank. Ranks other than 0 print
    nothing to stdout. Without ``torchrun`` (or with one process) nothing happens.
    A rank that does not join, or stops answering in a collective, makes the others
    stop after :func:`timeout` seconds with a :class:`~eigenfast.errors.StateError`
    naming their rank and the timeout, instead of waiting for ever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    seconds, me = timeout(), os.environ.get("RANK", "?")
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl", timeout=timedelta(seconds=seconds))
        else:
            dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
    except (dist.DistError, RuntimeError, TimeoutError) as err:
        raise StateError(
            f"rank {me} of {world}: not all {world} processes joined within {seconds:g} s ({str(err)[:200]}); "
            f"start every rank (torchrun does), check MASTER_ADDR/MASTER_PORT, or wait longer with {TIMEOUT_VARIABLE}"
        ) from None
    try:
        with _quiet_unless_main():
            yield
    except dist.DistError as err:
        raise StateError(
            f"rank {me} of {world}: a collective got no answer from another rank within {seconds:g} s "
            f"({str(err)[:200]}); a rank was lost: see its own error, or wait longer with {TIMEOUT_VARIABLE}"
        ) from None
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _quiet_unless_main() -> Iterator[None]:
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield

