"""End-to-end ``eigenfast.score`` vs. the reference eigenpruning pipeline, side by side in one run.

The reference pipeline, re-implemented faithfully from the paper's code: cache every
activation of the model (as TransformerLens ``run_with_cache`` does), a full backward
with parameter gradients through the mean loss over the batch and the full-vocabulary
LM head, then for every site a Python loop over singular values that materialises a
(batch, tokens, heads, d_out) tensor per term; shift pairing (roll by one example).

Ours: ``eigenfast.score(..., pairs="shift")`` (and ``pairs="all"``, which adds pass 1).
Both give the same scores (the reference's mean loss scales them by 1/batch): checked.

    python benches/bench_score.py [--layers 12] [--examples 64] [--tokens 16] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config

os.environ.setdefault("EIGENFAST_QUIET", "1")

import eigenfast  # noqa: E402
from eigenfast.adapters import get_adapter, head_inputs, head_matrices, head_outputs, projection_matrix  # noqa: E402
from eigenfast.data import TaskData  # noqa: E402


def gpt2_small(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def reference_scores(model, data: TaskData, components, batch_size: int) -> dict:
    adapter = get_adapter(model)
    sites = [adapter.site(layer, c) for layer in range(adapter.n_layers) for c in components]
    factors = {}
    for site in sites:
        U, s, V = torch.linalg.svd(head_matrices(projection_matrix(model.get_submodule(site.path)).detach(), site),
                                   full_matrices=False)
        factors[site.key] = (U, s, V)
    scores = {site.key: torch.full(factors[site.key][1].shape, -torch.inf) for site in sites}
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in data.batches(batch_size):
        cache, grads = {}, {}

        def save(name):
            def hook(module, args, out):
                if isinstance(out, torch.Tensor):
                    cache[name] = out
                    if out.requires_grad:
                        out.register_hook(lambda g: grads.__setitem__(name, g))
                if args and isinstance(args[0], torch.Tensor):
                    cache[name + ".in"] = args[0]
            return hook

        handles = [m.register_forward_hook(save(n)) for n, m in model.named_modules() if n]
        model.zero_grad()
        logits = model(**batch.model_inputs()).logits
        torch.nn.functional.cross_entropy(logits[:, -1], batch.labels).backward()
        for h in handles:
            h.remove()
        B, T = batch.input_ids.shape
        for site in sites:
            x = cache[site.path + ".in"].detach().reshape(B * T, -1)
            g = grads[site.path].reshape(B * T, -1)
            delta = (x.view(B, T, -1).roll(1, dims=0).reshape(B * T, -1) - x)
            delta_h = head_inputs(delta, site).reshape(B, T, site.heads, -1)
            grad_h = head_outputs(g, site).reshape(B, T, site.heads, -1)
            U, s, V = factors[site.key]
            importance = torch.zeros(B, T, site.heads, s.shape[1])
            for i in range(s.shape[1]):
                tmp = torch.einsum("hd,bthd->bth", U[:, :, i], delta_h)
                tmp = tmp * s[:, i]
                tmp = torch.einsum("bth,hd->bthd", tmp, V[:, i, :])
                importance[..., i] = torch.einsum("bthd,bthd->bth", grad_h, tmp)
            scores[site.key] = torch.maximum(scores[site.key], importance.amax(dim=(0, 1)) * B)
        del cache, grads
    model.zero_grad(set_to_none=True)
    return scores


def forward_backward_only(model, data: TaskData, batch_size: int) -> tuple[float, float]:
    """Our passes without any statistics: the floor that scoring adds to."""
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in data.batches(batch_size):
            adapter.backbone()(**batch.model_inputs(), use_cache=False)
    forward = time.perf_counter() - start

    def leaf(module, args, kwargs):
        return (args[0].detach().requires_grad_(), *args[1:]), kwargs

    handle = adapter.layers()[0].register_forward_pre_hook(leaf, with_kwargs=True)
    start = time.perf_counter()
    for batch in data.batches(batch_size):
        hidden = adapter.backbone()(**batch.model_inputs(), use_cache=False).last_hidden_state
        logits = adapter.lm_head()(hidden[:, -1])
        torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").backward()
    handle.remove()
    return forward, time.perf_counter() - start


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--components", default="k")
    args = parser.parse_args()
    components = tuple(args.components.split(","))
    model = gpt2_small(args.layers)
    g = torch.Generator().manual_seed(0)
    data = TaskData(torch.randint(0, 50257, (args.examples, args.tokens), generator=g),
                    torch.randint(0, 50257, (args.examples,), generator=g))

    warm = data.subset(range(args.batch))  # first calls pay one-off costs; keep them out of every row
    forward_backward_only(model, warm, args.batch)
    eigenfast.score(model, warm, components=components, pairs="shift", batch_size=args.batch)
    forward, fwd_bwd = forward_backward_only(model, data, args.batch)
    ours, t_ours = timed(eigenfast.score, model, data, components=components, pairs="shift", batch_size=args.batch)
    ours_all, t_all = timed(eigenfast.score, model, data, components=components, pairs="all", batch_size=args.batch)
    ref, t_ref = timed(reference_scores, model, data, components, args.batch)
    worst = max(float((ours[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)

    print(f"GPT-2-small shapes: {args.layers} layers, 12 heads, d_model 768, vocab 50257; "
          f"{args.examples} examples x {args.tokens} tokens, batch {args.batch}; components {components}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"same scores (shift): max relative difference {worst:.2e}\n")
    print(f"| {'pipeline':<44} | {'time (s)':>8} | {'vs reference':>12} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 14}|")
    rows = [
        ("reference pipeline (cache all, param grads, loop)", t_ref),
        ("eigenfast.score pairs='shift'", t_ours),
        ("eigenfast.score pairs='all' (exact all-pairs)", t_all),
        ("  floor: our forward only", forward),
        ("  floor: our forward+backward, no statistics", fwd_bwd),
    ]
    for name, t in rows:
        print(f"| {name:<44} | {t:>8.2f} | {t_ref / t:>11.1f}x |")
    print(f"\nscoring on top of forward+backward (shift): {100 * (t_ours - fwd_bwd) / fwd_bwd:+.1f}%  "
          f"(all-pairs adds pass 1: {100 * (t_all - fwd_bwd - forward) / (fwd_bwd + forward):+.1f}% over fwd+bwd+fwd)")


if __name__ == "__main__":
    main()
