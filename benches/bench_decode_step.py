"""One decode step (and one prefill) of an eigenpruned model against its base, timed step by step.

    python benches/bench_decode_step.py [--shape small] [--batches 1,32] [--prompt 16] [--steps 300] [--compiled]

`eigenfast bench` times whole generations, a few per cell, by the wall clock: on a shared
machine its cells move by more than the few percent this compares. Here both models run
the same step (a StaticCache filled with the prompt, the next token at the next
position) in alternation, each call timed by the thread's CPU time, and the ratio of the
medians is reported. `--compiled` runs both under torch.compile(fullgraph=True), the
bench's CPU mode. The models are `eigenfast bench`'s (random weights; the eigenpruned
one freezes p = 0.3 of q, k, v, o, mlp_in and mlp_out).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn
from transformers import StaticCache

from eigenfast.adapters.calls import cache_keyword
from eigenfast.commands.arguments import comma_list, positive_int
from eigenfast.commands.bench import SHAPES, build_models


def step_inputs(model: nn.Module, batch: int, prompt: int, decode: bool) -> tuple[dict, StaticCache]:
    """Keyword arguments of a prefill over ``prompt`` tokens, or of the decode step after it."""
    cache = StaticCache(config=model.config, max_cache_len=prompt + 1)
    vocab = int(model.config.vocab_size)
    start, length = (prompt, 1) if decode else (0, prompt)
    at = torch.arange(start, start + length)
    ids = torch.randint(0, vocab, (batch, length))
    return dict(input_ids=ids, position_ids=at.expand(batch, length), **{cache_keyword(model): cache},
                use_cache=True), cache


def rewind(cache: StaticCache, length: int) -> None:
    # transformers' StaticCache writes at its own running length: set it back so every timed call is the same step.
    for layer in cache.layers:
        if layer.is_initialized:
            layer.cumulative_length.fill_(length)


@torch.no_grad()
def median_step_s(forwards: dict[str, Callable], models: dict[str, nn.Module], batch: int, prompt: int,
                  decode: bool, steps: int) -> dict[str, float]:
    calls = {}
    for name, model in models.items():
        kwargs, cache = step_inputs(model, batch, prompt, decode)
        if decode:  # fill the cache with a prompt first
            prefill, _ = step_inputs(model, batch, prompt, decode=False)
            forwards[name](**{**prefill, cache_keyword(model): cache})
        calls[name] = (kwargs, cache)
    start = prompt if decode else 0
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(steps + 3):  # three warm-up calls each (compilation happens there)
        for name, (kwargs, cache) in calls.items():
            rewind(cache, start)
            began = time.thread_time()
            forwards[name](**kwargs)
            if step >= 3:
                times[name].append(time.thread_time() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="small")
    parser.add_argument("--batches", type=comma_list(positive_int), default=(1, 32))
    parser.add_argument("--prompt", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=300, help="timed decode steps per model (prefills: a tenth)")
    parser.add_argument("--compiled", action="store_true", help="torch.compile(fullgraph=True) both models")
    args = parser.parse_args()
    built = build_models(args.shape, "cpu")
    models = {"base": built["base"], "eigenpruned": built["eigenpruned"]}
    forwards: dict[str, Callable] = dict(models)
    if args.compiled:
        # Both models, prefill and decode shapes: more entries than dynamo's default limit on the one code object
        # (transformers' forward wrapper) they share.
        torch._dynamo.config.recompile_limit = 64
        forwards = {name: torch.compile(model, fullgraph=True) for name, model in models.items()}
    mode = "compiled" if args.compiled else "eager"
    print(f"shape {args.shape}, {mode}, CPU, {torch.get_num_threads()} threads; prompt {args.prompt}; "
          "median thread CPU time per call")
    print("| batch | call | base ms | eigenpruned ms | eigenpruned speed × |\n|---:|---|---:|---:|---:|")
    for batch in args.batches:
        for decode in (True, False):
            steps = args.steps if decode else max(5, args.steps // 10)
            t = median_step_s(forwards, models, batch, args.prompt, decode, steps)
            print(f"| {batch} | {'decode' if decode else 'prefill'} | {t['base'] * 1e3:.2f} | "
                  f"{t['eigenpruned'] * 1e3:.2f} | {t['base'] / t['eigenpruned']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
