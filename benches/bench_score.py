"""End-to-end ``eigenfast.score`` vs. the reference eigenpruning pipeline, side by side in one run.

The reference pipeline (``eigenfast.testing.reference.reference_pipeline``), re-implemented
faithfully from the paper's code: cache every activation of the model (as TransformerLens
``run_with_cache`` does), a full backward with parameter gradients through the mean loss
over the batch and the full-vocabulary LM head, then for every site a Python loop over
singular values that materialises a (batch, tokens, heads, d_out) tensor per term; shift
pairing (roll by one example).

Ours: ``eigenfast.score(..., pairs="shift")`` and ``pairs="all"`` (the default, which adds
pass 1). Both give the same scores as the reference in shift mode: checked.

Every pipeline runs ``--repeat`` times, taking turns within a round so that load from
other processes hits them alike; the table shows the best time of each and the ratios
of those. The SVD of each weight is cached across ``score`` calls, so only the first
call (the warm-up) pays it; the reference pays its float32 SVD in every call.

    python benches/bench_score.py [--layers 12] [--examples 64] [--tokens 16] [--batch 16]
                                  [--components k] [--repeat 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config

os.environ.setdefault("EIGENFAST_QUIET", "1")

import eigenfast  # noqa: E402
from eigenfast.adapters import get_adapter  # noqa: E402
from eigenfast.data.task_data import TaskData
from eigenfast.testing.reference import reference_pipeline  # noqa: E402


def gpt2_small(layers: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device).eval()


def forward_backward_only(model, data: TaskData, batch_size: int) -> tuple[float, float]:
    """Our passes without any statistics: the floor that scoring adds to."""
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data.batches(batch_size):
            adapter.backbone()(**batch.model_inputs(device), use_cache=False)
    synchronize()
    forward = time.perf_counter() - start

    def leaf(module, args, kwargs):
        return (args[0].detach().requires_grad_(), *args[1:]), kwargs

    handle = adapter.layers()[0].register_forward_pre_hook(leaf, with_kwargs=True)
    start = time.perf_counter()
    for batch in data.batches(batch_size):
        hidden = adapter.backbone()(**batch.model_inputs(device), use_cache=False).last_hidden_state
        logits = adapter.lm_head()(hidden[:, -1])
        torch.nn.functional.cross_entropy(logits, batch.labels.to(device), reduction="sum").backward()
    synchronize()
    handle.remove()
    return forward, time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--components", default="k")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the best of each is kept")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    components = tuple(args.components.split(","))
    model = gpt2_small(args.layers, args.device)
    g = torch.Generator().manual_seed(0)
    data = TaskData(torch.randint(0, 50257, (args.examples, args.tokens), generator=g),
                    torch.randint(0, 50257, (args.examples,), generator=g))
    on_device = TaskData(data.input_ids.to(args.device), data.labels.to(args.device))

    def ours(pairs: str) -> dict:
        return eigenfast.score(model, data, components=components, pairs=pairs, batch_size=args.batch)

    warm = data.subset(range(args.batch))  # first calls pay one-off costs (and the SVD); keep them out of every row
    forward_backward_only(model, warm, args.batch)
    _, t_first = timed(eigenfast.score, model, warm, components=components, pairs="all", batch_size=args.batch)
    best = {name: float("inf") for name in ("ref", "shift", "all", "forward", "fwd_bwd")}
    for _ in range(args.repeat):
        forward, fwd_bwd = forward_backward_only(model, data, args.batch)
        shift, t_shift = timed(ours, "shift")
        _, t_all = timed(ours, "all")
        ref, t_ref = timed(reference_pipeline, model, on_device, components, args.batch)
        for name, t in (("ref", t_ref), ("shift", t_shift), ("all", t_all), ("forward", forward), ("fwd_bwd", fwd_bwd)):
            best[name] = min(best[name], t)
    worst = max(float((shift[k] - ref[k].cpu()).abs().max() / ref[k].cpu().abs().max()) for k in ref)

    print(f"GPT-2-small shapes: {args.layers} layers, 12 heads, d_model 768, vocab 50257; "
          f"{args.examples} examples x {args.tokens} tokens, batch {args.batch}; components {components}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; "
          f"best of {args.repeat} rounds")
    print(f"same scores (shift): max relative difference {worst:.2e}; "
          f"first score call on the warm-up batch (pays the SVD): {t_first:.2f} s\n")
    print(f"| {'pipeline':<44} | {'time (s)':>8} | {'vs reference':>12} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 14}|")
    rows = [
        ("reference pipeline (cache all, param grads, loop)", best["ref"]),
        ("eigenfast.score pairs='shift'", best["shift"]),
        ("eigenfast.score pairs='all' (exact all-pairs)", best["all"]),
        ("  floor: our forward only", best["forward"]),
        ("  floor: our forward+backward, no statistics", best["fwd_bwd"]),
    ]
    for name, t in rows:
        print(f"| {name:<44} | {t:>8.2f} | {best['ref'] / t:>11.1f}x |")
    print(f"\nscoring on top of forward+backward (shift): {100 * (best['shift'] - best['fwd_bwd']) / best['fwd_bwd']:+.1f}%")


if __name__ == "__main__":
    main()
