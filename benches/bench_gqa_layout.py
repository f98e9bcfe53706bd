"""KV slots and decode step of llama-small's extracted circuit under GQA, against its base.

    OMP_NUM_THREADS=1 python benches/bench_gqa_layout.py [--seeds 0,1,2] [--batch 32] [--prompt 256] [--steps 300]

For each seed, the heads `eigenfast bench` removes (its draw, with that generator seed):
the distinct KV heads the kept query heads read, and the KV slots the extracted model
holds (`serving.kv_cache_bytes` counts the same). Then one decode step of the seed-0
circuit (the bench's) against the base, alternating, each call timed by the thread's CPU
time (benches/bench_decode_step.py's loop), eager, one thread.
"""
from __future__ import annotations

import argparse
import copy

import torch
from bench_decode_step import median_step_s
from transformers import AutoConfig, AutoModelForCausalLM

from eigenfast.adapters import get_adapter
from eigenfast.circuit import component_means, remove_components
from eigenfast.commands.arguments import comma_list, positive_int
from eigenfast.commands.bench import SHAPES, build_models
from eigenfast.data.task_data import TaskData
from eigenfast.serving.cost import decode_step_bytes, kv_cache_bytes


def kv_slots(seed: int) -> tuple[int, int, int]:
    """(base KV slots, distinct KV heads kept, KV slots the extracted model holds) for the bench's draw."""
    family, overrides = SHAPES["llama-small"]
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **overrides)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    adapter = get_adapter(base)
    g = torch.Generator().manual_seed(seed)  # drawn in build_models' order: data, heads, MLPs
    data = TaskData(torch.randint(0, config.vocab_size, (16, 16), generator=g), torch.zeros(16, dtype=torch.long))
    heads = torch.randperm(adapter.n_layers * adapter.n_heads, generator=g)[: adapter.n_layers * adapter.n_heads // 2]
    removed: dict[int, list[int]] = {}
    for index in heads.tolist():
        removed.setdefault(index // adapter.n_heads, []).append(index % adapter.n_heads)
    mlps = sorted(torch.randperm(adapter.n_layers, generator=g)[: adapter.n_layers // 2].tolist())
    distinct = sum(
        len({adapter.kv_head(h) for h in range(adapter.n_heads) if h not in removed.get(layer, [])})
        for layer in range(adapter.n_layers)
    )
    circuit = copy.deepcopy(base)
    remove_components(circuit, removed, mlps, component_means(base, data))
    held = get_adapter(circuit)
    slots = sum(held.layer_heads(layer)[1] for layer in range(held.n_layers) if held.has_component(layer, "k"))
    return adapter.n_layers * adapter.n_kv_heads, distinct, slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=comma_list(int), default=(0, 1, 2))
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--prompt", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=300)
    args = parser.parse_args()
    print("| draw | distinct kept KV heads | KV slots held | base |\n|---|---:|---:|---:|")
    for seed in args.seeds:
        base, distinct, held = kv_slots(seed)
        print(f"| seed {seed} | {distinct} | {held} | {base} |", flush=True)
    built = build_models("llama-small", "cpu")
    models = {"base": built["base"], "extracted": built["extracted"]}
    length = args.prompt + 1
    for name, model in models.items():
        print(f"{name}: KV cache {kv_cache_bytes(model, args.batch, length)} B, "
              f"decode step {decode_step_bytes(model, args.batch, length)} B")
    t = median_step_s(dict(models), models, args.batch, args.prompt, True, args.steps)
    print(f"decode step, {torch.get_num_threads()} thread(s): base {t['base'] * 1e3:.2f} ms, "
          f"extracted {t['extracted'] * 1e3:.2f} ms, speed-up {t['base'] / t['extracted']:.3f}")


if __name__ == "__main__":
    main()
