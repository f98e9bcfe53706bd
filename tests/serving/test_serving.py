"""Pruned and extracted models served as their base is: no hooks, static KV cache, torch.compile without
graph breaks or per-step recompilation, torch.export with dynamic shapes, AOTInductor, ONNX Runtime."""
from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import eigenfast
from eigenfast.adapters.calls import cache_keyword
from eigenfast.serving.decode import decode
from eigenfast.serving.export import LogitsOnly, aoti_package, export, to_onnx

from conftest import assert_static_cache_equals_dynamic, make_data, make_model
from hook_references import removed

KINDS = ("pruned", "extracted")


def changed(family: str, kind: str) -> torch.nn.Module:
    """An eigenpruned model, or an extracted one with uneven kept heads (uneven GQA groups on Llama),
    one attention and one MLP gone."""
    model = make_model(family)
    if kind == "pruned":
        return eigenfast.prune(model, make_data(padded=True), p=0.3, components=("k", "o", "mlp_in"), progress=False).model
    return removed(model, make_data(n=8, seed=1, padded=True), heads={0: [0, 2], 1: [0, 1, 2, 3]}, mlps=(1,))


def both(family: str) -> torch.nn.Module:
    """Pruned, then extracted: both kinds of eigenfast module in one model."""
    model = eigenfast.prune(make_model(family), make_data(padded=True), p=0.3, components=("k", "o", "mlp_in"),
                            progress=False).model
    return removed(model, make_data(n=8, seed=1, padded=True), heads={0: [0, 2]}, mlps=(1,))


def inputs(n: int = 3, length: int = 6, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    data = make_data(n=n, length=length, seed=seed, padded=True)
    return data.input_ids, data.position_ids


def eager_logits(model, ids, positions) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits


@pytest.mark.parametrize("kind", KINDS)
def test_forward_runs_no_python_hooks(family, kind):
    model = changed(family, kind)
    hooked = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    assert not torch.nn.modules.module._global_forward_pre_hooks and not torch.nn.modules.module._global_forward_hooks


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_generate_equals_dynamic_cache(family, kind):
    assert_static_cache_equals_dynamic(changed(family, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_static_cache_decode_has_no_graph_break_nor_recompilation(family, kind):
    model = changed(family, kind).eval()
    prompt = make_data(n=2, length=5, seed=5).input_ids
    with torch.no_grad():
        reference = decode(model, model.config, prompt, 4, keep_logits=True).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
        # After the prefill and the first decode step are compiled, any further compilation fails the test.
        recompiles = torch._dynamo.config.patch(error_on_recompile=True)
        got = decode(compiled, model.config, prompt, 4, keep_logits=True, after_first_step=recompiles.__enter__).logits
        recompiles.__exit__(None, None, None)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


def test_export_with_dynamic_batch_and_length_and_eager_use_afterwards(family):
    model = both(family)
    program = export(model, max_length=16)
    for n, length in ((1, 3), (5, 7)):
        ids, positions = inputs(n, length, seed=n)
        torch.testing.assert_close(program.module()(ids, positions), eager_logits(model, ids, positions), rtol=0, atol=1e-5)
    ids, positions = inputs()
    # Exporting used to leave a traced tensor in the model's position state, which broke the next eager call.
    torch.testing.assert_close(eager_logits(model, ids, positions), LogitsOnly(model)(ids, positions))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_onnx_runtime_matches_eager(family, tmp_path):
    import onnxruntime as ort  # a test dependency: a missing install must fail here, not skip
    model = both(family)
    path = to_onnx(model, tmp_path / "model.onnx", max_length=16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for n, length in ((1, 4), (4, 9)):
        ids, positions = inputs(n, length, seed=n)
        (out,) = session.run(None, {names[0]: ids.numpy(), names[1]: positions.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), eager_logits(model, ids, positions), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process(tmp_path):
    """Compiles C++ with Inductor (a minute or more on a CPU). Unpadded positions: with left-padded ones
    (a position repeated) the AOTInductor package of even the unchanged HF model disagrees with eager
    (seen with torch 2.13 and transformers 5.23; docs/SERVING.md)."""
    model = both("llama")
    ids = inputs(4, 9)[0]
    positions = torch.arange(9).repeat(4, 1)
    save_file({"ids": ids, "positions": positions, "expected": eager_logits(model, ids, positions)}, tmp_path / "io.safetensors")
    package = aoti_package(model, tmp_path / "model.pt2", max_length=16)
    script = (
        "import sys, torch, eigenfast.ops\n"  # registers the op the package calls (docs/SERVING.md)
        "from safetensors.torch import load_file\n"
        "io = load_file(sys.argv[2])\n"
        "runner = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "torch.testing.assert_close(runner(io['ids'], io['positions']), io['expected'], rtol=0, atol=1e-4)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(package), str(tmp_path / "io.safetensors")], check=True, timeout=600)


def test_decode_loop_equals_generate(family):
    model = changed(family, "extracted")
    prompt = make_data(n=2, length=5, seed=5).input_ids
    out = decode(model, model.config, prompt, 6)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.tokens, generated[:, prompt.shape[1]:])


def test_bench_command_writes_its_table(tmp_path):
    from eigenfast.cli import main

    out = tmp_path / "serving"
    assert main(["bench", "--shape", "tiny", "--batches", "1,2", "--prompts", "4", "--new-tokens", "3",
                 "--modes", "eager", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["kind"], r["batch"]) for r in rows] == [(k, b) for b in (1, 2) for k in ("base", "eigenpruned", "extracted")]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] > 0
        if r["kind"] == "base":
            assert r["decode_speedup"] == 1.0 and r["prefill_speedup"] == 1.0
    assert "| extracted | eager | 2 | 4 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


class _CountOps(TorchDispatchMode):
    """Counts the ops a forward dispatches, views aside (they launch no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(model) -> collections.Counter:
    prompt = make_data(n=2, length=5, seed=5).input_ids
    decode(model, model.config, prompt, 2)  # warm: lazily initialised cache layers
    with _CountOps() as counter:
        decode(model, model.config, prompt, 3)
    return counter.ops


@pytest.mark.parametrize("kind", KINDS)
def test_decode_adds_no_op_and_no_host_sync_over_the_base(family, kind):
    """A CPU proxy for kernel launches and syncs on a GPU: per decode, a changed model dispatches no more
    (non-view) ops than its base, and no more that read a value on the host (transformers' own mask code
    may read some; eigenfast's modules add none)."""
    base_ops, ops = decode_step_ops(make_model(family)), decode_step_ops(changed(family, kind))
    for sync in ("item", "_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"):
        assert ops[sync] <= base_ops[sync], (sync, ops[sync], base_ops[sync])
    assert sum(ops.values()) <= sum(base_ops.values()), (ops - base_ops, base_ops - ops)


def test_a_pruned_projection_keeps_its_base_weight_layout(family):
    """GPT-2's Conv1D stores A, nn.Linear A^T: a pruned projection stores its weight as the module it
    replaced did, so it runs the base's GEMM (a GEMV over the other layout is slower on the CPU), and
    computes x A' + table[pos] either way."""
    from eigenfast.adapters import projection_matrix
    from eigenfast.rewrite.position_tables import TokenBiasLinear

    base = make_model(family)
    model = changed(family, "pruned")
    pruned = {name: m for name, m in model.named_modules() if isinstance(m, TokenBiasLinear)}
    assert pruned
    for name, module in pruned.items():
        before = base.get_submodule(name)
        assert module.weight.shape == before.weight.shape and module.weight.is_contiguous(), name
        assert module.linear_layout == isinstance(before, torch.nn.Linear), name
        x = torch.randn(2, 5, module.in_features)
        positions = torch.tensor([[0, 1, 2, 40, 41]])  # past the calibration length: the extrapolation row
        expected = x @ projection_matrix(module) + module.table[positions.clamp(max=module.calib_len)]
        with torch.no_grad():
            torch.testing.assert_close(module(x, positions), expected, rtol=1e-5, atol=1e-5)


def test_a_saved_token_bias_linear_without_a_layout_has_nn_linear_layout():
    """Saves written before the layout was kept name none: they stored nn.Linear's (d_out, d_in)."""
    from eigenfast.rewrite.position_tables import TokenBiasLinear

    old = TokenBiasLinear.from_spec({"d_in": 3, "d_out": 5, "calib_len": 4, "extrapolate": "mean"})
    assert old.linear_layout and old.weight.shape == (5, 3)
    conv = TokenBiasLinear.from_spec(TokenBiasLinear(3, 5, 4, linear_layout=False).spec())
    assert not conv.linear_layout and conv.weight.shape == (3, 5) and (conv.in_features, conv.out_features) == (3, 5)


@pytest.mark.parametrize("kind", ["base", "extracted"])
def test_kv_cache_bytes_are_what_a_static_cache_holds(family, kind):
    """Counted per layer off the projections: a shrunk layer's KV heads (a duplicated one per copy, uneven
    GQA groups on Llama), nothing for a removed attention (its one-wide placeholder is not read)."""
    from transformers import StaticCache

    from eigenfast.rewrite.stand_ins import RemovedAttention
    from eigenfast.serving.cost import decode_step_bytes, kv_cache_bytes, weight_bytes

    from hook_references import HEADS

    model = make_model(family)
    if kind == "extracted":
        model = removed(model, make_data(n=8, seed=1), heads=HEADS, mlps=(1,))
    batch, length = 3, 11
    cache = StaticCache(config=model.config, max_cache_len=length)
    ids = make_data(n=batch, length=4, seed=3).input_ids
    with torch.no_grad():
        model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True)
    adapter = eigenfast.adapters.get_adapter(model)
    held = sum(
        t.numel() * t.element_size()
        for index, layer in enumerate(cache.layers)
        if not isinstance(adapter.attention(index), RemovedAttention)
        for t in (layer.keys, layer.values)
    )
    assert kv_cache_bytes(model, batch, length) == held > 0
    assert decode_step_bytes(model, batch, length) == weight_bytes(model) + held


def test_attention_flops_are_counted_on_the_cpu():
    from torch.utils.flop_counter import FlopCounterMode

    from eigenfast.serving.cost import register_flop_formulas

    register_flop_formulas()
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 7 * 8)  # Q K^T, then the weights times V


def test_forward_flops_count_the_lm_head_where_it_runs():
    from eigenfast.serving.cost import forward_flops

    model = make_model("llama")
    length, cfg = 6, model.config
    every, last = forward_flops(model, 2, length), forward_flops(model, 2, length, all_logits=False)
    assert every - last == 2 * 2 * (length - 1) * cfg.hidden_size * cfg.vocab_size


def test_bench_judges_decode_by_the_bytes_a_step_reads(tmp_path):
    from eigenfast.cli import main
    from eigenfast.commands.bench import build_models
    from eigenfast.serving.cost import decode_step_bytes

    out = tmp_path / "serving"
    assert main(["bench", "--shape", "tiny", "--batches", "4", "--prompts", "6", "--new-tokens", "3",
                 "--modes", "eager", "--repeats", "1", "--clock", "cpu", "--out", str(out)]) == 0
    rows = {r["kind"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    models = build_models("tiny", "cpu")
    step = {k: decode_step_bytes(models[k], 4, 6 + 3) for k in ("base", "extracted")}
    assert rows["extracted"]["byte_cut"] == pytest.approx(1 - step["extracted"] / step["base"])
    assert rows["eigenpruned"]["byte_cut"] == 0  # eigenpruning keeps every matrix's size
    assert "cpu clock" in out.with_suffix(".md").read_text()


def test_onnx_runtime_runs_an_extracted_gpt2_in_conv1d_layout(tmp_path, capfd):
    """Extraction keeps GPT-2's Conv1D layout (the token-bias op gets a transposed view): ONNX still agrees.
    The export prints none of torch's known-harmless warnings (torchvision ops skipped, LeafSpec deprecation)."""
    import onnxruntime as ort

    model = changed("gpt2", "extracted")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = to_onnx(model, tmp_path / "model.onnx", max_length=16)
    printed = capfd.readouterr()
    for text in ("torchvision", "LeafSpec", "[torch.onnx]"):
        assert text not in printed.err + printed.out, printed
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ids, positions = inputs(4, 9)
    (out,) = session.run(None, {names[0]: ids.numpy(), names[1]: positions.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), eager_logits(model, ids, positions), rtol=0, atol=1e-4)


def _onnx_decoder_sessions(model, folder):
    import onnxruntime as ort  # a test dependency: a missing install must fail here, not skip

    from eigenfast.serving.export import decoder_to_onnx

    return [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for p in decoder_to_onnx(model, folder, max_length=16)]


def _assert_onnx_decode_equals_eager(model, sessions) -> None:
    from eigenfast.serving.decode import onnx_decode

    for n, length in ((2, 5), (1, 1), (3, 7)):  # a one-token prompt: the prefill's smallest length
        prompt = make_data(n=n, length=length, seed=n).input_ids
        eager = decode(model, model.config, prompt, 6, keep_logits=True)
        got = onnx_decode(*sessions, prompt, 6, keep_logits=True)
        assert torch.equal(got.tokens, eager.tokens), (n, length)
        torch.testing.assert_close(got.logits, eager.logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ("base",) + KINDS)
def test_onnx_runtime_decodes_with_a_kv_cache_as_eager_does(family, kind, tmp_path):
    """Greedy tokens and every step's logits of ONNX Runtime's prefill + decode step (past in, present out)
    against the eager static-cache decode; the extracted models keep fewer KV heads in one layer and no
    attention in the other (which then has no cache input)."""
    from eigenfast.serving.export import cached_layers

    model = make_model(family) if kind == "base" else changed(family, kind)
    sessions = _onnx_decoder_sessions(model, tmp_path)
    past = [i for i in sessions[1].get_inputs() if i.name.startswith("past_")]
    assert len(past) == 2 * len(cached_layers(model)) == (2 if kind == "extracted" else 4)
    _assert_onnx_decode_equals_eager(model, sessions)


@pytest.mark.parametrize("family", ["neox", "phi"])
def test_onnx_runtime_decodes_pruned_and_extracted_neox_and_phi(family, tmp_path):
    model = both(family)
    _assert_onnx_decode_equals_eager(model, _onnx_decoder_sessions(model, tmp_path))


def test_a_model_without_attention_has_no_decoder_to_export():
    from eigenfast.errors import UnsupportedModelError
    from eigenfast.serving.export import DecodeStep

    model = removed(make_model("gpt2"), make_data(n=8, seed=1), heads={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, mlps=())
    with pytest.raises(UnsupportedModelError, match="no attention layer"):
        DecodeStep(model)


def test_bench_onnx_mode_decodes_with_the_kv_cache(tmp_path):
    from eigenfast.cli import main

    out = tmp_path / "serving"
    assert main(["bench", "--shape", "tiny", "--batches", "2", "--prompts", "4", "--new-tokens", "3",
                 "--modes", "onnx", "--repeats", "1", "--clock", "cpu", "--out", str(out)]) == 0
    rows = {r["kind"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert {r["mode"] for r in rows.values()} == {"onnx"}
    for r in rows.values():
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 and r["decode_speedup"] > 0
    assert rows["base"]["decode_speedup"] == 1.0
    assert rows["extracted"]["byte_cut"] > 0


def test_only_the_known_export_messages_are_silenced(caplog):
    from eigenfast.serving.export import _ONNX_REGISTRY_LOGGER, _known_warnings_off

    registry = logging.getLogger(_ONNX_REGISTRY_LOGGER)
    with caplog.at_level(logging.WARNING, logger=_ONNX_REGISTRY_LOGGER), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _known_warnings_off():
            registry.warning("torchvision is not installed. Skipping torchvision::nms")
            registry.warning("a real problem")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("another deprecation", FutureWarning)
        registry.warning("torchvision is not installed. Skipping torchvision::nms")  # outside: shown again
    assert [r.getMessage() for r in caplog.records] == [
        "a real problem", "torchvision is not installed. Skipping torchvision::nms"]
    assert [str(w.message) for w in caught] == ["another deprecation"]
