"""Circuits and edge scores in the MIB / EAP-IG graph JSON, so circuits pass between eigenfast and MIB's tooling.

The file (what EAP-IG's ``Graph.to_json`` writes and ``Graph.from_json`` reads)::

    {"cfg":   {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": false, "d_model": 64},
     "nodes": {"input": {"in_graph": true}, "a0.h1": {"in_graph": false}, "m0": {...}, "logits": {...}},
     "edges": {"input->a0.h1<q>": {"score": 0.12, "in_graph": true}, "a0.h1->m0": {...}, "m1->logits": {...}}}

Names: eigenfast's writer ``emb`` is ``input``, ``L{l}.H{h}`` is ``a{l}.h{h}``, ``L{l}.MLP`` is ``m{l}``;
the reader ``L{l}.H{h}.q|k|v`` is the edge suffix ``a{l}.h{h}<q|k|v>``, ``L{l}.MLP`` is ``m{l}``
and ``logits`` is ``logits``. An edge is ``{writer}->{reader}``.

MIB's graph gives every query head its own k and v inputs (it ungroups grouped-query
attention); eigenfast has one k and one v reader per KV head. Writing copies a KV
edge to every query head that shares it; reading keeps a KV edge when any of those
copies is in the graph and scores it by their mean, so a file written here reads
back exactly. A node is in the graph when a kept edge leaves or enters it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import CircuitFileError
from .evaluate import EdgeCircuit, kept_edges
from .graph import EdgeGraph

FIX = "write it for this model (eigenfast's save_mib_graph, or EAP-IG's Graph.from_model(model).to_json)"


def mib_node(name: str) -> str:
    """eigenfast's writer name (``emb``, ``L{l}.H{h}``, ``L{l}.MLP``) or ``logits`` as MIB names it."""
    if name in ("emb", "logits"):
        return "input" if name == "emb" else "logits"
    layer, part = name[1:].split(".", 1)
    return f"m{layer}" if part == "MLP" else f"a{layer}.h{part[1:]}"


def mib_edges(graph: EdgeGraph) -> dict[str, int]:
    """Every MIB edge name and the eigenfast edge (index in the graph's order) it stands for."""
    names: dict[str, int] = {}
    group_size = graph.n_heads // graph.n_kv_heads
    for g, start in zip(graph.groups, graph.offsets):
        for reader in range(g.n_readers):
            if g.kind == "q":
                targets = [f"a{g.layer}.h{reader}<q>"]
            elif g.kind in ("k", "v"):
                targets = [f"a{g.layer}.h{h}<{g.kind}>" for h in range(reader * group_size, (reader + 1) * group_size)]
            else:
                targets = [mib_node(g.reader_names()[0])]
            for writer in range(g.n_writers):
                source = mib_node(graph.writer_names[writer])
                for target in targets:
                    names[f"{source}->{target}"] = start + reader * g.n_writers + writer
    return names


def _config(model: nn.Module) -> tuple[EdgeGraph, dict[str, Any]]:
    adapter = get_adapter(model)
    graph = EdgeGraph.of(adapter)
    return graph, {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel,
                   "d_model": adapter.d_model}


def _nodes(graph: EdgeGraph, kept: torch.Tensor) -> dict[str, dict[str, bool]]:
    """Each node's in_graph: a kept edge leaves or enters it (the logits always)."""
    touched = {"logits"}
    for name, index in mib_edges(graph).items():
        if kept[index]:
            source, target = name.split("->")
            touched |= {source, target.split("<")[0]}
    names = ["input"] + [mib_node(w) for w in graph.writer_names[1:]] + ["logits"]
    return {n: {"in_graph": n in touched} for n in names}


def save_mib_graph(circuit: Any, path: str | Path, model: nn.Module) -> Path:
    """Write any method's circuit (its kept edges and, when it has them, its edge scores) as MIB graph JSON."""
    graph, config = _config(model)
    kept = kept_edges(graph, circuit)
    scores = getattr(circuit, "scores", None)
    scores = (scores if isinstance(scores, torch.Tensor) else kept).double().cpu().tolist()
    edges = {name: {"score": scores[i], "in_graph": bool(kept[i])} for name, i in mib_edges(graph).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cfg": config, "nodes": _nodes(graph, kept), "edges": edges}))
    return path


def _entry(name: str, value: Any, where: Path) -> tuple[float, bool]:
    if not isinstance(value, dict) or "in_graph" not in value:
        raise CircuitFileError(f"{where}: edge {name!r} is {value!r}, not an object with 'in_graph' (and 'score'); "
                               + FIX)
    score, in_graph = value.get("score", float(bool(value["in_graph"]))), value["in_graph"]
    if not isinstance(in_graph, bool) or isinstance(score, bool) or not isinstance(score, (int, float)):
        raise CircuitFileError(f"{where}: edge {name!r} needs a boolean 'in_graph' and a numeric 'score', got "
                               f"{value!r}; " + FIX)
    return float(score), in_graph


def load_mib_graph(path: str | Path, model: nn.Module, method: str = "MIB graph") -> EdgeCircuit:
    """An :class:`EdgeCircuit` from an MIB graph JSON, checked against ``model``'s graph before anything is kept.

    Raises :class:`~eigenfast.errors.CircuitFileError` naming the first mismatch (a config value,
    a missing or unknown node or edge, a malformed entry).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CircuitFileError(f"cannot read {path} as JSON ({err}); pass a graph JSON file") from None
    if not isinstance(data, dict) or any(k not in data for k in ("cfg", "nodes", "edges")):
        raise CircuitFileError(f"{path} lacks the graph JSON's 'cfg', 'nodes' and 'edges' entries; " + FIX)
    graph, config = _config(model)
    cfg, nodes, edges = data["cfg"], data["nodes"], data["edges"]
    if not all(isinstance(x, dict) for x in (cfg, nodes, edges)):
        raise CircuitFileError(f"{path}: 'cfg', 'nodes' and 'edges' must be JSON objects; " + FIX)
    for key, value in config.items():
        required = key in ("n_layers", "n_heads")  # the graph's shape; the others are checked when given
        if (key in cfg or required) and cfg.get(key) != value:
            raise CircuitFileError(f"{path} is a graph with {key}={cfg.get(key)!r}; the model has {key}={value!r}: "
                                   "it was found on another model; " + FIX)
    expected = mib_edges(graph)
    known_nodes = set(_nodes(graph, torch.zeros(graph.n_edges, dtype=torch.bool)))
    unknown = next((n for n in nodes if n not in known_nodes), None)
    if unknown is not None:
        raise CircuitFileError(f"{path}: node {unknown!r} is not in the model's graph (nodes input, a<layer>.h<head>, "
                               f"m<layer>, logits for {graph.n_layers} layers of {graph.n_heads} heads); " + FIX)
    missing = next((n for n in expected if n not in edges), None)
    extra = next((n for n in edges if n not in expected), None)
    if missing is not None or extra is not None:
        which = f"lacks the edge {missing!r}" if missing is not None else f"has the edge {extra!r}, which"
        raise CircuitFileError(f"{path} {which} {'' if missing is not None else 'is not '}in the model's graph; " + FIX)
    totals = torch.zeros(graph.n_edges, dtype=torch.float64)
    counts = torch.zeros(graph.n_edges, dtype=torch.float64)
    kept = torch.zeros(graph.n_edges, dtype=torch.bool)
    for name, index in expected.items():
        score, in_graph = _entry(name, edges[name], path)
        totals[index] += score
        counts[index] += 1
        kept[index] |= in_graph
    return EdgeCircuit(method, graph, kept, (totals / counts).float(), math.nan)
