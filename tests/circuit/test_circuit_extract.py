"""eigenfast.extract_circuit end to end: discovery + removal, the report, save/load, the sweep and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter
from eigenfast.circuit import ablated, extract_circuit, sweep
from eigenfast.circuit.report import Latency, timed_runs
from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.commands.extract import draw
from eigenfast.data.task_data import TaskData
from eigenfast.runtime.forward import evaluate, last_logits
from eigenfast.runtime.metrics import kl_divergence
from eigenfast.saving.serialization import load_extras

from conftest import make_data, make_model


def logits(model, data: TaskData) -> torch.Tensor:
    with torch.no_grad():
        return model(**data.model_inputs()).logits


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def removed_heads(result, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    return [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in result.heads]


def test_extraction_finds_the_known_circuit_and_matches_hook_ablation():
    task = synthetic_task("gpt2")
    model, before = task.model, logits(task.model, task.val_data)
    result = extract_circuit(model, task.patch_data, task.val_data, threshold=1e-4, ground_truth=task.true_heads,
                             progress=False, latency_repeats=1)
    assert sorted(result.heads) == task.true_heads
    assert result.mlps == [0, 1, 2]
    assert torch.equal(logits(model, task.val_data), before), "inplace=False must leave the input model alone"
    assert type(result.model) is type(model) and n_params(result.model) < n_params(model)

    means = eigenfast.circuit.component_means(model, task.patch_data)
    with ablated(model, removed_heads(result, 3, 4), (), means):
        reference = logits(model, task.val_data)
    torch.testing.assert_close(logits(result.model, task.val_data), reference, rtol=0, atol=1e-4)

    report = result.report
    assert (report.ground_truth.tpr, report.ground_truth.fpr) == (1.0, 0.0)
    assert report.params_after.parameters == n_params(result.model) and report.params_before.parameters == n_params(model)
    tables = sum(b.numel() for b in result.model.buffers())  # position tables the forward reads count too
    assert report.params_after.total == n_params(result.model) + tables > n_params(result.model)
    assert report.params_after.non_embedding < report.params_before.non_embedding
    assert report.after.accuracy == evaluate(result.model, task.val_data).accuracy
    assert report.before.accuracy == 1.0  # synthetic labels are the full model's own predictions
    with torch.no_grad():
        logp_f = torch.log_softmax(last_logits(get_adapter(model), task.val_data), dim=-1)
        kl = kl_divergence(logp_f, last_logits(get_adapter(result.model), task.val_data)).mean()
    assert report.kl == pytest.approx(float(kl), abs=1e-5)
    assert [lat.batch for lat in report.latency] == [1, 32]
    assert all(lat.before > 0 and lat.after > 0 for lat in report.latency)
    table = report.table()
    for text in ("heads kept   3/12", "TPR 1.00, FPR 0.00", "latency b=32", "non-embedding removed"):
        assert text in table
    assert json.loads(json.dumps(report.as_dict()))["heads"] == [list(h) for h in result.heads]


def test_zero_ablation_with_mlps_in_place(config_name):
    model = make_model(config_name)
    val = make_data(n=8, seed=2, padded=True)  # zero ablation needs no patching data
    reference_model = make_model(config_name)
    result = extract_circuit(model, None, val, threshold=5e-3, ablation="zero", include_mlps=True, inplace=True,
                             progress=False, latency_repeats=0)
    assert result.model is model and result.report.latency == []
    assert len(result.heads) < 8, "this threshold should remove some heads"
    pruned_mlps = [l for l in range(2) if l not in result.mlps]
    with ablated(reference_model, removed_heads(result, 2, 4), pruned_mlps, None, "zero"):
        reference = logits(reference_model, val)
    torch.testing.assert_close(logits(model, val), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "phi"])
def test_result_saves_and_loads(tmp_path, model_type):
    task = synthetic_task(model_type)
    result = extract_circuit(task.model, task.patch_data, task.val_data, threshold=1e-4, include_mlps=True,
                             progress=False, latency_repeats=0)
    assert sorted(result.heads) == task.true_heads, "every layer keeps one head: shrunk attentions get saved"
    target = result.save(tmp_path / "circuit")
    loaded = eigenfast.load(target)
    assert type(loaded) is type(task.model) and n_params(loaded) == n_params(result.model)
    assert torch.equal(logits(loaded, task.val_data), logits(result.model, task.val_data))
    masks = load_extras(target)
    assert sorted(map(tuple, masks["circuit.heads"].nonzero().tolist())) == sorted(result.heads)
    assert masks["circuit.mlps"].nonzero().flatten().tolist() == result.mlps
    assert json.loads((target / "eigenfast.json").read_text())["kind"] == "circuit"


def test_sweep_reports_size_and_accuracy_and_plots(tmp_path):
    task = synthetic_task("gpt2")
    result = sweep(task.model, task.patch_data, task.val_data, [100.0, 1e-4, 0.0], include_mlps=True, progress=False)
    assert [p.threshold for p in result.points] == [0.0, 1e-4, 100.0]
    sizes = [p.size for p in result.points]
    # What is left at the top threshold is the position-indexed means that replace the removed components.
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 1.0 and sizes[-1] < 0.05
    assert result.points[0].accuracy == 1.0 and result.points[1].heads == 3
    table, plot = result.save(tmp_path / "sweep")
    assert json.loads(table.read_text())["points"][1]["heads"] == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alpha" in result.table()


def test_patch_and_validation_draws_are_disjoint_and_seeded():
    data = make_data(n=20)
    patch, val = draw(data, 8, 5, seed=3)
    assert (len(patch), len(val)) == (8, 5)
    rows = lambda d: {tuple(r) for r in d.input_ids.tolist()}  # noqa: E731
    assert not rows(patch) & rows(val)
    assert torch.equal(draw(data, 8, 5, seed=3)[1].input_ids, val.input_ids)
    with pytest.raises(eigenfast.DataError, match="exceed the 20 examples available"):
        draw(data, 15, 6, seed=0)


def test_command_line_extracts_and_sweeps(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from eigenfast.builtin.tokenizer import build_tokenizer
    from eigenfast.cli import main

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=2)
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--task", "int_mult", "--n-patch", "16", "--n-val", "16"]
    assert main(["extract", *common, "--threshold", "1e-4", "--mlps", "--out", str(tmp_path / "circuit")]) == 0
    loaded = eigenfast.load(tmp_path / "circuit")
    assert n_params(loaded) < n_params(model)
    assert main(["extract", *common, "--sweep", "1e-4,1", "--out", str(tmp_path / "sweep")]) == 0
    assert (tmp_path / "sweep" / "sweep.png").is_file()


def test_a_latency_is_reported_only_when_its_runs_agree():
    steady = Latency.of(32, [0.0100, 0.0101, 0.0099, 0.0100, 0.0102], [0.0050, 0.0051, 0.0049, 0.0050, 0.0050])
    assert steady.reliable and steady.reduction == pytest.approx(0.5)
    assert "10.00 ms -> 5.00 ms (-50.0%, median of 5 runs taken in turns" in steady.describe()
    busy = Latency.of(32, [0.010, 0.030, 0.011, 0.050, 0.012], [0.005] * 5)  # another job took the core twice
    assert not busy.reliable and "not reported: the timed runs varied by" in busy.describe()
    assert " ms" not in busy.describe()
    once = Latency.of(1, [0.01], [0.005])
    assert not once.reliable and "at least 3 are needed" in once.describe()
    assert json.loads(json.dumps(once.as_dict(), allow_nan=False))["spread"] is None


def test_the_model_and_its_circuit_are_timed_in_turns(monkeypatch):
    order = []
    monkeypatch.setattr("eigenfast.circuit.report.time_forward", lambda model, batch: order.append(model) or 1.0)
    assert timed_runs(["model", "circuit"], None, repeats=3, warmup=1) == [[1.0] * 3, [1.0] * 3]
    assert order == ["model", "circuit"] * 4


def test_extraction_times_the_model_and_its_circuit_in_turns(monkeypatch):
    calls = []
    real = eigenfast.circuit.extract.timed_runs

    def recorded(models, batch, repeats):
        calls.append(list(models))
        return real(models, batch, repeats)

    monkeypatch.setattr("eigenfast.circuit.extract.timed_runs", recorded)
    task = synthetic_task("gpt2")
    result = extract_circuit(task.model, task.patch_data, task.val_data, threshold=1e-4, progress=False, latency_repeats=3)
    assert calls == [[task.model, result.model]] * 2 and [lat.runs for lat in result.report.latency] == [3, 3]
