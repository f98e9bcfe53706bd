"""``eigenfast demo``: eigenprune the built-in model on int_sum and show every step's numbers."""
from __future__ import annotations

from typing import Sequence

from .data import int_sum
from .prune import PruneResult, prune


def run_demo(
    model_name: str = "int_sum_gpt2",
    components: Sequence[str] = ("k",),
    candidates: Sequence[float] = (0.01, 0.05, 0.10, 0.30),
    batch_size: int = 256,
    seed: int = 0,
) -> PruneResult:
    from .cli import load_model

    model, tokenizer = load_model(model_name)
    train, test = int_sum(tokenizer).split(0.8, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model   {model_name}: {type(model).__name__}, {n_params / 1e6:.2f} M parameters")
    print(f"task    int_sum: {len(train)} train / {len(test)} test examples (seeded 80/20 split, seed {seed})")
    print(f"method  eigenpruning of {', '.join(components)}; p chosen on a held-out 20% of train\n")

    result = prune(
        model, train, p="auto", components=components, candidates=candidates, test_data=test,
        batch_size=batch_size, seed=seed, tokenizer=tokenizer,
    )
    report = result.report
    print(report.table())
    print(f"\nfrozen at p={report.p:g} (singular values per layer and component):")
    for (layer, component), mask in sorted(result.frozen.items()):
        heads = ", ".join(f"h{h}:{int(n)}" for h, n in enumerate(mask.sum(dim=1)) if n) or "-"
        print(f"  layer {layer} {component:<8} {int(mask.sum()):>4} of {mask.numel():<5} {heads}")
    print("\ntime per phase (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()))
    kept = next(c for c in report.candidates if c.p == report.p)
    if report.baseline_test is not None and kept.test is not None:
        print(
            f"\ntest accuracy {report.baseline_test.accuracy:.2%} -> {kept.test.accuracy:.2%} "
            f"(loss {report.baseline_test.loss:.4f} -> {kept.test.loss:.4f}) with p={report.p:g}"
        )
        if kept.test.accuracy <= report.baseline_test.accuracy:
            print(
                "no improvement: eigenpruning did not raise test accuracy here "
                "(docs/EIGENPRUNING_TABLE.md has every built-in model, task and scoring choice)"
            )
    return result
