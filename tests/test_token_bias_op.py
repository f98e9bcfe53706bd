"""eigenfast::token_bias_linear / token_bias_add against plain PyTorch (docs/MATH.md §5).

The tests use whichever kernels `import eigenfast.ops` picked (the compiled extension
when built); the fallback is exercised in a subprocess with the extension disabled.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import eigenfast
import eigenfast.ops as ops
from eigenfast.ops import token_bias_add, token_bias_linear

ROOT = Path(__file__).resolve().parents[1]


def reference_linear(x, weight, table, pos):
    return x @ weight.T + table[pos]


def reference_add(y, table, pos):
    return y + table[pos]


def make_inputs(lead, d_in=13, d_out=7, table_rows=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g).to(dtype)
    weight = torch.randn(d_out, d_in, generator=g).to(dtype)
    table = torch.randn(table_rows, d_out, generator=g).to(dtype)
    pos = torch.randint(0, table_rows, lead, generator=g)
    return x, weight, table, pos


def left_padded_positions(lengths, width):
    """True positions under left padding, as HF computes them: cumsum(mask) - 1."""
    mask = torch.arange(width).unsqueeze(0) >= (width - torch.tensor(lengths)).unsqueeze(1)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


LEADS = [(), (1,), (5,), (3, 4), (2, 3, 5), (0,), (2, 0)]


@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_linear_matches_reference(lead):
    x, weight, table, pos = make_inputs(lead)
    out = token_bias_linear(x, weight, table, pos)
    assert out.shape == (*lead, weight.shape[0])
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference_linear(x, weight, table, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_add_matches_reference(lead):
    y, _, table, pos = make_inputs(lead, d_in=7)
    out = token_bias_add(y, table, pos)
    assert out.shape == y.shape
    torch.testing.assert_close(out, reference_add(y, table, pos), atol=0, rtol=0)
    assert out.data_ptr() != y.data_ptr() or y.numel() == 0  # out of place


@pytest.mark.parametrize("d_in,d_out", [(1, 1), (3, 17), (64, 33), (768, 96)])
def test_odd_widths(d_in, d_out):
    x, weight, table, pos = make_inputs((3, 9), d_in=d_in, d_out=d_out, table_rows=9)
    torch.testing.assert_close(token_bias_linear(x, weight, table, pos),
                               reference_linear(x, weight, table, pos), atol=1e-5, rtol=1e-5)


def test_left_padding_positions():
    lengths, width = [5, 2, 4], 5
    pos = left_padded_positions(lengths, width)
    assert pos.tolist()[1] == [0, 0, 0, 0, 1]
    x, weight, table, _ = make_inputs((3, width), table_rows=width)
    torch.testing.assert_close(token_bias_linear(x, weight, table, pos),
                               reference_linear(x, weight, table, pos), atol=1e-5, rtol=1e-5)
    y = torch.randn(3, width, weight.shape[0])
    torch.testing.assert_close(token_bias_add(y, table, pos), reference_add(y, table, pos))


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_kv_cache_positions(new_tokens):
    past_len, batch = 6, 2
    pos = (past_len + torch.arange(new_tokens)).expand(batch, new_tokens)  # a stride-0 view
    x, weight, table, _ = make_inputs((batch, new_tokens), table_rows=past_len + new_tokens)
    torch.testing.assert_close(token_bias_linear(x, weight, table, pos),
                               reference_linear(x, weight, table, pos), atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    x, weight, table, pos = make_inputs((4, 6), d_in=10, d_out=8)
    x_t = x.transpose(0, 1)  # (6, 4, d_in), not contiguous
    pos_t = pos.transpose(0, 1)
    wide = torch.randn(table.shape[0], 2 * table.shape[1])
    table_view = wide[:, ::2]
    weight_t = weight.T.contiguous().T
    torch.testing.assert_close(token_bias_linear(x_t, weight_t, table_view, pos_t),
                               reference_linear(x_t, weight, table_view, pos_t), atol=1e-5, rtol=1e-5)
    y = torch.randn(8, 4, 6).permute(1, 2, 0)
    torch.testing.assert_close(token_bias_add(y, table_view, pos), reference_add(y, table_view, pos))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types(dtype):
    x, weight, table, pos = make_inputs((2, 33), d_in=64, d_out=48, dtype=dtype)
    out = token_bias_linear(x, weight, table, pos)
    assert out.dtype == dtype
    expected = reference_linear(x.float(), weight.float(), table.float(), pos)
    torch.testing.assert_close(out.float(), expected, atol=0.25, rtol=2e-2)
    y = torch.randn(2, 33, 48).to(dtype)
    torch.testing.assert_close(token_bias_add(y, table, pos), reference_add(y, table, pos), atol=0, rtol=0)


def test_float64():
    x, weight, table, pos = make_inputs((3, 4), dtype=torch.float64)
    torch.testing.assert_close(token_bias_linear(x, weight, table, pos),
                               reference_linear(x, weight, table, pos), atol=1e-12, rtol=1e-12)


# -- autograd -------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=str)
def test_gradcheck_linear(lead):
    # Two table rows for up to six tokens: rows sharing a position must add up in d(table).
    x, weight, table, pos = make_inputs(lead, d_in=5, d_out=4, table_rows=2, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, weight, table)]
    assert torch.autograd.gradcheck(lambda a, b, c: token_bias_linear(a, b, c, pos), args)


def test_gradcheck_add():
    y, _, table, pos = make_inputs((3, 2), d_in=4, d_out=4, table_rows=3, dtype=torch.float64)
    args = [t.requires_grad_() for t in (y, table)]
    assert torch.autograd.gradcheck(lambda a, b: token_bias_add(a, b, pos), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype):
    tensors = make_inputs((4, 8), d_in=16, d_out=12, table_rows=5, dtype=dtype)
    pos = tensors[3]
    ours = [t.clone().requires_grad_() for t in tensors[:3]]
    theirs = [t.clone().float().requires_grad_() for t in tensors[:3]]
    grad = torch.randn(4, 8, 12).to(dtype)
    token_bias_linear(*ours, pos).backward(grad)
    reference_linear(*theirs, pos).backward(grad.float())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.5, "rtol": 5e-2}
    for mine, ref in zip(ours, theirs):
        assert mine.grad.dtype == dtype
        torch.testing.assert_close(mine.grad.float(), ref.grad, **tol)


def test_activations_saved_only_for_weight_grad():
    """Scoring backpropagates to activations with frozen weights: x must not be kept."""
    x, weight, table, pos = make_inputs((2, 3))
    out = token_bias_linear(x.requires_grad_(), weight, table, pos)
    saved_x, saved_weight, _ = out.grad_fn.saved_tensors
    assert saved_x is None and saved_weight is not None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # opcheck's own use of torch.jit
def test_opcheck():
    """torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch."""
    x, weight, table, pos = make_inputs((2, 5), dtype=torch.float64)
    torch.library.opcheck(torch.ops.eigenfast.token_bias_linear.default,
                          (x.requires_grad_(), weight.requires_grad_(), table.requires_grad_(), pos))
    y = torch.randn(2, 5, table.shape[1], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.eigenfast.token_bias_add.default, (y, table, pos))


# -- tracing: torch.compile and torch.export ---------------------------------------------


class PositionalProjection(nn.Module):
    """A frozen projection followed by a removed component's mean output."""

    def __init__(self, d_in=16, d_out=24, table_rows=10):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.table = nn.Parameter(torch.randn(table_rows, d_out))
        self.mean = nn.Parameter(torch.randn(table_rows, d_out))

    def forward(self, x, pos):
        h = token_bias_linear(x, self.weight, self.table, pos)
        return token_bias_add(h, self.mean, pos)

    def reference(self, x, pos):
        return reference_add(reference_linear(x, self.weight, self.table, pos), self.mean, pos)


def module_inputs(batch=3, tokens=7):
    return torch.randn(batch, tokens, 16), left_padded_positions([tokens, 4, 2][:batch], tokens)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()
    module = PositionalProjection()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    x, pos = module_inputs()
    out = compiled(x, pos)
    torch.testing.assert_close(out, module.reference(x, pos), atol=1e-4, rtol=1e-4)
    out.square().sum().backward()  # aot_eager traces the autograd formula as well
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module.reference(x, pos).square().sum().backward()
    for mine, ref in zip(grads, (p.grad for p in module.parameters())):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor's own use of torch.jit
def test_torch_compile_inductor():
    # Forward only: a cold inductor build of the backward's C++ kernels takes about a
    # minute on two cores, and aot_eager above already traces the backward.
    torch._dynamo.reset()
    module = PositionalProjection()
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    x, pos = module_inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, pos), module.reference(x, pos), atol=1e-4, rtol=1e-4)


def test_torch_export_dynamic_batch():
    module = PositionalProjection()
    x, pos = module_inputs()
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(module, (x, pos), dynamic_shapes={"x": {0: batch}, "pos": {0: batch}})
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"eigenfast.token_bias_linear.default", "eigenfast.token_bias_add.default"} <= targets
    x2, pos2 = module_inputs(batch=2)
    torch.testing.assert_close(exported.module()(x2, pos2), module.reference(x2, pos2), atol=1e-4, rtol=1e-4)


# -- bad inputs -----------------------------------------------------------------------


def bad_linear_cases():
    x, weight, table, pos = make_inputs((2, 3))
    return {
        "x width": ((x[..., :-1], weight, table, pos), "d_in"),
        "weight 1-D": ((x, weight[0], table, pos), "weight must be 2-D"),
        "table width": ((x, weight, table[:, :-1], pos), "columns"),
        "table 1-D": ((x, weight, table[0], pos), "bias_table must be 2-D"),
        "pos shape": ((x, weight, table, pos[:, :-1]), "leading shape"),
        "pos rank": ((x, weight, table, pos.reshape(-1)), "leading shape"),
        "pos dtype": ((x, weight, table, pos.int()), "int64"),
        "weight dtype": ((x, weight.double(), table, pos), "dtype"),
        "int input": ((x.long(), weight.long(), table.long(), pos), "float32"),
        "0-d x": ((x[0, 0, 0], weight, table, pos[0, 0]), "0-d"),
    }


@pytest.mark.parametrize("case", list(bad_linear_cases()))
def test_linear_rejects_bad_inputs(case):
    args, message = bad_linear_cases()[case]
    with pytest.raises(RuntimeError, match=message):
        token_bias_linear(*args)


def test_add_rejects_bad_inputs():
    y, _, table, pos = make_inputs((2, 3), d_in=7)
    with pytest.raises(RuntimeError, match="columns"):
        token_bias_add(y[..., :-1], table, pos)
    with pytest.raises(RuntimeError, match="leading shape"):
        token_bias_add(y, table, pos.T)
    with pytest.raises(RuntimeError, match="dtype"):
        token_bias_add(y, table.double(), pos)


def test_out_of_range_positions_raise():
    x, weight, table, pos = make_inputs((2, 3), table_rows=4)
    for bad in (4, -1):
        pos[1, 1] = bad
        with pytest.raises(IndexError):
            token_bias_linear(x, weight, table, pos)
        with pytest.raises(IndexError):
            token_bias_add(torch.randn(2, 3, 7), table, pos)


def test_tracing_rejects_bad_shapes():
    """The fake kernels check shapes too, so errors surface at trace time."""
    module = PositionalProjection()
    x, pos = module_inputs()
    with pytest.raises(Exception, match="leading shape"):
        torch.export.export(module, (x, pos[:, :-1]))


# -- the compiled extension and the fallback ----------------------------------------------


def test_extension_loads_when_built():
    if os.environ.get("EIGENFAST_DISABLE_EXTENSION", "0") not in ("", "0"):
        pytest.skip("extension disabled by EIGENFAST_DISABLE_EXTENSION")
    if not list(Path(eigenfast.__file__).parent.glob("_C.*")):
        pytest.skip("eigenfast._C is not built (pip install --no-build-isolation -e .)")
    assert ops.extension_available()


FALLBACK_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import eigenfast.ops as ops
        import eigenfast.ops.token_bias
        results = {}
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(3, 5, 13, generator=g)
            w = torch.randn(7, 13, generator=g, requires_grad=True)
            t = torch.randn(9, 7, generator=g, requires_grad=True)
            pos = torch.randint(0, 9, (3, 5), generator=g)
            out = ops.token_bias_add(ops.token_bias_linear(x, w, t, pos), t, pos)
            out.square().sum().backward()
            results[seed] = [out.tolist(), w.grad.tolist(), t.grad.tolist()]
    messages = [str(w.message) for w in caught if "eigenfast._C" in str(w.message)]
    schemas = [str(getattr(torch.ops.eigenfast, n).default._schema) for n in ("token_bias_linear", "token_bias_add")]
    json.dump({"available": ops.extension_available(), "messages": messages, "schemas": schemas,
               "results": results}, sys.stdout)
""")


def start_script(disable_extension: str) -> subprocess.Popen:
    env = {**os.environ, "EIGENFAST_DISABLE_EXTENSION": disable_extension}
    return subprocess.Popen([sys.executable, "-c", FALLBACK_SCRIPT], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def script_result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    return json.loads(stdout)


def test_fallback_matches_and_warns_once():
    fallback_proc, native_proc = start_script("1"), start_script("0")
    fallback, native = script_result(fallback_proc), script_result(native_proc)
    assert not fallback["available"]
    assert len(fallback["messages"]) == 1
    message = fallback["messages"][0]
    assert "\n" not in message and "pip install --no-build-isolation -e ." in message
    assert native["schemas"] == fallback["schemas"]
    # Same mm, same gather-add: identical floats, not merely close.
    assert native["results"] == fallback["results"]
    if native["available"]:
        assert native["messages"] == []


# -- the CUDA sources -------------------------------------------------------------------


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles_with_plain_nvcc(tmp_path):
    """The .cu file must build with nvcc alone: no PyTorch headers, no extension flags."""
    def compile_for(arch):
        sources = sorted((ROOT / "csrc").glob("*.cu"))
        return [subprocess.run([NVCC, "-c", f"-arch={arch}", str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.o")],
                               capture_output=True, text=True, timeout=120) for src in sources]

    with ThreadPoolExecutor(2) as pool:
        runs = [r for batch in pool.map(compile_for, ["sm_80", "sm_90"]) for r in batch]
    assert runs
    for run in runs:
        assert run.returncode == 0, run.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_glue_compiles(tmp_path):
    """Syntax-check the CUDA glue (token_bias_cuda.cpp), which only a CUDA build compiles.
    nvcc drives the host compiler here just to supply the CUDA include paths."""
    from torch.utils.cpp_extension import include_paths

    # CPU wheels of torch ship the c10/cuda headers but not this generated one.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{ROOT / 'csrc'}"]
    run = subprocess.run([NVCC, "-std=c++20", "-c", str(ROOT / "csrc" / "token_bias_cuda.cpp"), *includes,
                          "-Xcompiler", "-fsyntax-only", "-o", str(tmp_path / "glue.o")],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
