"""``eigenfast bench --engine llamacpp``: a base Llama and its extracted circuit, both written to GGUF, timed
in llama.cpp side by side (batch 1; per thread count and storage type), the decode speed-up judged
against the cut in weight bytes a decode step reads."""
from __future__ import annotations

import copy
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import get_adapter
from ..circuit import remove_components
from ..runtime.progress import progress
from ..serving.llamacpp import engine
from ..serving.llamacpp.speed import Timing, decode_weight_bytes, time_engine
from ..serving.llamacpp.writer import to_gguf

KINDS = ("base", "extracted")
# Tiny models are dominated by per-call overhead; "llama-bench" is large enough for the weights to dominate.
SHAPES = {
    "llama-tiny": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
                   "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 256},
    "llama-bench": {"num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 1024,
                    "intermediate_size": 2816, "vocab_size": 8192, "max_position_embeddings": 1024},
}


@dataclass
class EngineRow:
    kind: str
    dtype: str
    threads: int
    prompt: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    byte_cut: float | None = None
    decode_speedup: float | None = None
    decode_efficiency: float | None = None
    prefill_speedup: float | None = None


def build_models(shape: str) -> dict[str, nn.Module]:
    """Random weights; the circuit loses a seeded half of the heads and of the MLPs (zero ablation: GGUF holds
    constants, not mean tables)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPES[shape])).eval()
    adapter = get_adapter(base)
    g = torch.Generator().manual_seed(0)
    total = adapter.n_layers * adapter.n_heads
    removed: dict[int, list[int]] = {}
    for index in torch.randperm(total, generator=g)[: total // 2].tolist():
        removed.setdefault(index // adapter.n_heads, []).append(index % adapter.n_heads)
    mlps = sorted(torch.randperm(adapter.n_layers, generator=g)[: adapter.n_layers // 2].tolist())
    extracted = copy.deepcopy(base)
    remove_components(extracted, removed, mlps, None, ablation="zero")
    return {"base": base, "extracted": extracted}


def measure(models: dict[str, nn.Module], dtypes: Sequence[str], threads: Sequence[int], prompts: Sequence[int],
            new_tokens: int, repeats: int) -> list[EngineRow]:
    vocab = int(models["base"].config.vocab_size)
    folder = Path(tempfile.mkdtemp(prefix="eigenfast-bench-gguf-"))
    rows: list[EngineRow] = []
    cells = [(d, n, t) for d in dtypes for n in threads for t in prompts]
    files = {(kind, d): to_gguf(models[kind], folder / f"{kind}-{d}.gguf", dtype=d) for d in dtypes for kind in KINDS}
    for dtype, n_threads, prompt in progress(cells, len(cells), "llama.cpp benchmark"):
        engines = {kind: engine.load(files[(kind, dtype)], threads=n_threads, context=prompt + new_tokens + 1,
                                     all_logits=False) for kind in KINDS}
        samples: dict[str, list[Timing]] = {kind: [] for kind in KINDS}
        for run in range(repeats + 1):  # the first run warms up; the two models alternate so both see the same load
            for kind in KINDS:
                ids = torch.randint(0, vocab, (prompt,)).tolist()
                timing = time_engine(engines[kind], ids, new_tokens)
                if run:
                    samples[kind].append(timing)
        for kind in KINDS:
            rows.append(EngineRow(kind, dtype, n_threads, prompt,
                                  statistics.median(s.prefill_tokens_per_s for s in samples[kind]),
                                  statistics.median(s.decode_tokens_per_s for s in samples[kind])))
    weight_bytes = {key: decode_weight_bytes(path) for key, path in files.items()}
    base = {(r.dtype, r.threads, r.prompt): r for r in rows if r.kind == "base"}
    for r in rows:
        b = base[(r.dtype, r.threads, r.prompt)]
        r.byte_cut = 1 - weight_bytes[(r.kind, r.dtype)] / weight_bytes[("base", r.dtype)]
        r.decode_speedup = r.decode_tokens_per_s / b.decode_tokens_per_s
        r.prefill_speedup = r.prefill_tokens_per_s / b.prefill_tokens_per_s
        r.decode_efficiency = (1 - b.decode_tokens_per_s / r.decode_tokens_per_s) / r.byte_cut if r.byte_cut > 0 else None
    return rows


def markdown(rows: list[EngineRow]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = ["| model | dtype | threads | prompt | prefill tok/s | decode tok/s | weight bytes cut | decode × | "
             "decode eff. | prefill × |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kind} | {r.dtype} | {r.threads} | {r.prompt} | {r.prefill_tokens_per_s:.1f} | "
                     f"{r.decode_tokens_per_s:.1f} | {f(r.byte_cut, '.3f')} | {f(r.decode_speedup, '.2f')} | "
                     f"{f(r.decode_efficiency, '.2f')} | {f(r.prefill_speedup, '.2f')} |")
    return "\n".join(lines)
