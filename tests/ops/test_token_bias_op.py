"""eigenfast::token_bias_linear / token_bias_add against plain PyTorch (docs/MATH.md §5).

The tests use whichever kernels `import eigenfast.ops` picked (the compiled extension
when built); the fallback is exercised in a subprocess with the extension disabled.
Tests taking `device` also run on CUDA when there is a GPU.
"""
from __future__ import annotations

import json
import os
import random
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

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def reference_linear(x, weight, table, pos):
    return x @ weight.T + table[pos]


def reference_add(y, table, pos):
    return y + table[pos]


def make_inputs(lead, d_in=13, d_out=7, table_rows=11, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g).to(dtype)
    weight = torch.randn(d_out, d_in, generator=g).to(dtype)
    table = torch.randn(table_rows, d_out, generator=g).to(dtype)
    pos = torch.randint(0, table_rows, lead, generator=g)
    return tuple(t.to(device) for t in (x, weight, table, pos))


def left_padded_positions(lengths, width):
    """True positions under left padding, as HF computes them: cumsum(mask) - 1."""
    mask = torch.arange(width).unsqueeze(0) >= (width - torch.tensor(lengths)).unsqueeze(1)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


LEADS = [(), (1,), (5,), (3, 4), (2, 3, 5), (0,), (2, 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_linear_matches_reference(lead, device):
    x, weight, table, pos = make_inputs(lead, device=device)
    out = token_bias_linear(x, weight, table, pos)
    assert out.shape == (*lead, weight.shape[0])
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference_linear(x, weight, table, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_add_matches_reference(lead, device):
    y, _, table, pos = make_inputs(lead, d_in=7, device=device)
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
    """Scoring backpropagates to activations with frozen weights: x must not be kept.
    The pack hook sees every tensor autograd saves, from C++ formulas or Python."""
    x, weight, table, pos = make_inputs((2, 3))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        token_bias_linear(x.requires_grad_(), weight, table, pos)
    saved = {t.data_ptr() for t in packed}
    assert weight.data_ptr() in saved and x.data_ptr() not in saved


def test_clamp_pos_clamps_and_backpropagates_to_clamped_rows():
    x, weight, table, _ = make_inputs((2, 5), d_in=5, d_out=4, table_rows=3, dtype=torch.float64)
    pos = torch.tensor([[-4, 0, 1, 2, 3], [7, 2, -1, 1, 100]])
    clamped = pos.clamp(0, table.shape[0] - 1)
    torch.testing.assert_close(token_bias_linear(x, weight, table, pos, clamp_pos=True),
                               reference_linear(x, weight, table, clamped))
    torch.testing.assert_close(token_bias_add(x, table[:, :1].expand(3, 5), pos, clamp_pos=True),
                               reference_add(x, table[:, :1].expand(3, 5), clamped))
    args = [t.requires_grad_() for t in (x, weight, table)]
    assert torch.autograd.gradcheck(lambda a, b, c: token_bias_linear(a, b, c, pos, clamp_pos=True), args)
    assert torch.autograd.gradcheck(lambda a, c: token_bias_add(a @ weight.T, c, pos, clamp_pos=True),
                                    [args[0], args[2]])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # opcheck's own use of torch.jit
def test_opcheck():
    """torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch."""
    x, weight, table, pos = make_inputs((2, 5), dtype=torch.float64)
    torch.library.opcheck(torch.ops.eigenfast.token_bias_linear.default,
                          (x.requires_grad_(), weight.requires_grad_(), table.requires_grad_(), pos))
    y = torch.randn(2, 5, table.shape[1], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.eigenfast.token_bias_add.default, (y, table, pos))
    wild = pos * 3 - 4  # out of range on both sides: clamp_pos must clamp them
    torch.library.opcheck(torch.ops.eigenfast.token_bias_linear.default, (x, weight, table, wild, True))
    torch.library.opcheck(torch.ops.eigenfast.token_bias_add.default, (y, table, wild, True))


def test_no_grad_calls_skip_python_autograd():
    """With the extension, the autograd formulas are C++, registered for every device:
    a call under torch.no_grad (generate()) never enters a Python autograd kernel."""
    if not ops.extension_available():
        pytest.skip("the fallback's autograd is Python by design")
    for name in ("token_bias_linear", "token_bias_add"):
        dump = torch._C._dispatch_dump(f"eigenfast::{name}")
        autograd = [line for line in dump.splitlines() if line.startswith("Autograd")]
        assert autograd and all("token_bias_autograd.cpp" in line for line in autograd), dump


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


def bad_linear_cases(device="cpu"):
    x, weight, table, pos = make_inputs((2, 3), device=device)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(bad_linear_cases()))
def test_linear_rejects_bad_inputs(case, device):
    args, message = bad_linear_cases(device)[case]
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


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_positions_raise(device):
    x, weight, table, pos = make_inputs((2, 3), table_rows=4, device=device)
    for bad in (4, -1, 2**62, -2**63):
        pos[1, 1] = bad
        with pytest.raises(IndexError, match="outside the bias table"):
            token_bias_linear(x, weight, table, pos)
        with pytest.raises(IndexError, match="outside the bias table"):
            token_bias_add(torch.randn(2, 3, 7, device=device), table, pos)


def test_empty_table_is_rejected_even_when_clamping():
    x, weight, table, pos = make_inputs((2, 3))
    with pytest.raises(RuntimeError, match="no rows"):
        token_bias_linear(x, weight, table[:0], pos, clamp_pos=True)
    with pytest.raises(RuntimeError, match="no rows"):
        token_bias_add(x[..., :7], table[:0], pos, clamp_pos=True)


# -- randomized bad inputs: every one a clean error, in this process --------------------


def noncontiguous(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values through a strided view: every other element of a wider tensor,
    or a transposed copy transposed back."""
    if t.dim() == 0:
        return t
    if rng.random() < 0.5:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.mT.contiguous().mT if t.dim() >= 2 else t.flip(0).flip(0)


def wrong_device(device: str) -> str:
    return "cpu" if device != "cpu" else "meta"  # meta: a device with no real kernel


def corruptions(device: str) -> dict:
    """Ways to break one argument of (op, x, weight, table, pos); each is (change, error)."""
    other = wrong_device(device)
    return {
        "x width": lambda a, r: {**a, "x": a["x"][..., : r.randrange(a["x"].shape[-1])]},
        "x 0-d": lambda a, r: {**a, "x": a["x"].sum()},
        "x int": lambda a, r: {**a, "x": a["x"].long()},
        "x bool": lambda a, r: {**a, "x": a["x"] > 0},
        "x complex": lambda a, r: {**a, "x": a["x"].to(torch.complex64)},
        "weight 1-D": lambda a, r: {**a, "weight": a["weight"][0]},
        "weight 3-D": lambda a, r: {**a, "weight": a["weight"][None]},
        "weight rows": lambda a, r: {**a, "weight": a["weight"][:-1]},
        "weight dtype": lambda a, r: {**a, "weight": a["weight"].double()},
        "weight device": lambda a, r: {**a, "weight": a["weight"].to(other)},
        "table 1-D": lambda a, r: {**a, "table": a["table"][0]},
        "table 3-D": lambda a, r: {**a, "table": a["table"][None]},
        "table width": lambda a, r: {**a, "table": a["table"][:, : r.randrange(a["table"].shape[1])]},
        "table empty": lambda a, r: {**a, "table": a["table"][:0]},
        "table dtype": lambda a, r: {**a, "table": a["table"].half()},
        "table device": lambda a, r: {**a, "table": a["table"].to(other)},
        "pos shape": lambda a, r: {**a, "pos": a["pos"][..., :-1]},
        "pos rank": lambda a, r: {**a, "pos": a["pos"].reshape(-1)[None, None]},
        "pos dtype": lambda a, r: {**a, "pos": a["pos"].to(r.choice([torch.int32, torch.float32, torch.uint8]))},
        "pos device": lambda a, r: {**a, "pos": a["pos"].to(other)},
        "pos too large": lambda a, r: {**a, "pos": a["pos"].clone().fill_(a["table"].shape[0] + r.randrange(2**40))},
        "pos negative": lambda a, r: {**a, "pos": a["pos"].clone().fill_(-1 - r.randrange(2**40))},
    }


def random_case(rng: random.Random, device: str) -> dict:
    lead = tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3)))
    d_in, d_out, rows = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 6)
    x, weight, table, pos = make_inputs(lead, d_in, d_out, rows, seed=rng.randrange(2**31), device=device)
    case = {"x": x, "weight": weight, "table": table, "pos": pos}
    return {name: noncontiguous(t, rng) if rng.random() < 0.5 else t for name, t in case.items()}


def call(op: str, a: dict, clamp_pos: bool) -> torch.Tensor:
    if op == "linear":
        return token_bias_linear(a["x"], a["weight"], a["table"], a["pos"], clamp_pos)
    return token_bias_add(a["x"], a["table"], a["pos"], clamp_pos)


@pytest.mark.parametrize("device", DEVICES)
def test_random_bad_inputs_raise_clean_errors(device):
    rng = random.Random(1234)
    broken = corruptions(device)
    tried = 0
    for _ in range(300):
        name = rng.choice(sorted(broken))
        op = rng.choice(["linear", "add"])
        case = random_case(rng, device)
        if op == "add":  # token_bias_add reads x as y: give it the table's width
            case["x"] = noncontiguous(torch.randn(*case["pos"].shape, case["table"].shape[1], device=device), rng)
            if name.startswith("weight") or name == "x width":
                continue  # no weight, and y's width is checked as "table width"
        bad = broken[name](case, rng)
        # clamp_pos hides position values, not shapes, dtypes or devices.
        clamp = False if name.startswith("pos too") or name.startswith("pos negative") else rng.random() < 0.5
        with pytest.raises((RuntimeError, IndexError)) as caught:
            call(op, bad, clamp)
        assert str(caught.value).strip(), f"{op} {name}: an error without a message"
        tried += 1
    assert tried > 200


@pytest.mark.parametrize("device", DEVICES)
def test_random_good_inputs_match_reference(device):
    """The strided, clamped and in-range inputs that the bad cases are made from work."""
    rng = random.Random(99)
    for _ in range(60):
        case = random_case(rng, device)
        clamp = rng.random() < 0.5
        if clamp:
            case["pos"] = case["pos"] * 3 - 4
        pos = case["pos"].clamp(0, case["table"].shape[0] - 1)
        torch.testing.assert_close(call("linear", case, clamp),
                                   reference_linear(case["x"], case["weight"], case["table"], pos))
        y = torch.randn(*case["pos"].shape, case["table"].shape[1], device=device)
        torch.testing.assert_close(call("add", {**case, "x": y}, clamp), reference_add(y, case["table"], pos))


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
    """Syntax-check the CUDA glue (token_bias_cuda_ops.cpp), which only a CUDA build compiles.
    nvcc drives the host compiler here just to supply the CUDA include paths."""
    from torch.utils.cpp_extension import include_paths

    # CPU wheels of torch ship the c10/cuda headers but not this generated one.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{ROOT / 'csrc'}"]
    run = subprocess.run([NVCC, "-std=c++20", "-c", str(ROOT / "csrc" / "token_bias_cuda_ops.cpp"), *includes,
                          "-Xcompiler", "-fsyntax-only", "-o", str(tmp_path / "glue.o")],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr


def test_a_fresh_process_has_the_ops_after_import_eigenfast_ops_only():
    """What a process running an exported program or AOTInductor package does first (docs/SERVING.md)."""
    code = ("import torch, eigenfast; before = hasattr(torch.ops.eigenfast, 'token_bias_add'); import eigenfast.ops; "
            "print(before, callable(torch.ops.eigenfast.token_bias_add), callable(torch.ops.eigenfast.token_bias_linear))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["False", "True", "True"]
