"""What positions="mean" (plain checkpoints) costs against positions="indexed" (position tables).

Eigenpruning rows: the built-in model scores one component on the score third of its held-out
examples (split seed as in docs/EIGENPRUNING_TABLE.md), and the same frozen terms are folded
both ways: per position (a table) and as their mean over every scoring token (an ordinary
bias). Extraction rows: Algorithm 1 finds the circuit once (D_a and D_v: disjoint draws of 250
held-out examples), and the removed components are replaced both ways, by their per-position
means and by their means over every D_a token. Every number is on the test third (pruning) or on
a third disjoint draw of held-out examples (extraction): accuracy of the base model and of both
forms, and the mean next-token KL divergences between them (nats).

Usage: python benches/bench_plain_positions.py [--seed 0] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import copy

import torch

from eigenfast.adapters import get_adapter
from eigenfast.builtin import heldout_task, load_builtin
from eigenfast.circuit import component_means, extract_circuit
from eigenfast.eigenprune.freezing import freeze, select_frozen
from eigenfast.eigenprune.scoring import attribute
from eigenfast.eigenprune.table import protocol_splits
from eigenfast.rewrite.removal import remove_pruned
from eigenfast.runtime.forward import last_logits
from eigenfast.runtime.metrics import kl_divergence

# (model, task, component, reduce over pairs, p): the table's working rows, and int_sum_gpt2 settings that change
# its outputs (under max over pairs at these p its frozen terms change nothing, so both forms equal the base).
PRUNE_ROWS = [
    ("conflict3_gpt2", "int_sum", "v", "mean", 0.1),
    ("conflict3_gpt2", "int_sum", "v", "mean", 0.3),
    ("conflict3_gpt2", "int_sum", "o", "mean", 0.3),
    ("int_sum_gpt2", "int_sum", "k", "mean", 0.05),
    ("int_sum_gpt2", "int_sum", "v", "mean", 0.01),
]
# (model, task, threshold, include MLPs)
EXTRACT_ROWS = [
    ("int_sum_gpt2", "int_sum", 0.01, False),
    ("int_sum_gpt2", "int_sum", 0.1, True),
    ("int_sum_llama", "int_sum", 0.01, False),
    ("int_sum_llama", "int_sum", 0.1, True),
]


@torch.inference_mode()
def log_probs(model, data, batch_size: int) -> torch.Tensor:
    adapter = get_adapter(model)
    return torch.cat([torch.log_softmax(last_logits(adapter, b), -1) for b in data.batches(batch_size)])


def compare(base, indexed, mean, data, batch_size: int) -> dict[str, float]:
    """Accuracies of the three models and the KLs between them on ``data``."""
    lp = {name: log_probs(m, data, batch_size) for name, m in (("base", base), ("indexed", indexed), ("mean", mean))}
    acc = {f"acc {name}": float((v.argmax(-1) == data.labels).float().mean()) for name, v in lp.items()}
    kl = lambda f, g: float(kl_divergence(lp[f], lp[g]).mean())  # noqa: E731
    return {**acc, "KL base||indexed": kl("base", "indexed"), "KL base||mean": kl("base", "mean"),
            "KL indexed||mean": kl("indexed", "mean")}


def prune_row(name, task, component, reduce, p, seed, batch_size):
    model, tokenizer = load_builtin(name)
    score, _, test = protocol_splits(heldout_task(name, task, tokenizer), seed)
    attribution = attribute(model, score, (component,), "all", batch_size, progress=False, reduce=reduce)
    frozen = select_frozen(attribution.scores, p)
    forms = {}
    for positions in ("indexed", "mean"):
        forms[positions] = copy.deepcopy(model)
        freeze(forms[positions], attribution, frozen, positions=positions)
    return compare(model, forms["indexed"], forms["mean"], test, batch_size)


def extract_row(name, task, threshold, mlps, seed, batch_size):
    model, tokenizer = load_builtin(name)
    data = heldout_task(name, task, tokenizer)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    patch, val, test = (data.subset(order[i * 250:(i + 1) * 250]) for i in range(3))
    indexed = extract_circuit(model, patch, val, threshold, include_mlps=mlps, progress=False, latency_repeats=0)
    adapter = get_adapter(model)
    kept = set(indexed.heads)
    pruned_heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if (l, h) not in kept]
    pruned_mlps = [l for l in range(adapter.n_layers) if l not in indexed.mlps]
    mean = remove_pruned(model, pruned_heads, pruned_mlps, component_means(model, patch), positions="mean")
    row = compare(model, indexed.model, mean, test, batch_size)
    row["kept"] = f"{len(kept)}/{adapter.n_layers * adapter.n_heads} heads, {len(indexed.mlps)}/{adapter.n_layers} MLPs"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="split seed (the table's score/val/test thirds)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    header = "| model | change | acc base | acc indexed | acc mean | KL base‖indexed | KL base‖mean | KL indexed‖mean |"
    print(header)
    print("|" + "---|" * 8)

    def line(label, row):
        print(f"| {label} | {100 * row['acc base']:.1f} | {100 * row['acc indexed']:.1f} | {100 * row['acc mean']:.1f} "
              f"| {row['KL base||indexed']:.4f} | {row['KL base||mean']:.4f} | {row['KL indexed||mean']:.4f} |", flush=True)

    for name, task, component, reduce, p in PRUNE_ROWS:
        row = prune_row(name, task, component, reduce, p, args.seed, args.batch_size)
        line(f"{name} | prune {task}: {component} all/{reduce}, p={p}", row)
    for name, task, threshold, mlps in EXTRACT_ROWS:
        row = extract_row(name, task, threshold, mlps, args.seed, args.batch_size)
        line(f"{name} | extract {task}: α={threshold}{', MLPs too' if mlps else ''} ({row['kept']})", row)


if __name__ == "__main__":
    main()
