// eigenfast::token_bias_linear / token_bias_add: schemas, input checks and CPU kernels.
//
// A pruned matrix keeps a bias per token position (docs/MATH.md §2), so its forward is
// y = x @ weight.T + bias_table[pos]. The table rows are gathered straight into the
// output and one GEMM then accumulates x @ weight.T into them (addmm, beta = 1), so
// the output is written by the gather and read-modified-written once by the GEMM.
#include <Python.h>  // only for the module stub at the bottom; first, as Python asks

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "token_bias.h"

namespace eigenfast {

namespace {

// Enough work per task that OpenMP's fork/join cost stays small next to it.
constexpr int64_t kElementsPerTask = 32768;

void check_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must be (..., d), got a 0-d tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_same_dtype_device(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but the input has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", ref.device(), "; move it with .to(input.device)");
}

// Exact positions: every one in [0, T). On the CPU a loop names the first bad value;
// on another device one aminmax is copied to the host (a synchronisation, which is why
// callers that can tolerate clamping pass clamp_pos=true instead).
void check_positions(const char* op, const at::Tensor& pos, int64_t table_rows) {
  if (pos.numel() == 0) return;
  const char* fix = "; clamp positions into [0, T) first or pass clamp_pos=True";
  if (pos.is_cpu()) {
    const auto positions = pos.contiguous();
    const int64_t* p = positions.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < positions.numel(); ++i) {
      TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < table_rows, op, ": pos value ", p[i],
                        " is outside the bias table's ", table_rows, " rows", fix);
    }
    return;
  }
  const auto [lo, hi] = at::aminmax(pos);
  const auto bounds = at::stack({lo, hi}).cpu();
  const int64_t* b = bounds.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(b[0] >= 0 && b[1] < table_rows, op, ": pos values span [", b[0], ", ",
                    b[1], "], outside the bias table's ", table_rows, " rows", fix);
}

void check_table_and_pos(const char* op, const at::Tensor& input, int64_t d_out,
                         const at::Tensor& bias_table, const at::Tensor& pos, bool clamp_pos) {
  TORCH_CHECK(bias_table.dim() == 2, op, ": bias_table must be 2-D (T, d_out), got shape ",
              bias_table.sizes());
  TORCH_CHECK(bias_table.size(1) == d_out, op, ": bias_table has ", bias_table.size(1),
              " columns but the output has d_out=", d_out);
  // Clamping needs a row to clamp to, and an empty table has none for any position.
  TORCH_CHECK(bias_table.size(0) > 0, op, ": bias_table has no rows (T = 0)");
  check_same_dtype_device(op, "bias_table", bias_table, input);
  TORCH_CHECK(pos.scalar_type() == at::kLong, op, ": pos must be int64, got ",
              pos.scalar_type());
  TORCH_CHECK(pos.device() == input.device(), op, ": pos is on ", pos.device(),
              " but the input is on ", input.device(), "; move it with .to(input.device)");
  const auto leading = input.sizes().slice(0, input.dim() - 1);
  TORCH_CHECK(pos.sizes() == leading, op, ": pos must have the input's leading shape ",
              leading, ", got ", pos.sizes());
  if (!clamp_pos) check_positions(op, pos, bias_table.size(0));
}

// out[r] = (src ? src[r] : 0) + table[clamp(pos[r])] for every row r; src may alias out.
template <typename scalar_t>
void gather_rows(scalar_t* out, const scalar_t* src, const scalar_t* table, const int64_t* pos,
                 int64_t rows, int64_t d, int64_t table_rows) {
  using acc_t = at::opmath_type<scalar_t>;  // half types add in float, as torch.add does
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = std::clamp<int64_t>(pos[r], 0, table_rows - 1);
      const scalar_t* t = table + p * d;
      scalar_t* o = out + r * d;
      if (src == nullptr) {
        std::copy(t, t + d, o);
        continue;
      }
      const scalar_t* s = src + r * d;
      for (int64_t j = 0; j < d; ++j) {
        o[j] = static_cast<scalar_t>(static_cast<acc_t>(s[j]) + static_cast<acc_t>(t[j]));
      }
    }
  });
}

void gather_rows_cpu(const at::Tensor& out, const std::optional<at::Tensor>& src,
                     const at::Tensor& bias_table, const at::Tensor& pos) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "token_bias", [&] {
    gather_rows<scalar_t>(out.mutable_data_ptr<scalar_t>(),
                          src ? src->const_data_ptr<scalar_t>() : nullptr,
                          bias_table.const_data_ptr<scalar_t>(), pos.const_data_ptr<int64_t>(),
                          pos.numel(), out.size(-1), bias_table.size(0));
  });
}

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

at::Tensor token_bias_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias_table, const at::Tensor& pos,
                                 bool clamp_pos) {
  return token_bias_linear_with(&gather_rows_cpu, x, weight, bias_table, pos, clamp_pos);
}

at::Tensor token_bias_add_cpu(const at::Tensor& y, const at::Tensor& bias_table,
                              const at::Tensor& pos, bool clamp_pos) {
  return token_bias_add_with(&gather_rows_cpu, y, bias_table, pos, clamp_pos);
}

}  // namespace

void check_token_bias_linear(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias_table, const at::Tensor& pos, bool clamp_pos) {
  constexpr const char* op = "token_bias_linear";
  check_input(op, "x", x);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (d_out, d_in), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(-1), op, ": x has d_in=", x.size(-1),
              " but weight (d_out, d_in) has shape ", weight.sizes());
  check_same_dtype_device(op, "weight", weight, x);
  check_table_and_pos(op, x, weight.size(0), bias_table, pos, clamp_pos);
}

void check_token_bias_add(const at::Tensor& y, const at::Tensor& bias_table,
                          const at::Tensor& pos, bool clamp_pos) {
  constexpr const char* op = "token_bias_add";
  check_input(op, "y", y);
  check_table_and_pos(op, y, y.size(-1), bias_table, pos, clamp_pos);
}

at::Tensor token_bias_linear_with(GatherRows gather, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias_table, const at::Tensor& pos,
                                  bool clamp_pos) {
  check_token_bias_linear(x, weight, bias_table, pos, clamp_pos);
  const int64_t rows = leading_rows(x);
  at::Tensor out = at::empty({rows, weight.size(0)}, x.options());
  gather(out, std::nullopt, bias_table.contiguous(), pos.contiguous());
  out.addmm_(x.reshape({rows, x.size(-1)}), weight.t());
  return out.view(with_last_dim(x.sizes(), weight.size(0)));
}

at::Tensor token_bias_add_with(GatherRows gather, const at::Tensor& y, const at::Tensor& bias_table,
                               const at::Tensor& pos, bool clamp_pos) {
  check_token_bias_add(y, bias_table, pos, clamp_pos);
  at::Tensor out = at::empty(y.sizes(), y.options());
  gather(out, y.contiguous(), bias_table.contiguous(), pos.contiguous());
  return out;
}

}  // namespace eigenfast

TORCH_LIBRARY(eigenfast, m) {
  // The fake (shape) kernels are registered from Python, here; the Python fallback
  // registers the same schemas when this library is not built.
  m.set_python_module("eigenfast.ops.token_bias");
  m.def("token_bias_linear(Tensor x, Tensor weight, Tensor bias_table, Tensor pos, "
        "bool clamp_pos=False) -> Tensor");
  m.def("token_bias_add(Tensor y, Tensor bias_table, Tensor pos, bool clamp_pos=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(eigenfast, CPU, m) {
  m.impl("token_bias_linear", &eigenfast::token_bias_linear_cpu);
  m.impl("token_bias_add", &eigenfast::token_bias_add_cpu);
}

// `import eigenfast._C` loads this library, whose static initialisers register the ops.
// A bare C module (no pybind11) keeps the build short; `with_cuda` tells Python
// whether the CUDA kernels were compiled in.
static PyModuleDef eigenfast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "eigenfast custom operators", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&eigenfast_c_module);
  if (module == nullptr) return nullptr;
#ifdef EIGENFAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
