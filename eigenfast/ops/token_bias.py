"""The token-bias operators ``eigenfast::token_bias_linear`` and ``eigenfast::token_bias_add``.

A frozen projection keeps a bias per token position (docs/MATH.md §3), so its forward is
``x @ weight.T + bias_table[pos]``; a removed component becomes ``y + bias_table[pos]``.
The kernels and their autograd formulas live in the C++/CUDA extension
``eigenfast._C``. When it is not built, or ``EIGENFAST_DISABLE_EXTENSION=1`` is set,
the same operators and formulas are defined here in plain PyTorch, with a one-time
warning. Either way this module registers the fake (shape-only) kernels, so
``torch.compile`` and ``torch.export`` trace the ops.

Positions: with ``clamp_pos=False`` (the default) every position must lie in
``[0, T)`` and is checked before any kernel runs (on a GPU that check copies one
min/max to the host, a synchronisation). With ``clamp_pos=True`` each position is
clamped into ``[0, T-1]`` by the kernel itself, with no check and no synchronisation:
what eigenfast's position tables use, whose last row is the extrapolation row. Either
way no kernel reads outside the table.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

DISABLE_ENV = "EIGENFAST_DISABLE_EXTENSION"
BUILD_HINT = "pip install --no-build-isolation -e ."

# Must match the TORCH_LIBRARY block in csrc/token_bias.cpp.
SCHEMAS = {
    "token_bias_linear": "(Tensor x, Tensor weight, Tensor bias_table, Tensor pos, bool clamp_pos=False) -> Tensor",
    "token_bias_add": "(Tensor y, Tensor bias_table, Tensor pos, bool clamp_pos=False) -> Tensor",
}
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _load_extension() -> tuple[ModuleType | None, str]:
    """Import ``eigenfast._C`` (its C++ static initialisers register the operators);
    return it, or None and why not."""
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return None, f"disabled by {DISABLE_ENV}"
    try:
        return importlib.import_module("eigenfast._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, str(exc)


# -- input checks, shared by the fallback kernels and the fake kernels -------------------
# The same checks and messages as csrc/token_bias.cpp, which serves the compiled ops.
# torch._check rather than `if`/raise: under tracing the sizes are symbolic, and
# torch._check turns the condition into a guard instead of failing to evaluate it.


def _check_input(op: str, name: str, t: Tensor) -> None:
    torch._check(t.dim() >= 1, lambda: f"{op}: {name} must be (..., d), got a 0-d tensor")
    torch._check(t.dtype in _FLOAT_DTYPES,
                 lambda: f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _check_like(op: str, name: str, t: Tensor, ref: Tensor) -> None:
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{op}: {name} has dtype {t.dtype} but the input has dtype {ref.dtype}")
    torch._check(t.device == ref.device,
                 lambda: f"{op}: {name} is on {t.device} but the input is on {ref.device}; "
                         "move it with .to(input.device)")


def _check_table_and_pos(op: str, inp: Tensor, d_out: int, bias_table: Tensor, pos: Tensor) -> None:
    torch._check(bias_table.dim() == 2,
                 lambda: f"{op}: bias_table must be 2-D (T, d_out), got shape {list(bias_table.shape)}")
    torch._check(bias_table.shape[1] == d_out,
                 lambda: f"{op}: bias_table has {bias_table.shape[1]} columns but the output has d_out={d_out}")
    torch._check(bias_table.shape[0] > 0, lambda: f"{op}: bias_table has no rows (T = 0)")
    _check_like(op, "bias_table", bias_table, inp)
    torch._check(pos.dtype == torch.int64, lambda: f"{op}: pos must be int64, got {pos.dtype}")
    torch._check(pos.device == inp.device, lambda: f"{op}: pos is on {pos.device} but the input is on {inp.device}; "
                                                   "move it with .to(input.device)")
    leading = inp.shape[:-1]
    mismatch = lambda: f"{op}: pos must have the input's leading shape {list(leading)}, got {list(pos.shape)}"  # noqa: E731
    torch._check(pos.dim() == len(leading), mismatch)
    for have, want in zip(pos.shape, leading):
        torch._check(have == want, mismatch)


def _check_linear(x: Tensor, weight: Tensor, bias_table: Tensor, pos: Tensor) -> None:
    op = "token_bias_linear"
    _check_input(op, "x", x)
    torch._check(weight.dim() == 2,
                 lambda: f"{op}: weight must be 2-D (d_out, d_in), got shape {list(weight.shape)}")
    torch._check(weight.shape[1] == x.shape[-1],
                 lambda: f"{op}: x has d_in={x.shape[-1]} but weight (d_out, d_in) has shape {list(weight.shape)}")
    _check_like(op, "weight", weight, x)
    _check_table_and_pos(op, x, weight.shape[0], bias_table, pos)


def _check_add(y: Tensor, bias_table: Tensor, pos: Tensor) -> None:
    op = "token_bias_add"
    _check_input(op, "y", y)
    _check_table_and_pos(op, y, y.shape[-1], bias_table, pos)


def _as_rows(t: Tensor) -> Tensor:
    """(..., d) -> (rows, d); reshape(-1, d) cannot infer -1 when d == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# -- pure-PyTorch kernels: the fallback when the extension is missing --------------------
# Same steps as the C++ kernels (gather the rows, then one addmm into them), so results
# agree bit for bit.


def _check_positions(op: str, pos: Tensor, table_rows: int) -> None:
    if pos.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(pos))  # one host sync on a GPU, as in C++
    torch._check_index(lo >= 0 and hi < table_rows,
                       lambda: f"{op}: pos values span [{lo}, {hi}], outside the bias table's {table_rows} rows; "
                               "clamp positions into [0, T) first or pass clamp_pos=True")


def _row_index(pos: Tensor, table_rows: int) -> Tensor:
    """The table row each output row reads: pos clamped into [0, T-1], flattened. The
    clamp is a no-op for checked positions and keeps clamp_pos=True inside the table."""
    return pos.reshape(-1).clamp(0, table_rows - 1)


def _linear_fallback(x: Tensor, weight: Tensor, bias_table: Tensor, pos: Tensor, clamp_pos: bool = False) -> Tensor:
    _check_linear(x, weight, bias_table, pos)
    if not clamp_pos:
        _check_positions("token_bias_linear", pos, bias_table.shape[0])
    out = bias_table.index_select(0, _row_index(pos, bias_table.shape[0]))
    out.addmm_(_as_rows(x), weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


def _add_fallback(y: Tensor, bias_table: Tensor, pos: Tensor, clamp_pos: bool = False) -> Tensor:
    _check_add(y, bias_table, pos)
    if not clamp_pos:
        _check_positions("token_bias_add", pos, bias_table.shape[0])
    rows = bias_table.index_select(0, _row_index(pos, bias_table.shape[0]))
    return (_as_rows(y) + rows).view(y.shape)


def _table_grad(grad: Tensor, pos: Tensor, table_rows: int) -> Tensor:
    """d(bias_table): every output row's gradient lands on the table row it read.
    Half types accumulate in float32, since many rows can share one position."""
    acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    rows = _as_rows(grad).to(acc)
    table = rows.new_zeros((table_rows, rows.shape[1]))
    return table.index_add(0, _row_index(pos, table_rows), rows).to(grad.dtype)


# Autograd of the fallback; the extension has the same formulas in C++
# (csrc/token_bias_autograd.cpp), so calls without grad never enter Python there.
# The dispatcher drops arguments left at their default (clamp_pos=False) before the
# backward sees them, so the number of gradients to return follows needs_input_grad.


def _no_grads_for_the_rest(ctx, grads: tuple) -> tuple:
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def _linear_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, bias_table, pos, _ = inputs
    # Keep activations alive only for a weight gradient: scoring backpropagates to
    # activations alone (docs/MATH.md §2) and should not hold every layer's input.
    ctx.save_for_backward(x if weight.requires_grad else None, weight if x.requires_grad else None, pos)
    ctx.table_rows = bias_table.shape[0]


def _linear_backward(ctx, grad: Tensor) -> tuple:
    x, weight, pos = ctx.saved_tensors
    need_x, need_weight, need_table = ctx.needs_input_grad[:3]
    grad_x = grad @ weight if need_x else None
    grad_weight = _as_rows(grad).t() @ _as_rows(x) if need_weight else None
    grad_table = _table_grad(grad, pos, ctx.table_rows) if need_table else None
    return _no_grads_for_the_rest(ctx, (grad_x, grad_weight, grad_table))


def _add_setup(ctx, inputs: tuple, output: Tensor) -> None:
    _, bias_table, pos, _ = inputs
    ctx.save_for_backward(pos)
    ctx.table_rows = bias_table.shape[0]


def _add_backward(ctx, grad: Tensor) -> tuple:
    (pos,) = ctx.saved_tensors
    need_y, need_table = ctx.needs_input_grad[:2]
    grad_table = _table_grad(grad, pos, ctx.table_rows) if need_table else None
    return _no_grads_for_the_rest(ctx, (grad if need_y else None, grad_table))


def _define_fallback_ops() -> torch.library.Library:
    lib = torch.library.Library("eigenfast", "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
    # "default" = CompositeExplicitAutograd: every device, autograd from register_autograd.
    torch.library.impl("eigenfast::token_bias_linear", "default", _linear_fallback, lib=lib)
    torch.library.impl("eigenfast::token_bias_add", "default", _add_fallback, lib=lib)
    torch.library.register_autograd("eigenfast::token_bias_linear", _linear_backward,
                                    setup_context=_linear_setup, lib=lib)
    torch.library.register_autograd("eigenfast::token_bias_add", _add_backward, setup_context=_add_setup, lib=lib)
    return lib


_C, _why_not_loaded = _load_extension()
if _C is None:
    _FALLBACK_LIB = _define_fallback_ops()  # kept referenced: the registrations live as long as it does
    warnings.warn(
        f"eigenfast: C++ extension eigenfast._C not loaded ({_why_not_loaded}); token-bias ops "
        f"use the slower pure-PyTorch fallback. Build it with `{BUILD_HINT}`.",
        stacklevel=2,
    )
elif not _C.with_cuda:
    # A CPU-only build under a CUDA torch: CUDA tensors take the PyTorch path (the C++
    # autograd formulas still apply, above every device's kernel).
    _CUDA_FALLBACK_LIB = torch.library.Library("eigenfast", "IMPL")
    torch.library.impl("eigenfast::token_bias_linear", "cuda", _linear_fallback, lib=_CUDA_FALLBACK_LIB)
    torch.library.impl("eigenfast::token_bias_add", "cuda", _add_fallback, lib=_CUDA_FALLBACK_LIB)


# -- fake kernels -----------------------------------------------------------------------
# Shapes only: position values are data, checked by the real kernels.


@torch.library.register_fake("eigenfast::token_bias_linear")
def _linear_fake(x: Tensor, weight: Tensor, bias_table: Tensor, pos: Tensor, clamp_pos: bool = False) -> Tensor:
    _check_linear(x, weight, bias_table, pos)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("eigenfast::token_bias_add")
def _add_fake(y: Tensor, bias_table: Tensor, pos: Tensor, clamp_pos: bool = False) -> Tensor:
    _check_add(y, bias_table, pos)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


# -- public face ------------------------------------------------------------------------

# Resolved once: looking an overload up through torch.ops costs microseconds a call.
_LINEAR_OP = torch.ops.eigenfast.token_bias_linear.default
_ADD_OP = torch.ops.eigenfast.token_bias_add.default


def token_bias_linear(x: Tensor, weight: Tensor, bias_table: Tensor, pos: Tensor, clamp_pos: bool = False) -> Tensor:
    """``x @ weight.T + bias_table[pos]``.

    x: (..., d_in); weight: (d_out, d_in), the nn.Linear layout; bias_table: (T, d_out),
    T >= 1; pos: int64 of shape x.shape[:-1]. x, weight and bias_table share a dtype
    (float32/64, bfloat16, float16) and device. With clamp_pos=False every position
    must lie in [0, T) (IndexError otherwise; a host sync on a GPU); with
    clamp_pos=True positions are clamped into [0, T-1]. Differentiable in x, weight and
    bias_table.
    """
    return _LINEAR_OP(x, weight, bias_table, pos, clamp_pos)


def token_bias_add(y: Tensor, bias_table: Tensor, pos: Tensor, clamp_pos: bool = False) -> Tensor:
    """``y + bias_table[pos]`` (a new tensor). y: (..., d); bias_table: (T, d), T >= 1;
    pos: int64 of shape y.shape[:-1], in [0, T) or clamped as in token_bias_linear.
    Differentiable in y and bias_table."""
    return _ADD_OP(y, bias_table, pos, clamp_pos)


def extension_available() -> bool:
    """Whether the compiled kernels (eigenfast._C) serve the ops, rather than the fallback."""
    return _C is not None
