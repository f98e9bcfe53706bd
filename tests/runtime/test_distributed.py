"""Two gloo processes on the CPU, started from the test, against one process on the whole data.

Scores, Pmax/Pmin-driven choices, frozen sets and circuits must be identical; sums
(means, bias tables, KL values) equal within 1e-6 relative. One spawn runs every
workload (starting processes is the slow part), each rank saves what it found.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import eigenfast
from eigenfast.circuit.discovery import discover
from eigenfast.cli import main
from eigenfast.data.task_data import TaskData
from eigenfast.edges import EdgeOptions, run
from eigenfast.edges.edge_prune import edge_prune
from eigenfast.eigenprune import svd
from eigenfast.eigenprune.scoring import attribute
from eigenfast.eigenprune.svd import thin_svd
from eigenfast.rewrite.position_tables import TokenBiasLinear
from eigenfast.runtime import distributed, figures
from eigenfast.saving.serialization import load_extras

from conftest import make_data, make_model

WORLD = 2
SUMS = {"rtol": 1e-6, "atol": 1e-7}
# Edge pruning's masks follow an Adam trajectory, not a sum: each step's gradient is the one-process
# gradient up to float32 summation order, and a dozen steps carry that to ~1e-5 relative.
LEARNED = {"rtol": 2e-5, "atol": 1e-7}
# ACDC's scores are differences of small KLs, each a float32 difference of log-probabilities from GEMMs of
# other shapes on each rank: they agree to float32's resolution of the logs (1.3e-7 measured), not relative.
KL_DIFFERENCES = {"rtol": 1e-6, "atol": 1e-6}


def workload() -> dict[str, torch.Tensor]:
    """Everything compared, flattened to named tensors (what ``torch.save(weights_only)`` round-trips)."""
    model = make_model("llama")
    data = make_data(13, 7, seed=1, padded=True)  # 13 rows: shards and batches of unequal sizes
    out: dict[str, torch.Tensor] = {}
    for pairs in ("all", "shift"):
        for (layer, c), s in eigenfast.score(model, data, ("k", "v", "o"), pairs, batch_size=3, progress=False).items():
            out[f"score.{pairs}.{layer}.{c}"] = s
    result = eigenfast.prune(model, data, p=0.3, components=("k", "o"), batch_size=3, progress=False)
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
    # EAP and ACDC read the same sharded batches: each rank its rows of every batch, sums reduced.
    for method, options in (("eap", EdgeOptions(batch_size=4, target_sparsity=0.5, progress=False)),
                            ("acdc", EdgeOptions(batch_size=4, threshold=0.002, progress=False))):
        circuit = run(model, clean, corrupted, method, options)
        out[f"{method}.kept"] = circuit.kept
        out[f"{method}.scores"] = circuit.scores
        out[f"{method}.kl"] = torch.tensor(circuit.report.kl, dtype=torch.float64)
    return out


def sharded_workload(folder: Path) -> dict[str, torch.Tensor]:
    """Scoring and pruning (in place) with the model's parameters sharded by FSDP2, then a save."""
    model = distributed.shard_model(make_model("llama"))
    scores = eigenfast.score(model, SHARDED_DATA(), ("k", "v", "o"), "all", batch_size=3, progress=False)
    out = {f"score.all.{layer}.{c}": s for (layer, c), s in scores.items()}
    with pytest.raises(eigenfast.errors.ArgumentError, match="inplace=True"):  # FSDP2 cannot deep-copy
        eigenfast.prune(model, SHARDED_DATA(), p=0.3, progress=False)
    result = eigenfast.prune(
        model, SHARDED_DATA(), p=0.3, components=("k", "o"), batch_size=3, progress=False, inplace=True
    )
    out.update({f"frozen.{layer}.{c}": mask for (layer, c), mask in result.frozen.items()})
    # Folded in place: the projections changed class and kept their sharded (DTensor) Parameters.
    swapped = [m for m in model.modules() if isinstance(m, TokenBiasLinear)]
    assert swapped and all(isinstance(m.weight, DTensor) for m in swapped)
    out["swapped"] = torch.tensor(len(swapped))
    out["logits"] = _logits(model, SHARDED_DATA())
    result.save(folder / "sharded_save")
    biased = distributed.shard_model(make_model("qwen2"))  # q/k/v have biases: refused before any work
    with pytest.raises(eigenfast.errors.ArgumentError, match="nn.Linear without bias"):
        eigenfast.prune(biased, SHARDED_DATA(), p=0.3, components=("k",), progress=False, inplace=True)
    return out


def _logits(model: torch.nn.Module, data: TaskData) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return model(input_ids=data.input_ids.to(device), attention_mask=data.attention_mask.to(device)).logits


def svd_share() -> torch.Tensor:
    """``thin_svd`` calls of this rank over two scorings of a fresh model (6 sites; the second hits the cache)."""
    calls = []

    def counting(A: torch.Tensor):
        calls.append(A.shape)
        return thin_svd(A)

    model = make_model("llama", seed=4)
    with mock.patch.object(svd, "thin_svd", counting):
        for pairs in ("all", "shift"):
            eigenfast.score(model, make_data(8, 5), ("k", "v", "o"), pairs, batch_size=4, progress=False)
    return torch.tensor(len(calls))


def SHARDED_DATA() -> TaskData:  # noqa: N802 - a constant, built fresh in each process
    return make_data(13, 7, seed=1, padded=True).subset(range(12))  # 4 batches: 2 forwards on each rank


def _rank_main(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.save({"calls": svd_share()}, Path(folder) / f"svd.{rank}.pt")
        torch.save(workload(), Path(folder) / f"plain.{rank}.pt")
        torch.save(sharded_workload(Path(folder)), Path(folder) / f"sharded.{rank}.pt")
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
        if name.startswith(("score.", "frozen.", "circuit.pruned", "edges.kept", "eap.kept", "acdc.kept")):
            assert torch.equal(got[name], value), name
        elif name.startswith("edges."):
            torch.testing.assert_close(got[name], value, **LEARNED, msg=name)
        elif name.startswith("acdc."):
            torch.testing.assert_close(got[name], value, **KL_DIFFERENCES, msg=name)
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
    for method in ("eap", "acdc"):
        assert 0 < int(alone[f"{method}.kept"].sum()) < len(alone[f"{method}.kept"]), method


def test_model_sharded_with_fsdp2_equals_one_process(ranks):
    model = make_model("llama")
    with _one_thread():
        scores = eigenfast.score(model, SHARDED_DATA(), ("k", "v", "o"), "all", batch_size=3, progress=False)
        pruned = eigenfast.prune(model, SHARDED_DATA(), p=0.3, components=("k", "o"), batch_size=3, progress=False)
        want = {f"score.all.{layer}.{c}": s for (layer, c), s in scores.items()}
        want.update({f"frozen.{layer}.{c}": mask for (layer, c), mask in pruned.frozen.items()})
        want["swapped"] = torch.tensor(sum(isinstance(m, TokenBiasLinear) for m in pruned.model.modules()))
        want["logits"] = _logits(pruned.model, SHARDED_DATA())
        # A test that can fail: pruning changed what the model computes.
        assert not torch.allclose(want["logits"], _logits(model, SHARDED_DATA()), **SUMS)
    for got in _load(ranks, "sharded"):
        _assert_equal_runs(got, want)
    # Rank 0 saved the sharded pruned model whole: it loads unsharded and equals the one-process prune.
    saved = eigenfast.load(ranks / "sharded_save")
    assert saved.state_dict().keys() == pruned.model.state_dict().keys()
    for name, value in pruned.model.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], value, **SUMS, msg=name)
    assert any(isinstance(m, TokenBiasLinear) for m in saved.modules())


def test_svds_are_split_over_ranks(ranks):
    """6 sites over 2 ranks: 3 decompositions each, none on the second scoring (the broadcast factors are cached).
    That the factors are the one-process ones, bitwise, is in the scores of test_two_processes_equal_one."""
    assert [int(torch.load(ranks / f"svd.{r}.pt", weights_only=True)["calls"]) for r in range(WORLD)] == [3, 3]


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
    command = ["prune", "--model", "int_sum_gpt2", "--task", "int_mult", "--fraction", "0.1", "--batch-size", "64",
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


def _cli_rank(rank: int, port: int, argv: list[str], folder: str) -> None:
    """One rank of ``torchrun -m eigenfast.cli ARGV``: the environment torchrun sets, every file write recorded."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    written: list[str] = []
    write_text, save_figure = Path.write_text, figures.save

    def recording_write_text(path: Path, *args, **kwargs):
        written.append(path.name)
        return write_text(path, *args, **kwargs)

    def recording_save(fig, path, *args, **kwargs):
        written.append(Path(path).name)
        return save_figure(fig, path, *args, **kwargs)

    with mock.patch.object(Path, "write_text", recording_write_text), mock.patch.object(figures, "save", recording_save):
        status = main(argv)
    with open(Path(folder) / f"writes.{rank}.json", "w") as record:
        json.dump({"status": status, "written": written}, record)


def test_torchrun_extract_sweep_writes_once_and_equals_one_process(tmp_path):
    command = ["extract", "--model", "int_sum_gpt2", "--task", "int_sum", "--n-patch", "8", "--n-val", "8",
               "--sweep", "1e-4,1", "--mlps", "--out"]
    mp.spawn(_cli_rank, args=(_free_port(), [*command, str(tmp_path / "two")], str(tmp_path)), nprocs=WORLD, join=True)
    records = [json.loads((tmp_path / f"writes.{r}.json").read_text()) for r in range(WORLD)]
    assert [r["status"] for r in records] == [0, 0]
    assert records[0]["written"] == ["sweep.json", "sweep.png"] and records[1]["written"] == []
    with _one_thread():
        assert main([*command, str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / run / "sweep.json").read_text()) for run in ("one", "two"))
    kl = [point.pop("kl") for point in two["points"]]
    torch.testing.assert_close(kl, [point.pop("kl") for point in one["points"]], **SUMS)
    assert two == one
    assert (tmp_path / "two" / "sweep.png").stat().st_size > 0


# --------------------------------------------------------------------------- layers on several devices


def _assert_statistics_beside_their_weights(model: torch.nn.Module, attribution) -> None:
    for st in attribution.stats.values():
        device = model.get_submodule(st.site.path).weight.device
        tensors = [st.factors.U, st.work.U, st.work.s, st.work.V, st.scores, st.pmax, st.pmin,
                   st.heads.out_index, st.heads.in_index, attribution.input_sums[st.site.path]]
        assert {t.device for t in tensors if t is not None} == {device}, st.site.key


def _place_layers(model: torch.nn.Module, devices: list[torch.device]) -> None:
    """Layer i on ``devices[i % len]`` (embeddings on the first, the final norm and head on the last layer's),
    each layer moving its inputs to its device, as ``device_map`` dispatch does."""

    def to(value, device):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return type(value)(to(v, device) for v in value) if isinstance(value, tuple) else value

    layers = model.model.layers
    model.model.embed_tokens.to(devices[0])
    model.model.rotary_emb.to(devices[0])
    for i, layer in enumerate(layers):
        device = devices[i % len(devices)]
        layer.to(device)
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, d=device: (to(args, d), {k: to(v, d) for k, v in kwargs.items()}), with_kwargs=True
        )
    last = devices[(len(layers) - 1) % len(devices)]
    model.model.norm.to(last)
    model.lm_head.to(last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (with the CPU) or two")
def test_layers_on_two_devices_score_and_prune_like_one():
    devices = [torch.device("cuda", i) for i in range(2)] if torch.cuda.device_count() > 1 else [
        torch.device("cpu"), torch.device("cuda", 0)]
    data = make_data(9, 6, seed=1, padded=True)
    one = make_model("llama").to(devices[-1])
    split = make_model("llama")
    _place_layers(split, devices)
    attribution = attribute(split, data, ("k", "o"), batch_size=3, progress=False)
    _assert_statistics_beside_their_weights(split, attribution)
    assert len({st.scores.device for st in attribution.stats.values()}) == 2
    want = eigenfast.score(one, data, ("k", "o"), batch_size=3, progress=False)
    for key, value in attribution.scores.items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=str(key))
    pruned = eigenfast.prune(split, data, p=0.3, components=("k", "o"), batch_size=3, progress=False, inplace=True)
    reference = eigenfast.prune(one, data, p=0.3, components=("k", "o"), batch_size=3, progress=False)
    torch.testing.assert_close(_logits(pruned.model, data).cpu(), _logits(reference.model, data).cpu(), rtol=1e-4, atol=1e-4)
