"""Serving speed of a base model, an eigenpruned one and an extracted circuit, side by side.

Random weights of a chosen shape; the eigenpruned model freezes p=0.3 of q, k, v, o,
mlp_in and mlp_out, the circuit loses a seeded half of the heads and of the MLPs (mean
ablation). For each batch size and prompt length it times greedy decoding with a static
KV cache: time to first token (prefill) and tokens per second over the new tokens, each
the median of --repeats runs, the three models alternating so that all see the same
machine load. Modes: eager, compiled (torch.compile, fullgraph; "reduce-overhead", CUDA
graphs, on a GPU) and onnx (ONNX Runtime: the prefill and decode-step exports, the KV cache
passed between calls as arrays). The speed-ups are judged against their ideal, computed for
each cell: decode against the cut in bytes one step reads (the weights and the static KV
cache of prompt + new tokens positions; for onnx, whose cache grows, the cache halfway
through the decoding), prefill against the cut in FLOPs of a forward over the prompt
(attention included, the LM head at the last position); "efficiency" is measured cut / ideal cut (the
target is >= 0.8). On a CPU shared with other jobs, --clock cpu times with the process's
CPU time, which such load barely moves.

--engine llamacpp times llama.cpp instead (the [gguf] extra): a random Llama (--shape llama-bench,
or llama-tiny for smoke runs) and its circuit, a seeded half of the heads and of the MLPs removed
under zero ablation, both written to GGUF in each of --dtypes and timed at batch 1 with each of
--threads, the decode speed-up judged against the cut in weight bytes a step reads.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import get_adapter
from ..circuit import component_means, remove_components
from ..data.task_data import TaskData
from ..eigenprune.prune import prune
from ..errors import ArgumentError
from ..runtime import distributed, figures
from ..runtime.progress import progress
from ..serving.cost import decode_step_bytes, forward_flops
from ..serving.decode import decode, onnx_decode
from . import bench_llamacpp
from .arguments import comma_list, positive_int

SHAPES = {  # name -> (family, config overrides); "tiny" is for smoke runs
    "tiny": ("gpt2", {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 512, "n_positions": 256}),
    "small": ("gpt2", {"n_layer": 6, "n_head": 6, "n_embd": 384, "vocab_size": 8192, "n_positions": 1024}),
    "gpt2-small": ("gpt2", {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}),
    "llama-small": ("llama", {"num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
                              "hidden_size": 512, "intermediate_size": 1376, "vocab_size": 8192,
                              "max_position_embeddings": 1024}),
}
MODES = ("eager", "compiled", "onnx")
ENGINES = ("torch", "llamacpp")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
KINDS = ("base", "eigenpruned", "extracted")


@dataclass
class Row:
    kind: str
    mode: str
    batch: int
    prompt: int
    ttft_ms: float
    tokens_per_s: float
    byte_cut: float | None = None  # the ideal decode cut: 1 - bytes per step / the base's
    flop_cut: float | None = None  # the ideal prefill cut: 1 - prefill FLOPs / the base's
    decode_speedup: float | None = None
    decode_efficiency: float | None = None
    prefill_speedup: float | None = None
    prefill_efficiency: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="torch", help="what runs the models")
    parser.add_argument("--shape", choices=(*SHAPES, *bench_llamacpp.SHAPES), default=None,
                        help="model shape (random weights); default: small for torch, llama-bench for llamacpp")
    parser.add_argument("--batches", type=comma_list(positive_int), default="1,32", help="batch sizes")
    parser.add_argument("--prompts", type=comma_list(positive_int), default="16,512", help="prompt lengths")
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per run")
    parser.add_argument("--modes", type=comma_list(str), default=",".join(MODES),
                        help=f"comma-separated, from {MODES}")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per cell (the median is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (CPU only: steadier on a shared machine)")
    parser.add_argument("--threads", type=comma_list(positive_int), default="1,2", help="llamacpp: CPU threads")
    parser.add_argument("--dtypes", type=comma_list(str), default="f32,q8_0", help="llamacpp: GGUF storage types")
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md), rows (.json) and a PNG here")


def build_models(shape: str, device: str) -> dict[str, nn.Module]:
    family, overrides = SHAPES[shape]
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **overrides)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().to(device)
    g = torch.Generator().manual_seed(0)
    data = TaskData(torch.randint(0, config.vocab_size, (16, 16), generator=g), torch.zeros(16, dtype=torch.long))
    pruned = prune(base, data, p=0.3, components=("q", "k", "v", "o", "mlp_in", "mlp_out"), progress=False).model
    adapter = get_adapter(base)
    heads = torch.randperm(adapter.n_layers * adapter.n_heads, generator=g)[: adapter.n_layers * adapter.n_heads // 2]
    removed: dict[int, list[int]] = {}
    for index in heads.tolist():
        removed.setdefault(index // adapter.n_heads, []).append(index % adapter.n_heads)
    mlps = sorted(torch.randperm(adapter.n_layers, generator=g)[: adapter.n_layers // 2].tolist())
    extracted = copy.deepcopy(base)
    remove_components(extracted, removed, mlps, component_means(base, data))
    return {"base": base, "eigenpruned": pruned, "extracted": extracted}


def _forwards(models: dict[str, nn.Module], mode: str, device: str) -> dict[str, Callable]:
    if mode == "eager":
        return dict(models)
    if mode == "compiled":
        torch._dynamo.reset()
        kind = "reduce-overhead" if device == "cuda" else "default"
        return {name: torch.compile(m, fullgraph=True, mode=kind) for name, m in models.items()}
    import onnxruntime

    from ..serving.export import decoder_to_onnx

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch's modes get
    folder = Path(tempfile.mkdtemp(prefix="eigenfast-bench-"))
    # The ONNX forward is a (prefill, decode step) pair of sessions; the mode's decode loop is onnx_decode.
    return {name: [onnxruntime.InferenceSession(str(path), options, providers=providers)
                   for path in decoder_to_onnx(model, folder / name)] for name, model in models.items()}


def measure(
    models: dict[str, nn.Module], modes, batches, prompts, new_tokens: int, repeats: int, device: str,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Row]:
    vocab = int(models["base"].config.vocab_size)
    cells = [(mode, b, t) for mode in modes for b in batches for t in prompts]
    rows: list[Row] = []
    forwards: dict[str, Callable] = {}
    current = None
    # The three models share one forward code object, and dynamo's recompile limit counts per code object:
    # each model's prefill and decode step at each shape is an entry of its own.
    with torch._dynamo.config.patch(recompile_limit=64):
        for mode, batch, prompt in progress(cells, len(cells), "serving benchmark"):
            if mode != current:
                forwards, current = _forwards(models, mode, device), mode
            samples: dict[str, list[tuple[float, float | None]]] = {k: [] for k in KINDS}
            for run in range(repeats + 1):  # the first run warms up (and compiles)
                for kind in KINDS:
                    prompt_ids = torch.randint(0, vocab, (batch, prompt), device=device)
                    if mode == "onnx":
                        out = onnx_decode(*forwards[kind], prompt_ids, new_tokens, clock=clock)
                    else:
                        out = decode(forwards[kind], models[kind].config, prompt_ids, new_tokens, clock=clock)
                    if run:
                        samples[kind].append((out.prefill_s, out.tokens_per_s()))
            for kind in KINDS:
                ttft = statistics.median(s[0] for s in samples[kind])
                tps = statistics.median(s[1] for s in samples[kind])
                rows.append(Row(kind, mode, batch, prompt, ttft * 1e3, tps))
    _add_ratios(rows, models, new_tokens)
    return rows


def _add_ratios(rows: list[Row], models: dict[str, nn.Module], new_tokens: int) -> None:
    # FLOPs grow linearly with the batch, so their cut is counted at batch 1 (the attention's share grows
    # with the prompt, so the cut is counted per prompt); the KV cache's share of the bytes grows with both.
    # Every mode's prefill computes the last position's logits only.
    flops = {(k, t): forward_flops(m, 1, t, all_logits=False) for k, m in models.items() for t in {r.prompt for r in rows}}
    base = {(r.mode, r.batch, r.prompt): r for r in rows if r.kind == "base"}
    for r in rows:
        b = base[(r.mode, r.batch, r.prompt)]
        r.flop_cut = 1 - flops[(r.kind, r.prompt)] / flops[("base", r.prompt)]
        r.prefill_speedup = b.ttft_ms / r.ttft_ms
        r.prefill_efficiency = (1 - r.ttft_ms / b.ttft_ms) / r.flop_cut if r.flop_cut > 0 else None
        # A static cache is read in full at every step; ONNX's grows from the prompt to prompt + new tokens.
        cached = r.prompt + (new_tokens // 2 if r.mode == "onnx" else new_tokens)
        step_bytes = {k: decode_step_bytes(models[k], r.batch, cached) for k in (r.kind, "base")}
        r.byte_cut = 1 - step_bytes[r.kind] / step_bytes["base"]
        r.decode_speedup = r.tokens_per_s / b.tokens_per_s
        r.decode_efficiency = (1 - b.tokens_per_s / r.tokens_per_s) / r.byte_cut if r.byte_cut > 0 else None


def markdown(rows: list[Row]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = ["| model | mode | batch | prompt | TTFT ms | tokens/s | bytes cut | decode × | decode eff. | FLOP cut | "
             "prefill × | prefill eff. |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kind} | {r.mode} | {r.batch} | {r.prompt} | {r.ttft_ms:.1f} | {r.tokens_per_s:.1f} | "
                     f"{f(r.byte_cut, '.3f')} | {f(r.decode_speedup, '.2f')} | {f(r.decode_efficiency, '.2f')} | "
                     f"{f(r.flop_cut, '.3f')} | {f(r.prefill_speedup, '.2f')} | {f(r.prefill_efficiency, '.2f')} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    plt = figures.pyplot()

    labels = sorted({(r.mode, r.batch, r.prompt) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4))
    width = 0.8 / len(KINDS)
    for i, kind in enumerate(KINDS):
        values = [next(r.tokens_per_s for r in rows if (r.mode, r.batch, r.prompt) == key and r.kind == kind) for key in labels]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=kind)
    ax.set_xticks([x + width for x in range(len(labels))], [f"{m}\nb={b} T={t}" for m, b, t in labels], fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend()
    figures.save(fig, path, dpi=120)


def run_llamacpp(args: argparse.Namespace) -> int:
    from ..serving.llamacpp.engine import require
    from ..serving.llamacpp.writer import DTYPES

    require("gguf"), require("llama_cpp")
    shape = args.shape or "llama-bench"
    if shape not in bench_llamacpp.SHAPES:
        raise ArgumentError(f"--engine llamacpp runs the Llama shapes {tuple(bench_llamacpp.SHAPES)}, not {shape!r}")
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        raise ArgumentError(f"unknown GGUF dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    rows = bench_llamacpp.measure(bench_llamacpp.build_models(shape), args.dtypes, args.threads, args.prompts,
                                  args.new_tokens, args.repeats)
    table = bench_llamacpp.markdown(rows)
    summary = f"llama.cpp (llama-cpp-python), CPU, wall clock; shape {shape}, batch 1, {args.new_tokens} new tokens, medians of {args.repeats}"
    print(f"{summary}\n{table}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"{summary}.\n\n{table}\n")
        args.out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.engine == "llamacpp":
        return run_llamacpp(args)
    args.shape = args.shape or "small"
    if args.shape not in SHAPES:
        raise ArgumentError(f"--shape {args.shape} is for --engine llamacpp; the torch engine runs {tuple(SHAPES)}")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ArgumentError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda but no CUDA device is available; use --device cpu")
    if args.clock == "cpu" and args.device != "cpu":
        raise ArgumentError("--clock cpu measures CPU work: time an accelerator with --clock wall")
    models = build_models(args.shape, args.device)
    rows = measure(models, args.modes, args.batches, args.prompts, args.new_tokens, args.repeats, args.device,
                   CLOCKS[args.clock])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    device += f", {args.clock} clock"
    table = markdown(rows)
    print(f"shape {args.shape}, {device}, {args.new_tokens} new tokens, medians of {args.repeats}\n{table}")
    if args.out is not None:
        distributed.on_main(lambda: write(args.out, rows, f"Device: {device}; shape {args.shape}.\n\n{table}\n"))
    return 0


def write(out: Path, rows: list[Row], summary: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(summary)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, out.with_suffix(".png"))
