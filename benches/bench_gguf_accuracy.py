"""How close llama.cpp runs eigenfast's GGUF files to eager, and what each file weighs.

For the GGUF test models (tests/gguf_cases.py: random-init Llama, Mistral, Qwen2 written as ``deci``;
GPT-2, NeoX parallel and sequential, Phi written zero-filled in llama.cpp's own graphs), whole and
extracted: the largest |llama.cpp - eager| logit over a 12-token prompt and the positions with the same
argmax, in f32 (f32 KV cache), f16 and q8_0 (llama.cpp's default f16 cache), and the bytes a decode step
reads (every tensor but the token embedding). Then the built-in int_sum_gpt2 extracted on its task (zero
ablation, MLPs included): greedy agreement with eager over int_sum prompts, against the model itself
(exact GELU) and against eager with llama.cpp's GELU (tests/dense_reference.py), and the file sizes.

Usage: python benches/bench_gguf_accuracy.py [--every 20]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

import eigenfast  # noqa: E402
from eigenfast.builtin import load_builtin  # noqa: E402
from eigenfast.data.task_data import TaskData, int_sum, int_sum_pairs  # noqa: E402
from eigenfast.serving import to_gguf  # noqa: E402
from eigenfast.serving.llamacpp import engine  # noqa: E402
from eigenfast.serving.llamacpp.speed import decode_weight_bytes  # noqa: E402

from dense_reference import with_ggml_gelu  # noqa: E402
from gguf_cases import CONFIGS, DENSE_CONFIGS, base_model, extracted, prompt  # noqa: E402


def _eager(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _greedy(model: torch.nn.Module, ids: list[int], new: int, pad: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=pad)[0, len(ids):].tolist()


def test_models(folder: Path) -> None:
    print("| model | f32 | f16 | q8_0 | decode bytes |")
    print("|---|---|---|---|---|")
    for family in [*sorted(CONFIGS), *sorted(DENSE_CONFIGS)]:
        for kind in ("whole", "extracted"):
            model = base_model(family) if kind == "whole" else extracted(family)
            ids = prompt(12)
            eager = _eager(model, ids)
            cells = []
            for dtype in ("f32", "f16", "q8_0"):
                path = to_gguf(model, folder / f"{family}-{kind}-{dtype}.gguf", dtype=dtype)
                got = engine.logits(engine.load(path, cache="f32" if dtype == "f32" else "f16"), ids)
                same = int((got.argmax(-1) == eager.argmax(-1)).sum())
                cells.append(f"{np.abs(got - eager).max():.1e}, {same}/{len(ids)}")
            size = decode_weight_bytes(folder / f"{family}-{kind}-f32.gguf")
            print(f"| {family}, {kind} | {' | '.join(cells)} | {size} |", flush=True)


def builtin_gpt2(folder: Path, every: int) -> None:
    model, tokenizer = load_builtin("int_sum_gpt2")
    data = int_sum(tokenizer)
    val = TaskData(data.input_ids[::50], data.labels[::50], None if data.attention_mask is None else data.attention_mask[::50])
    circuit = eigenfast.extract_circuit(model, None, val, threshold=0.01, ablation="zero", include_mlps=True,
                                        progress=False, latency_repeats=0)
    print(f"int_sum_gpt2 circuit: {len(circuit.heads)} heads, removed MLPs {sorted(set(range(4)) - set(circuit.mlps))}")
    prompts, _ = int_sum_pairs()
    for name, changed in (("whole", model), ("circuit", circuit.model)):
        path = to_gguf(changed, folder / f"int_sum_gpt2-{name}.gguf", tokenizer=tokenizer)
        llm = engine.load(path, cache="f32")
        as_llama_cpp = with_ggml_gelu(changed)
        exact = ggml = 0
        worst_exact = worst_ggml = 0.0
        texts = prompts[::every]
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            tokens = engine.greedy(llm, ids, 3)
            exact += tokens == _greedy(changed, ids, 3, tokenizer.pad_token_id)
            ggml += tokens == _greedy(as_llama_cpp, ids, 3, tokenizer.pad_token_id)
            logits = engine.logits(llm, ids)
            worst_exact = max(worst_exact, float(np.abs(logits - _eager(changed, ids)).max()))
            worst_ggml = max(worst_ggml, float(np.abs(logits - _eager(as_llama_cpp, ids)).max()))
        print(f"{name}: greedy 3 tokens equal on {exact}/{len(texts)} prompts (exact GELU, max logit diff "
              f"{worst_exact:.1e}), {ggml}/{len(texts)} (llama.cpp's GELU, {worst_ggml:.1e}); "
              f"file {path.stat().st_size} bytes, decode reads {decode_weight_bytes(path)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=20, help="every n-th int_sum prompt (10000 in all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        test_models(Path(folder))
        builtin_gpt2(Path(folder), args.every)


if __name__ == "__main__":
    main()
