// Shared by the CPU kernels (token_bias.cpp) and the CUDA glue (token_bias_cuda.cpp)
// so both backends reject bad inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace eigenfast {

// Validate the arguments of eigenfast::token_bias_linear / token_bias_add.
// Value checks on pos (range) are backend-specific and live with the kernels.
void check_token_bias_linear(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& bias_table, const at::Tensor& pos);
void check_token_bias_add(const at::Tensor& y, const at::Tensor& bias_table,
                          const at::Tensor& pos);

// x (..., d_in) @ weight.T as a contiguous (rows, d_out) matrix: the kernels then add
// the table in place, row r of the result belonging to pos.flatten()[r].
at::Tensor matmul_rows(const at::Tensor& x, const at::Tensor& weight);

// `sizes` with the last dimension replaced by `last`: the op's output shape.
std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last);

}  // namespace eigenfast
