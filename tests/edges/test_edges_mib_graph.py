"""The MIB / EAP-IG graph JSON: a hand-written file read as the format specifies, round trips, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from eigenfast.adapters import get_adapter
from eigenfast.edges import EdgeGraph, extract_nodes
from eigenfast.edges.evaluate import EdgeCircuit
from eigenfast.edges.mib_graph import load_mib_graph, mib_edges, save_mib_graph
from eigenfast.errors import CircuitFileError

from conftest import IDS, make_data, make_model

FIXTURE = Path(__file__).parent / "fixtures" / "mib_graph_1layer_2heads.json"


def _one_layer_two_heads():
    torch.manual_seed(0)
    config = GPT2Config(**IDS, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_a_hand_written_file_reads_as_the_format_specifies(tmp_path):
    model = _one_layer_two_heads()
    circuit = load_mib_graph(FIXTURE, model)
    by_name = dict(zip(circuit.graph.edge_names, zip(circuit.kept.tolist(), circuit.scores.tolist())))
    assert by_name[("emb", "L0.H0.q")] == (True, 0.5)
    assert by_name[("emb", "L0.H0.k")] == (False, -0.25)
    assert by_name[("emb", "L0.H1.v")] == (False, -0.0625)
    assert by_name[("L0.H0", "L0.MLP")] == (True, -3.0)
    assert by_name[("emb", "logits")] == (True, 4.0)
    assert by_name[("L0.MLP", "logits")] == (True, 2.5)
    assert sum(k for k, _ in by_name.values()) == 6 and len(by_name) == 13
    assert circuit.heads == [(0, 0)] and circuit.mlps == [0]
    # What eigenfast writes for that circuit is the hand-written file, entry for entry.
    written = save_mib_graph(circuit, tmp_path / "circuit.json", model)
    assert json.loads(written.read_text()) == json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", ["gpt2", "llama", "phi"])  # sequential, grouped-query, parallel blocks
def test_round_trip(name, tmp_path):
    model = make_model(name)
    graph = EdgeGraph.of(get_adapter(model))
    g = torch.Generator().manual_seed(0)
    circuit = EdgeCircuit("EAP", graph, torch.rand(graph.n_edges, generator=g) < 0.3,
                          torch.randn(graph.n_edges, generator=g), 1.0)
    path = save_mib_graph(circuit, tmp_path / "c.json", model)
    back = load_mib_graph(path, model)
    assert torch.equal(back.kept, circuit.kept) and torch.equal(back.scores, circuit.scores)
    data = json.loads(path.read_text())
    # MIB gives every query head its own k and v inputs: 2 layers × 4 heads × 3 inputs per earlier writer.
    assert len(data["edges"]) == len(mib_edges(graph)) >= graph.n_edges
    assert data["cfg"]["parallel_attn_mlp"] == graph.parallel and data["nodes"]["logits"]["in_graph"]


def test_a_loaded_circuit_extracts(tmp_path):
    model = _one_layer_two_heads()
    smaller = extract_nodes(model, load_mib_graph(FIXTURE, model), make_data(n=4, length=5))
    assert smaller.heads == [(0, 0)] and smaller.mlps == [0]


def _edit(tmp_path, change):
    data = json.loads(FIXTURE.read_text())
    change(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda d: d["cfg"].update(n_heads=3), "n_heads=3; the model has n_heads=2"),
    (lambda d: d["cfg"].update(parallel_attn_mlp=True), "parallel_attn_mlp=True"),
    (lambda d: d["cfg"].pop("n_layers"), "n_layers=None"),
    (lambda d: d["edges"].pop("a0.h0->m0"), "lacks the edge 'a0.h0->m0'"),
    (lambda d: d["edges"].update({"m0->a0.h0<q>": {"score": 1.0, "in_graph": True}}), "has the edge 'm0->a0.h0<q>'"),
    (lambda d: d["nodes"].update({"a1.h0": {"in_graph": False}}), "node 'a1.h0'"),
    (lambda d: d["edges"].update({"input->m0": {"score": "high", "in_graph": True}}), "numeric 'score'"),
    (lambda d: d["edges"].update({"input->m0": True}), "not an object"),
    (lambda d: d.pop("edges"), "lacks the graph JSON's"),
])
def test_a_file_for_another_graph_is_refused(tmp_path, change, message):
    with pytest.raises(CircuitFileError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_mib_graph(_edit(tmp_path, change), _one_layer_two_heads())


def test_not_json_is_refused(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CircuitFileError, match="cannot read .* as JSON"):
        load_mib_graph(tmp_path / "bad.json", _one_layer_two_heads())
