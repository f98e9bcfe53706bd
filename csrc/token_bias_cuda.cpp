// CUDA kernels of eigenfast::token_bias_linear / token_bias_add (built only into the
// CUDA extension): cuBLAS does the matmul through ATen, then the plain-CUDA launcher
// (token_bias_cuda.cu) adds the table rows in place on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "token_bias.h"
#include "token_bias_cuda.h"

namespace eigenfast {
namespace {

void gather_add_rows_cuda(const at::Tensor& out, const at::Tensor& src,
                          const at::Tensor& bias_table, const at::Tensor& pos) {
  const c10::cuda::CUDAGuard guard(out.device());
  const auto table = bias_table.contiguous();
  const auto positions = pos.contiguous();
  const int64_t rows = positions.numel();
  const int64_t d = out.size(-1);
  const int64_t table_rows = table.size(0);
  const int64_t* p = positions.const_data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  cudaError_t status = cudaSuccess;
  switch (out.scalar_type()) {
    case at::kFloat:
      status = eigenfast_token_bias_add_f32(out.mutable_data_ptr<float>(),
                                            src.const_data_ptr<float>(),
                                            table.const_data_ptr<float>(), p, rows, d,
                                            table_rows, stream);
      break;
    case at::kDouble:
      status = eigenfast_token_bias_add_f64(out.mutable_data_ptr<double>(),
                                            src.const_data_ptr<double>(),
                                            table.const_data_ptr<double>(), p, rows, d,
                                            table_rows, stream);
      break;
    // at::Half / at::BFloat16 share the bit layout of CUDA's __half / __nv_bfloat16.
    case at::kHalf:
      status = eigenfast_token_bias_add_f16(
          reinterpret_cast<__half*>(out.mutable_data_ptr<at::Half>()),
          reinterpret_cast<const __half*>(src.const_data_ptr<at::Half>()),
          reinterpret_cast<const __half*>(table.const_data_ptr<at::Half>()), p, rows, d,
          table_rows, stream);
      break;
    case at::kBFloat16:
      status = eigenfast_token_bias_add_bf16(
          reinterpret_cast<__nv_bfloat16*>(out.mutable_data_ptr<at::BFloat16>()),
          reinterpret_cast<const __nv_bfloat16*>(src.const_data_ptr<at::BFloat16>()),
          reinterpret_cast<const __nv_bfloat16*>(table.const_data_ptr<at::BFloat16>()), p,
          rows, d, table_rows, stream);
      break;
    default:
      TORCH_CHECK(false, "token_bias: no CUDA kernel for dtype ", out.scalar_type());
  }
  C10_CUDA_CHECK(status);
}

at::Tensor token_bias_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias_table, const at::Tensor& pos) {
  check_token_bias_linear(x, weight, bias_table, pos);
  at::Tensor out = matmul_rows(x, weight);
  gather_add_rows_cuda(out, out, bias_table, pos);
  return out.view(with_last_dim(x.sizes(), weight.size(0)));
}

at::Tensor token_bias_add_cuda(const at::Tensor& y, const at::Tensor& bias_table,
                               const at::Tensor& pos) {
  check_token_bias_add(y, bias_table, pos);
  const at::Tensor src = y.contiguous();
  at::Tensor out = at::empty(y.sizes(), y.options());
  gather_add_rows_cuda(out, src, bias_table, pos);
  return out;
}

}  // namespace
}  // namespace eigenfast

TORCH_LIBRARY_IMPL(eigenfast, CUDA, m) {
  m.impl("token_bias_linear", &eigenfast::token_bias_linear_cuda);
  m.impl("token_bias_add", &eigenfast::token_bias_add_cuda);
}
