"""Edge Pruning's and ACDC's defaults (no knob: the smallest circuit reaching faithfulness 0.99) on the synthetic task.

    python benches/bench_edge_defaults.py [--seeds 0,1,2] [--families gpt2,llama] [--methods edge_prune,acdc]
                                          [--edge-prune-steps 100,300]

For every synthetic task (seed × family) and method it runs the method with no
setting at all, then prints whether the circuit's heads are exactly the true ones,
the head FPR, the edges kept, the probes' kept counts, and the masked forwards it ran
(counted by wrapping ``EdgeForward.logits``: "fwd+bwd" with gradients, each followed
by one backward, "fwd" without). ``--edge-prune-steps`` runs Edge Pruning's search once
per value of steps per probe in the same process (300 was the default before the
search got its own 100), so the costs compare side by side. The table is in
docs/EDGES.md ("Targets").
"""
from __future__ import annotations

import argparse
import time

import torch

from eigenfast.circuit.synthetic import synthetic_task
from eigenfast.edges import EdgeOptions, evaluate_circuit, run
from eigenfast.edges.masked_forward import EdgeForward


class PassCounter:
    """Counts calls of the masked forward, with and without gradients, while installed."""

    def __init__(self) -> None:
        self.grad = self.no_grad = 0
        self.original = EdgeForward.logits

    def __enter__(self) -> "PassCounter":
        original, counter = self.original, self

        def counting(forward: EdgeForward, *args, **kwargs):
            if torch.is_grad_enabled():
                counter.grad += 1
            else:
                counter.no_grad += 1
            return original(forward, *args, **kwargs)

        EdgeForward.logits = counting
        return self

    def __exit__(self, *exc) -> None:
        EdgeForward.logits = self.original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--families", default="gpt2,llama")
    parser.add_argument("--methods", default="edge_prune,acdc")
    parser.add_argument("--edge-prune-steps", default="100", help="steps per probe of Edge Pruning's search")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} thread(s); synthetic_task: 3 layers x 4 heads, 16 prompts, rolled counterfactuals")
    print(f"{'method':<22}{'family':<7}{'seed':>5}  {'heads':<6}{'FPR':>6}{'kept':>6}{'fwd+bwd':>9}{'fwd':>7}"
          f"{'seconds':>9}  probes' kept edges")
    for seed in (int(s) for s in args.seeds.split(",")):
        for family in args.families.split(","):
            task = synthetic_task(family, seed=seed)
            corrupted = task.val_data.subset(torch.roll(torch.arange(len(task.val_data)), 1))
            runs = []
            for method in args.methods.split(","):
                if method == "edge_prune":
                    runs += [(f"edge_prune steps={s}", method, EdgeOptions(steps=int(s), progress=False, evaluate=False))
                             for s in args.edge_prune_steps.split(",")]
                else:
                    runs.append((method, method, EdgeOptions(progress=False, evaluate=False)))
            for label, method, options in runs:
                start = time.perf_counter()
                with PassCounter() as passes:
                    circuit = run(task.model, task.val_data, corrupted, method, options)
                seconds = time.perf_counter() - start
                report = evaluate_circuit(task.model, circuit, task.val_data, corrupted, true_heads=task.true_heads)
                exact = "exact" if set(circuit.heads) == set(task.true_heads) else "WRONG"
                print(f"{label:<22}{family:<7}{seed:>5}  {exact:<6}{report.fpr:>6.3f}{report.edges_kept:>6}"
                      f"{passes.grad:>9}{passes.no_grad:>7}{seconds:>9.1f}  {[int(p['kept']) for p in circuit.trace]}",
                      flush=True)


if __name__ == "__main__":
    main()
