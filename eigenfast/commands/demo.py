"""Eigenprune the built-in model on int_sum and print every step's numbers.

The model was trained on 80% of int_sum; scoring reads those training examples, p is
chosen on half of the 20% it never saw (val) and accuracy is reported on the other
half (test).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from ..data import int_sum
from ..loading import load_model
from ..prune import DEFAULT_CANDIDATES, PruneResult, prune
from ..splits import task_parts
from .arguments import add_model_options, comma_list, component, fraction, print_parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, model_default="int_sum_gpt2")
    parser.add_argument("--components", type=comma_list(component), default="k",
                        help="comma-separated components to prune, e.g. k,q,mlp_in")
    parser.add_argument("--candidates", type=comma_list(fraction), default=",".join(map(str, DEFAULT_CANDIDATES)),
                        help="p values tried; the most accurate on val is kept")


def run(args: argparse.Namespace) -> int:
    run_demo(args.model, args.components, args.candidates, args.batch_size, args.seed)
    return 0


def run_demo(
    model_name: str = "int_sum_gpt2",
    components: Sequence[str] = ("k",),
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    batch_size: int = 256,
    seed: int = 0,
) -> PruneResult:
    loaded = load_model(model_name)
    parts = task_parts("int_sum", int_sum(loaded.tokenizer), loaded.training, seed)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model   {model_name}: {type(loaded.model).__name__}, {n_params / 1e6:.2f} M parameters")
    print_parts(parts["train"], parts["val"], parts["test"])
    print(f"method  eigenpruning of {', '.join(components)}; scored on train, p chosen on val, reported on test\n")

    result = prune(
        loaded.model, parts["train"].data, p="auto", components=components, candidates=candidates,
        val_data=parts["val"].data, test_data=parts["test"].data, batch_size=batch_size, seed=seed,
        tokenizer=loaded.tokenizer,
    )
    report = result.report
    print(report.table())
    print(f"\nfrozen at p={report.p:g} (singular values per layer and component):")
    for (layer, name), mask in sorted(result.frozen.items()):
        heads = ", ".join(f"h{h}:{int(n)}" for h, n in enumerate(mask.sum(dim=1)) if n) or "-"
        print(f"  layer {layer} {name:<8} {int(mask.sum()):>4} of {mask.numel():<5} {heads}")
    print("\ntime per phase (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()))
    kept = next(c for c in report.candidates if c.p == report.p)
    if report.baseline_test is not None and kept.test is not None:
        print(
            f"\ntest accuracy ({len(parts['test'].data)} never-trained-on examples) "
            f"{report.baseline_test.accuracy:.2%} -> {kept.test.accuracy:.2%} "
            f"(loss {report.baseline_test.loss:.4f} -> {kept.test.loss:.4f}) with p={report.p:g}"
        )
        if kept.test.accuracy <= report.baseline_test.accuracy:
            print(
                "no improvement: eigenpruning did not raise test accuracy here "
                "(docs/EIGENPRUNING_TABLE.md has every built-in model, task and scoring choice)"
            )
    return result
