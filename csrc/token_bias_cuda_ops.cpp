// CUDA kernels of eigenfast::token_bias_linear / token_bias_add (built only into the
// CUDA extension): the shared op bodies (token_bias.cpp) check every input, then the
// plain-CUDA launcher (token_bias_cuda.cu) gathers the table rows on the current stream
// and cuBLAS, through ATen, accumulates the matmul into them.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "token_bias.h"
#include "token_bias_cuda.h"

namespace eigenfast {
namespace {

template <typename Cuda>
using Launcher = cudaError_t (*)(Cuda*, const Cuda*, const Cuda*, const int64_t*, int64_t, int64_t,
                                 int64_t, cudaStream_t);

// Storage is ATen's element type; at::Half / at::BFloat16 share the bit layout of
// CUDA's __half / __nv_bfloat16, the launcher's (Cuda) type.
template <typename Storage, typename Cuda>
cudaError_t launch(Launcher<Cuda> launcher, const at::Tensor& out,
                   const std::optional<at::Tensor>& src, const at::Tensor& bias_table,
                   const at::Tensor& pos, cudaStream_t stream) {
  const Cuda* src_ptr =
      src ? reinterpret_cast<const Cuda*>(src->const_data_ptr<Storage>()) : nullptr;
  return launcher(reinterpret_cast<Cuda*>(out.mutable_data_ptr<Storage>()), src_ptr,
                  reinterpret_cast<const Cuda*>(bias_table.const_data_ptr<Storage>()),
                  pos.const_data_ptr<int64_t>(), pos.numel(), out.size(-1), bias_table.size(0),
                  stream);
}

void gather_rows_cuda(const at::Tensor& out, const std::optional<at::Tensor>& src,
                      const at::Tensor& bias_table, const at::Tensor& pos) {
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status = cudaSuccess;
  switch (out.scalar_type()) {
    case at::kFloat:
      status = launch<float>(eigenfast_token_bias_add_f32, out, src, bias_table, pos, stream);
      break;
    case at::kDouble:
      status = launch<double>(eigenfast_token_bias_add_f64, out, src, bias_table, pos, stream);
      break;
    case at::kHalf:
      status = launch<at::Half>(eigenfast_token_bias_add_f16, out, src, bias_table, pos, stream);
      break;
    case at::kBFloat16:
      status = launch<at::BFloat16>(eigenfast_token_bias_add_bf16, out, src, bias_table, pos, stream);
      break;
    default:
      TORCH_CHECK(false, "token_bias: no CUDA kernel for dtype ", out.scalar_type());
  }
  C10_CUDA_CHECK(status);
}

at::Tensor token_bias_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias_table, const at::Tensor& pos,
                                  bool clamp_pos) {
  return token_bias_linear_with(&gather_rows_cuda, x, weight, bias_table, pos, clamp_pos);
}

at::Tensor token_bias_add_cuda(const at::Tensor& y, const at::Tensor& bias_table,
                               const at::Tensor& pos, bool clamp_pos) {
  return token_bias_add_with(&gather_rows_cuda, y, bias_table, pos, clamp_pos);
}

}  // namespace
}  // namespace eigenfast

TORCH_LIBRARY_IMPL(eigenfast, CUDA, m) {
  m.impl("token_bias_linear", &eigenfast::token_bias_linear_cuda);
  m.impl("token_bias_add", &eigenfast::token_bias_add_cuda);
}
