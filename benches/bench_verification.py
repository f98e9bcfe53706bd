"""The verified estimate's exact forwards: stacks formed at the candidates' layer vs from the input, side by side.

``verify_lowest`` stacks one layer's candidates and forms the stack at that layer's input, so the
layers below run once on the unstacked rows (the kept prefix). The comparison runs the same
stacks of the same candidates from the input (every layer on ``C × B`` rows, what the stage did
before), on the table's case by default: a built-in model, the v terms any p up to 0.3 could
freeze, the scoring third of seed 0 of its held-out int_sum data. Both give the same ΔL (checked);
rounds take turns so that load from other processes hits both alike; the best time of each and
their ratio are printed.

    OMP_NUM_THREADS=1 python benches/bench_verification.py [--model conflict3_gpt2] [--components v]
                                                          [--fraction 0.3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("EIGENFAST_QUIET", "1")

from eigenfast.adapters import get_adapter  # noqa: E402
from eigenfast.builtin import heldout_task, load_builtin  # noqa: E402
from eigenfast.eigenprune import verification  # noqa: E402
from eigenfast.eigenprune.freezing import select_frozen  # noqa: E402
from eigenfast.eigenprune.scoring import attribute  # noqa: E402
from eigenfast.eigenprune.table import protocol_splits  # noqa: E402


@torch.no_grad()
def from_input(model, attribution, data, fraction: float, batch_size: int) -> torch.Tensor:
    """The same stacks as ``verify_lowest``, each run from the first layer: summed ΔL per candidate."""
    adapter = get_adapter(model)
    candidates = sorted(
        (verification._Candidate(key, int(h), int(i)) for key, mask in select_frozen(attribution.scores, fraction).items()
         for h, i in mask.nonzero().tolist()),
        key=lambda c: c.key[0],
    )
    vectors = verification._vectors(model, attribution, candidates)
    modules = verification._module_keys(attribution, candidates)
    means = {path: verification._mean_rows(attribution, key) for path, key in modules.items()}
    chunk = max(1, verification.STACK * batch_size // min(batch_size, len(data)))
    sums = torch.zeros(len(candidates), dtype=torch.float64)
    for batch in data.batches(batch_size):
        base = verification._losses(adapter, batch).sum()
        for layer, (first, stop) in verification._layer_runs(candidates).items():
            in_layer = {path: v for path, v in vectors.items() if modules[path][0] == layer}
            for start in range(first, stop, chunk):
                end = min(stop, start + chunk)
                sums[start:end] += verification._stacked_losses(adapter, batch, in_layer, means, 0, start, end) - base
    return sums / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="conflict3_gpt2")
    parser.add_argument("--components", default="v")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_builtin(args.model)
    score, _, _ = protocol_splits(heldout_task(args.model, "int_sum", tokenizer), seed=0)
    components = tuple(args.components.split(","))
    attribution = attribute(model, score, components, "all", args.batch, reduce="mean", progress=False)
    times = {"from the candidates' layer (verify_lowest)": [], "from the input": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        ours = verify_lowest_scores(model, attribution, score, args.fraction, args.batch)
        times["from the candidates' layer (verify_lowest)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        reference = from_input(model, attribution, score, args.fraction, args.batch)
        times["from the input"].append(time.perf_counter() - started)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    per_layer = {}
    for (layer, _), mask in select_frozen(attribution.scores, args.fraction).items():
        per_layer[layer] = per_layer.get(layer, 0) + int(mask.sum())
    print(f"{args.model}, {args.components} terms up to p = {args.fraction:g}: {len(ours)} candidates "
          f"(per layer {per_layer}), {len(score)} scoring examples, threads {torch.get_num_threads()}")
    for name, values in times.items():
        print(f"  {name:<45} best {min(values):7.2f} s")
    best = [min(v) for v in times.values()]
    print(f"  ratio (from the input / ours): {best[1] / best[0]:.2f}x")


def verify_lowest_scores(model, attribution, data, fraction: float, batch_size: int) -> torch.Tensor:
    """``verify_lowest``'s measured ΔL of each candidate, in the layer-sorted order the reference uses."""
    checked = verification.verify_lowest(model, attribution, data, fraction, batch_size, progress=False).scores
    lowest = select_frozen(attribution.scores, fraction)
    pairs = sorted(((key, h, i) for key, mask in lowest.items() for h, i in mask.nonzero().tolist()),
                   key=lambda c: c[0][0])
    return torch.tensor([float(checked[key][h, i]) for key, h, i in pairs], dtype=torch.float64)


if __name__ == "__main__":
    main()
