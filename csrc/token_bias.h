// Shared by the CPU kernels (token_bias.cpp), the autograd formulas
// (token_bias_autograd.cpp) and the CUDA glue (token_bias_cuda_ops.cpp), so every
// backend rejects bad inputs with the same messages, before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace eigenfast {

// Validate every argument of eigenfast::token_bias_linear / token_bias_add: ranks,
// widths, dtypes, devices, a non-empty table and, unless clamp_pos, that every
// position lies in [0, T) (a host loop on the CPU; on the GPU one aminmax copied to
// the host, which synchronises with the stream). Throws c10::Error / c10::IndexError.
void check_token_bias_linear(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias_table, const at::Tensor& pos, bool clamp_pos);
void check_token_bias_add(const at::Tensor& y, const at::Tensor& bias_table,
                          const at::Tensor& pos, bool clamp_pos);

// A backend's row kernel: out[r] = (src ? src[r] : 0) + bias_table[clamp(pos[r], 0, T-1)]
// for every row r of the contiguous (rows, d) `out`; `src` is contiguous like `out` and
// may be `out` itself; `bias_table` and `pos` are contiguous. Inputs arrive checked.
using GatherRows = void (*)(const at::Tensor& out, const std::optional<at::Tensor>& src,
                            const at::Tensor& bias_table, const at::Tensor& pos);

// Product of every dimension but the last: the row count of t viewed as (rows, d).
// (reshape({-1, d}) cannot infer -1 when d == 0.)
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return rows;
}

// The ops, given a backend's row kernel: check, then gather and add.
at::Tensor token_bias_linear_with(GatherRows gather, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias_table, const at::Tensor& pos,
                                  bool clamp_pos);
at::Tensor token_bias_add_with(GatherRows gather, const at::Tensor& y, const at::Tensor& bias_table,
                               const at::Tensor& pos, bool clamp_pos);

}  // namespace eigenfast
