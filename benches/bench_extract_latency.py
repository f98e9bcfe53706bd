"""Latency of physically extracted circuits against the unpruned model (GPT-2-small shape, full vocabulary).

Discovery on a random model says nothing about speed, so this removes seeded random
fractions of the heads and MLPs directly (mean ablation, as extraction does), checks
each cut model against the hook-ablated one, and times both side by side in one run:
the base and the cut model alternate, on the same inputs, and each gets the median of
``--repeats`` forwards. A forward is what the tasks run: the backbone over the whole
prompt and the LM head at the last position (``eigenfast.forward.last_logits``).

FLOPs are counted by ``torch.utils.flop_counter`` at batch 32: "non-emb" is the fraction
of the backbone's (non-embedding) FLOPs that the cut model no longer does, "timed" the
fraction of the timed forward's (backbone + last-position LM head, which pruning keeps).
The target: at batch 32, latency falls by at least 80% of the FLOP reduction; the last
columns give that ratio against both fractions. Matmul FLOPs shrink with the model but
the elementwise work between them (GELU, norms, residual adds) shrinks less, or not at all
where a layer keeps some heads, so the ratio sits below 1.

On a CPU shared with other jobs, wall time swings by tens of percent between runs;
``--clock cpu`` times with the process's CPU time instead (``time.process_time``,
summed over torch's threads), which such load barely moves.

Usage: python benches/bench_extract_latency.py [--seq-len 16] [--repeats 7] [--clock wall|cpu] [--threads N] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eigenfast.adapters import get_adapter  # noqa: E402
from eigenfast.circuit import ablated, component_means, remove_components  # noqa: E402
from eigenfast.circuit.report import latency_batch, time_forward  # noqa: E402
from eigenfast.data.task_data import TaskData  # noqa: E402
from eigenfast.runtime.sizes import count_parameters  # noqa: E402
from eigenfast.serving.cost import register_flop_formulas  # noqa: E402

# (fraction of heads removed, fraction of MLPs removed)
CASES = [(0.5, 0.0), (0.5, 0.5), (0.75, 0.5), (0.9, 0.75)]
BATCHES = (1, 32)


def flops(model: torch.nn.Module, batch: TaskData) -> tuple[int, int]:
    """FLOPs of the backbone alone and of the whole timed forward (with the last-position LM head)."""
    register_flop_formulas()
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hidden = adapter.backbone()(**batch.model_inputs(device), use_cache=False).last_hidden_state
    backbone = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        adapter.lm_head()(hidden[:, -1])
    return backbone, backbone + counter.get_total_flops()


def choose(n: int, fraction: float, generator: torch.Generator) -> list[int]:
    return sorted(torch.randperm(n, generator=generator)[: round(fraction * n)].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16, help="prompt length (int_sum prompts are ~6 GPT-2 tokens)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; time accelerators with --clock wall")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().to(args.device)
    adapter = get_adapter(base)
    g = torch.Generator().manual_seed(0)
    data = TaskData(torch.randint(0, config.vocab_size, (64, args.seq_len), generator=g), torch.zeros(64, dtype=torch.long))
    patch, val = data.subset(range(32)), data.subset(range(32, 64))
    means = component_means(base, patch)
    batches = {b: latency_batch(val, b) for b in BATCHES}
    base_flops = flops(base, batches[32])
    base_params = count_parameters(base).non_embedding

    print(f"GPT-2-small shape (12x12x768, vocab 50257), random weights, seq len {args.seq_len}, device {args.device}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} forwards (ms, {args.clock} clock)")
    header = (f"{'heads/MLPs removed':>18} {'params kept':>11} {'FLOPs removed: non-emb':>22} {'timed':>6} | "
              + " | ".join(f"b={b:<2} base  circuit  faster" for b in BATCHES)
              + " | latency/FLOP reduction, b=32: non-emb  timed | max |Δ| vs hooks")
    print(header)
    print("-" * len(header))
    for head_fraction, mlp_fraction in CASES:
        heads: dict[int, list[int]] = {}
        for index in choose(adapter.n_layers * adapter.n_heads, head_fraction, g):
            heads.setdefault(index // adapter.n_heads, []).append(index % adapter.n_heads)
        mlps = choose(adapter.n_layers, mlp_fraction, g)
        circuit = copy.deepcopy(base)
        remove_components(circuit, heads, mlps, means, "mean")

        check = batches[32].subset(range(4))
        with torch.no_grad(), ablated(base, [(l, h) for l, hs in heads.items() for h in hs], mlps, means) as hooked:
            reference = hooked(**check.model_inputs(args.device)).logits
        with torch.no_grad():
            error = float((circuit(**check.model_inputs(args.device)).logits - reference).abs().max())

        removed = [1 - cut / full for cut, full in zip(flops(circuit, batches[32]), base_flops)]
        cells, reductions = [], {}
        for b, batch in batches.items():
            for model in (base, circuit):  # warm-up
                time_forward(model, batch, clock)
            times = {"base": [], "circuit": []}
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                times["base"].append(time_forward(base, batch, clock))
                times["circuit"].append(time_forward(circuit, batch, clock))
            t_base, t_circuit = statistics.median(times["base"]), statistics.median(times["circuit"])
            reductions[b] = 1 - t_circuit / t_base
            cells.append(f"{t_base * 1e3:>9.2f} {t_circuit * 1e3:>8.2f} {reductions[b]:>7.1%}")
        kept = count_parameters(circuit).non_embedding / base_params
        ratios = [reductions[32] / r for r in removed]
        print(f"{f'{head_fraction:.0%} / {mlp_fraction:.0%}':>18} {kept:>11.1%} {removed[0]:>22.1%} {removed[1]:>6.1%} | "
              + " | ".join(cells)
              + f" | {ratios[0]:>38.2f} {ratios[1]:>6.2f} | {error:>16.1e}")
        del circuit


if __name__ == "__main__":
    main()
