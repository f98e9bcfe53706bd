"""Edge-level circuit discovery (docs/EDGES.md): one edge graph, Edge Pruning, EAP and ACDC, one evaluation.

    circuit = eigenfast.edge_prune(model, clean, corrupted, target_sparsity=0.95, steps=300)
    circuit = eigenfast.edges.run(model, clean, corrupted, "eap", EdgeOptions(target_sparsity=0.9))
    circuit = eigenfast.eap(model, clean, corrupted, method="ig-inputs", faithfulness=0.9)   # EAP-IG, a target
    circuit.edges, circuit.heads, circuit.mlps, circuit.report
    smaller = eigenfast.edges.extract_nodes(model, circuit, corrupted)   # smaller.model, smaller.save(folder)
    report = eigenfast.edges.evaluate_faithfulness(model, clean, corrupted, "eap", resamples=10)  # MIB CPR/CMD
    eigenfast.edges.save_mib_graph(circuit, "circuit.json", model); eigenfast.edges.load_mib_graph("circuit.json", model)
"""
from .acdc import acdc
from .benchmark import FaithfulnessReport, evaluate_faithfulness
from .corrupt import corrupt_by_shuffling
from .eap import eap
from .edge_prune import edge_prune
from .ensemble import average_ranks
from .evaluate import EdgeCircuit, EdgeReport, evaluate_circuit, roc_auc, true_edges
from .extraction import NodeCircuitResult, extract_nodes
from .faithfulness import FaithfulnessCurve, faithfulness_curve
from .graph import EdgeGraph, ReaderGroup
from .masked_forward import EdgeForward
from .mib_graph import load_mib_graph, save_mib_graph
from .options import EdgeOptions
from .registry import METHODS, run
from .stability import Stability

__all__ = [
    "EdgeCircuit",
    "EdgeForward",
    "EdgeGraph",
    "EdgeOptions",
    "EdgeReport",
    "FaithfulnessCurve",
    "FaithfulnessReport",
    "NodeCircuitResult",
    "METHODS",
    "ReaderGroup",
    "Stability",
    "acdc",
    "average_ranks",
    "corrupt_by_shuffling",
    "eap",
    "edge_prune",
    "evaluate_circuit",
    "evaluate_faithfulness",
    "extract_nodes",
    "faithfulness_curve",
    "load_mib_graph",
    "roc_auc",
    "run",
    "save_mib_graph",
    "true_edges",
]
