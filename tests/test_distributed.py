"""Two gloo processes on the CPU, started from the test, against one process on the whole data.

Scores, Pmax/Pmin-driven choices, frozen sets and circuits must be identical; sums
(means, bias tables, KL values) equal within 1e-6 relative. One spawn runs every
workload (starting processes is the slow part), each rank saves what it found.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_data, make_model

import eigenfast
from eigenfast import distributed
from eigenfast.circuit.discovery import discover
from eigenfast.cli import main
from eigenfast.data import TaskData
from eigenfast.edges.edge_prune import edge_prune
from eigenfast.freezing import freeze, select_frozen
from eigenfast.scoring import attribute
from eigenfast.serialization import load_extras

WORLD = 2
SUMS = {"rtol": 1e-6, "atol": 1e-7}
# Edge pruning's masks follow an Adam trajectory, not a sum: each step's gradient is the one-process
# gradient up to float32 summation order, and a dozen steps carry that to ~1e-5 relative.
LEARNED = {"rtol": 2e-5, "atol": 1e-7}


def workload() -> dict[str, torch.Tensor]:
    """Everything compared, flattened to named tensors (what ``torch.save(weights_only)`` round-trips)."""
    model = make_model("llama")
    data = make_data(13, 7, seed=1, padded=True)  # 13 rows: shards and batches of unequal sizes
    out: dict[str, torch.Tensor] = {}
    for pairs in ("all", "shift"):
        for (layer, c), s in eigenfast.score(model, data, ("k", "v", "o"), pairs, batch_size=3, progress_bar=False).items():
            out[f"score.{pairs}.{layer}.{c}"] = s
    result = eigenfast.prune(model, data, p=0.3, components=("k", "o"), batch_size=3, progress_bar=False)
    for (layer, c), mask in result.frozen.items():
        out[f"frozen.{layer}.{c}"] = mask
    for name, value in result.model.state_dict().items():
        out[f"pruned.{name}"] = value
    patch, val = make_data(11, 6, seed=2, padded=True), make_data(9, 6, seed=3, padded=True)
    found = discover(model, patch, val, 0.005, ablation="mean", include_mlps=True, batch_size=8, progress=False)
    out["circuit.pruned"] = torch.tensor([s.pruned for s in found.kl_trace])
    out["circuit.kl"] = torch.tensor([s.kl_after for s in found.kl_trace], dtype=torch.float64)
    clean, corrupted = make_data(10, 5, seed=4), make_data(10, 5, seed=5)
    edges = edge_prune(model, clean, corrupted, 0.5, steps=12, batch_size=4, lr=0.5, progress=False, evaluate=False)
    out["edges.kept"] = edges.kept
    out["edges.scores"] = edges.scores
    out["edges.kl"] = torch.tensor([t["kl"] for t in edges.trace], dtype=torch.float64)
    return out


def sharded_workload() -> dict[str, torch.Tensor]:
    """Scoring, and pruning by the documented recipe, with the model's parameters sharded by FSDP2."""
    model = distributed.shard_model(make_model("llama"))
    scores = eigenfast.score(model, SHARDED_DATA(), ("k", "v", "o"), "all", batch_size=3, progress_bar=False)
    out = {f"score.all.{layer}.{c}": s for (layer, c), s in scores.items()}
    # prune() refuses a sharded model with a clear error; score it sharded, freeze an unsharded copy.
    with pytest.raises(eigenfast.errors.ArgumentError, match="FSDP2-sharded"):
        eigenfast.prune(model, SHARDED_DATA(), p=0.3, progress_bar=False)
    attribution = attribute(model, SHARDED_DATA(), ("k", "o"), batch_size=3, progress_bar=False)
    copy = make_model("llama")
    freeze(copy, attribution, select_frozen(attribution.scores, 0.3))
    out.update({f"pruned.{name}": value for name, value in copy.state_dict().items()})
    return out


def SHARDED_DATA() -> TaskData:  # noqa: N802 - a constant, built fresh in each process
    return make_data(13, 7, seed=1, padded=True).subset(range(12))  # 4 batches: 2 forwards on each rank


def _rank_main(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.save(workload(), Path(folder) / f"plain.{rank}.pt")
        torch.save(sharded_workload(), Path(folder) / f"sharded.{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    return folder


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """As in the ranks: the same GEMM blocking, so equal batches give bitwise-equal results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def alone() -> dict[str, torch.Tensor]:
    with _one_thread():
        return workload()


def _load(folder: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(folder / f"{name}.{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_equal_runs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.startswith(("score.", "frozen.", "circuit.pruned", "edges.kept")):
            assert torch.equal(got[name], value), name
        elif name.startswith("edges."):
            torch.testing.assert_close(got[name], value, **LEARNED, msg=name)
        else:
            torch.testing.assert_close(got[name], value, **SUMS, msg=name)
    if "edges.kl" not in want:
        return
    # The first step's KL is a plain sum over the batch (same masks on every rank): within 1e-6.
    torch.testing.assert_close(got["edges.kl"][0], want["edges.kl"][0], **SUMS)


def test_two_processes_equal_one(ranks, alone):
    for got in _load(ranks, "plain"):
        _assert_equal_runs(got, alone)
    # A test that can fail: the workload really pruned and found a non-trivial circuit.
    assert any(bool(v.any()) for k, v in alone.items() if k.startswith("frozen."))
    assert 0 < int(alone["circuit.pruned"].sum()) < len(alone["circuit.pruned"])


def test_model_sharded_with_fsdp2_equals_one_process(ranks):
    model = make_model("llama")
    with _one_thread():
        scores = eigenfast.score(model, SHARDED_DATA(), ("k", "v", "o"), "all", batch_size=3, progress_bar=False)
        pruned = eigenfast.prune(model, SHARDED_DATA(), p=0.3, components=("k", "o"), batch_size=3, progress_bar=False)
    want = {f"score.all.{layer}.{c}": s for (layer, c), s in scores.items()}
    want.update({f"pruned.{name}": value for name, value in pruned.model.state_dict().items()})
    for got in _load(ranks, "sharded"):
        _assert_equal_runs(got, want)


def test_sharding_is_contiguous_and_covers_everything():
    for n, parts in [(13, 2), (4, 3), (2, 5)]:
        blocks = [distributed.block(n, r, parts) for r in range(parts)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_one_process_needs_no_group():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main_process()
    data = make_data(7, 4, padded=True)
    assert [b.input_ids.tolist() for b in distributed.local_batches(data, 3)] == [
        b.input_ids.tolist() for b in data.batches(3)
    ]
    assert distributed.local_examples(data) is data
    x = torch.arange(3.0)
    distributed.all_max_(x)
    assert x.tolist() == [0.0, 1.0, 2.0]


def test_torchrun_cli_prune_writes_once_and_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m eigenfast.cli prune`` prints and saves on rank 0 only, the one-process save."""
    command = ["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--p", "0.1", "--batch-size", "64",
               "--components", "k", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(eigenfast.__file__).parents[1])}
    ran = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "eigenfast.cli", *command, str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("saved the pruned model") == 1
    with _one_thread():
        assert main([*command, str(tmp_path / "one")]) == 0
    one, two = load_extras(tmp_path / "one"), load_extras(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
