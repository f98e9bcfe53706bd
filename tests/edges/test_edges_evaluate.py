"""The shared evaluation (ROC AUC, the known circuit's edges, Algorithm 1's result) and feeding extraction."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

import eigenfast
from eigenfast.adapters import get_adapter
from eigenfast.circuit import ablated, component_means
from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.edges import EdgeGraph, evaluate_circuit, extract_nodes, roc_auc, true_edges
from eigenfast.runtime.forward import last_logits
from eigenfast.runtime.sizes import count_parameters
from eigenfast.saving.results import ModelResult
from eigenfast.saving.serialization import load_extras

from conftest import make_data, make_model


def test_roc_auc_equals_counting_pairs():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    labels = torch.rand(40, generator=g) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(scores[labels].tolist(), scores[~labels].tolist())]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(scores, torch.ones(40, dtype=torch.bool))


def test_true_edges_by_hand():
    graph = EdgeGraph(n_layers=2, n_heads=2, n_kv_heads=1, parallel=False)
    truth = dict(zip(graph.edge_names, true_edges(graph, [(1, 0)]).tolist()))
    assert truth[("emb", "L1.H0.q")] and truth[("L0.MLP", "L1.H0.k")]  # KV head 0 serves the true head
    assert not truth[("emb", "L1.H1.q")]  # a head that writes nothing
    assert not truth[("L0.H0", "L1.MLP")] and truth[("L1.H0", "logits")] and not truth[("L1.H1", "logits")]


@pytest.fixture(scope="module")
def task():
    task = synthetic_task()
    return task, task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))


def test_full_and_algorithm_1_circuits_through_the_one_evaluation(task):
    task, corrupted = task
    graph = EdgeGraph.of(get_adapter(task.model))

    class Everything:
        kept = torch.ones(graph.n_edges, dtype=torch.bool)

    full = evaluate_circuit(task.model, Everything(), task.val_data, corrupted, method="full", seconds=0.0)
    assert full.kl == pytest.approx(0.0, abs=1e-6) and full.accuracy == full.full_accuracy == 1.0
    circuit = eigenfast.extract_circuit(task.model, task.patch_data, task.val_data, threshold=1e-4,
                                        progress=False, latency_repeats=0)
    report = evaluate_circuit(task.model, circuit, task.val_data, corrupted, method="algorithm 1",
                              seconds=1.0, true_heads=task.true_heads)
    assert report.heads_kept == len(circuit.heads) and report.mlps_kept == len(circuit.mlps)
    assert set(circuit.heads) == set(task.true_heads) and report.tpr == 1.0
    assert "algorithm 1" in report.row()


def test_an_edge_circuit_becomes_a_smaller_model(task):
    task, corrupted = task
    circuit = eigenfast.eap(task.model, task.val_data, corrupted, target_sparsity=0.8, progress=False, evaluate=False)
    smaller = extract_nodes(task.model, circuit, corrupted).model
    assert count_parameters(smaller).non_embedding < count_parameters(task.model).non_embedding
    adapter = get_adapter(task.model)
    removed = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in circuit.heads]
    means = component_means(task.model, corrupted)
    with torch.no_grad(), ablated(task.model, removed, [l for l in range(adapter.n_layers) if l not in circuit.mlps],
                                  means):
        expected = last_logits(adapter, task.val_data)
        got = last_logits(get_adapter(smaller), task.val_data)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_refused_before_any_work():
    model = make_model("gpt2")
    clean = make_data(4, 5)
    with pytest.raises(ValueError, match="pair up"):
        eigenfast.eap(model, clean, make_data(3, 5), progress=False)
    with pytest.raises(ValueError, match="target_sparsity"):
        eigenfast.edge_prune(model, clean, clean, target_sparsity=1.5, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        eigenfast.acdc(model, clean, clean, threshold=-1, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        eigenfast.acdc(model, clean, clean, threshold=float("nan"), progress=False)
    circuit = eigenfast.eap(model, clean, clean, target_sparsity=0.9, progress=False, evaluate=False)
    with pytest.raises(ValueError, match="patch_data"):
        extract_nodes(model, circuit, None)
    with pytest.raises(eigenfast.ArgumentError, match="extrapolate must be one of"):
        extract_nodes(model, circuit, clean, extrapolate="clamp")


def test_every_result_with_a_changed_model_saves_and_loads_the_same_way(task, tmp_path):
    task, corrupted = task
    model, data = task.model, task.val_data
    circuit = eigenfast.eap(model, data, corrupted, target_sparsity=0.8, progress=False, evaluate=False)
    results = {
        "eigenpruned": eigenfast.prune(model, data, p=0.2, progress=False),
        "circuit": eigenfast.extract_circuit(model, task.patch_data, data, threshold=1e-4, progress=False,
                                             latency_repeats=0),
        "node circuit": extract_nodes(model, circuit, corrupted),
    }
    for kind, result in results.items():
        assert isinstance(result, ModelResult) and result.kind == kind
        folder = result.save(tmp_path / kind.replace(" ", "_"))
        assert json.loads((folder / "eigenfast.json").read_text())["kind"] == kind
        loaded = eigenfast.load(folder)
        assert type(loaded) is type(model)
        with torch.no_grad():
            assert torch.equal(last_logits(get_adapter(loaded), data), last_logits(get_adapter(result.model), data))
    nodes = results["node circuit"]
    extras = load_extras(tmp_path / "node_circuit")
    assert extras["circuit.heads"].sum() == len(nodes.heads) == len(circuit.heads)
    assert nodes.method == "EAP" and "node circuit of EAP" in nodes.table()
    assert nodes.size_after.non_embedding < nodes.size_before.non_embedding


def test_a_node_circuit_saved_with_its_tokenizer_works_as_a_command_line_model(tmp_path, capsys):
    from eigenfast.builtin import load_builtin
    from eigenfast.cli import main

    model, tokenizer = load_builtin()
    clean = eigenfast.int_sum(tokenizer).subset(range(16))
    corrupted = eigenfast.edges.corrupt_by_shuffling(clean)
    edges = eigenfast.eap(model, clean, corrupted, target_sparsity=0.9, progress=False, evaluate=False)
    folder = extract_nodes(model, edges, corrupted, tokenizer=tokenizer).save(tmp_path / "nodes")
    assert main(["eval", "--model", str(folder), "--task", "int_sum", "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1000



@pytest.mark.parametrize("method", ["edge_prune", "eap", "acdc"])
def test_old_data_keywords_warn_and_give_the_same_circuit(method):
    model = make_model("gpt2")
    clean, corrupted = make_data(4, 5, seed=1), make_data(4, 5, seed=2)
    run = getattr(eigenfast, method)
    options = {"progress": False, "evaluate": False}
    if method == "edge_prune":
        options["steps"] = 3
    new = run(model, clean=clean, corrupted=corrupted, **options)
    with pytest.warns(DeprecationWarning) as warned:
        old = run(model, clean_data=clean, corrupted_data=corrupted, **options)
    assert [str(w.message).split(" is ")[0] for w in warned] == [f"{method}(clean_data=...)", f"{method}(corrupted_data=...)"]
    assert "use clean=" in str(warned[0].message) and "use corrupted=" in str(warned[1].message)
    assert old.edges == new.edges
    torch.testing.assert_close(old.scores, new.scores, rtol=0, atol=0)
    with pytest.raises(eigenfast.ArgumentError, match="pass only clean="):
        run(model, clean_data=clean, clean=clean, corrupted=corrupted, **options)


def test_evaluate_circuit_takes_the_old_data_keywords_with_a_warning():
    model = make_model("gpt2")
    clean, corrupted = make_data(4, 5, seed=1), make_data(4, 5, seed=2)
    circuit = eigenfast.eap(model, clean, corrupted, progress=False, evaluate=False)
    new = evaluate_circuit(model, circuit, clean=clean, corrupted=corrupted)
    with pytest.warns(DeprecationWarning) as warned:
        old = evaluate_circuit(model, circuit, clean_data=clean, corrupted_data=corrupted)
    assert len(warned) == 2 and "evaluate_circuit(clean_data=...)" in str(warned[0].message)
    timeless = lambda report: {k: v for k, v in report.as_dict().items() if k != "seconds"}  # noqa: E731
    assert timeless(old) == timeless(new)
