// Autograd formulas of eigenfast::token_bias_linear / token_bias_add, in C++.
//
// Registered at the Autograd key for every device, so a call that needs no gradient
// (generate() under torch.no_grad / inference_mode) goes straight to the kernel
// without entering Python. The pure-PyTorch fallback registers the same formulas from
// Python (eigenfast/ops/token_bias.py) when this library is not built.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "token_bias.h"

namespace eigenfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias_table,
                       const at::Tensor& pos, bool clamp_pos) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eigenfast::token_bias_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias_table, pos, clamp_pos);
}

at::Tensor call_add(const at::Tensor& y, const at::Tensor& bias_table, const at::Tensor& pos,
                    bool clamp_pos) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("eigenfast::token_bias_add", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(y, bias_table, pos, clamp_pos);
}

// d(bias_table): every output row's gradient lands on the table row it read, which
// under clamp_pos is the clamped position. Half types accumulate in float32, since
// many rows can share one position.
at::Tensor table_grad(const at::Tensor& grad, const at::Tensor& pos, int64_t table_rows,
                      bool clamp_pos) {
  const auto dtype = grad.scalar_type();
  const auto acc = (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
  const auto rows = grad.reshape({leading_rows(grad), grad.size(-1)}).to(acc);
  auto index = pos.reshape({-1});
  if (clamp_pos) index = index.clamp(0, table_rows - 1);
  return rows.new_zeros({table_rows, rows.size(1)}).index_add_(0, index, rows).to(dtype);
}

bool needs_grad(std::initializer_list<at::Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : tensors) {
    if (t.requires_grad()) return true;
  }
  return false;
}

class TokenBiasLinear : public torch::autograd::Function<TokenBiasLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias_table, const at::Tensor& pos, bool clamp_pos) {
    // Keep activations alive only for a weight gradient: scoring backpropagates to
    // activations alone (docs/MATH.md §2) and should not hold every layer's input.
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(),
                            x.requires_grad() ? weight : at::Tensor(), pos});
    ctx->saved_data["table_rows"] = bias_table.size(0);
    ctx->saved_data["clamp_pos"] = clamp_pos;
    return call_linear(x, weight, bias_table, pos, clamp_pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto& pos = saved[2];
    const auto& grad = grads[0];
    at::Tensor grad_x, grad_weight, grad_table;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(grad, weight);
    if (ctx->needs_input_grad(1)) {
      const auto g = grad.reshape({leading_rows(grad), grad.size(-1)});
      grad_weight = g.t().mm(x.reshape({leading_rows(x), x.size(-1)}));
    }
    if (ctx->needs_input_grad(2)) {
      grad_table = table_grad(grad, pos, ctx->saved_data["table_rows"].toInt(),
                              ctx->saved_data["clamp_pos"].toBool());
    }
    return {grad_x, grad_weight, grad_table, at::Tensor(), at::Tensor()};
  }
};

class TokenBiasAdd : public torch::autograd::Function<TokenBiasAdd> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& bias_table,
                            const at::Tensor& pos, bool clamp_pos) {
    ctx->save_for_backward({pos});
    ctx->saved_data["table_rows"] = bias_table.size(0);
    ctx->saved_data["clamp_pos"] = clamp_pos;
    return call_add(y, bias_table, pos, clamp_pos);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& grad = grads[0];
    at::Tensor grad_table;
    if (ctx->needs_input_grad(1)) {
      grad_table = table_grad(grad, ctx->get_saved_variables()[0],
                              ctx->saved_data["table_rows"].toInt(),
                              ctx->saved_data["clamp_pos"].toBool());
    }
    return {ctx->needs_input_grad(0) ? grad : at::Tensor(), grad_table, at::Tensor(), at::Tensor()};
  }
};

at::Tensor token_bias_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias_table, const at::Tensor& pos,
                                      bool clamp_pos) {
  if (!needs_grad({x, weight, bias_table})) return call_linear(x, weight, bias_table, pos, clamp_pos);
  return TokenBiasLinear::apply(x, weight, bias_table, pos, clamp_pos);
}

at::Tensor token_bias_add_autograd(const at::Tensor& y, const at::Tensor& bias_table,
                                   const at::Tensor& pos, bool clamp_pos) {
  if (!needs_grad({y, bias_table})) return call_add(y, bias_table, pos, clamp_pos);
  return TokenBiasAdd::apply(y, bias_table, pos, clamp_pos);
}

}  // namespace
}  // namespace eigenfast

TORCH_LIBRARY_IMPL(eigenfast, Autograd, m) {
  m.impl("token_bias_linear", &eigenfast::token_bias_linear_autograd);
  m.impl("token_bias_add", &eigenfast::token_bias_add_autograd);
}
