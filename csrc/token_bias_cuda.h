/* C interface of the CUDA gather(-add) kernel (token_bias_cuda.cu).
 *
 * Plain CUDA types only, so the .cu file builds with a bare `nvcc -c` and the PyTorch
 * glue (token_bias_cuda_ops.cpp) needs no CUDA compiler of its own.
 *
 * Each launcher computes out[r, :] = src[r, :] + table[p, :] for r < rows, on `stream`,
 * where p is pos[r] clamped into [0, table_rows - 1], with row-major contiguous out/src
 * (rows, d) and table (table_rows, d). `src` may equal `out` (in place) or be null (a
 * plain gather: out[r, :] = table[p, :]). The clamp means no position reads outside the
 * table; exact positions are the caller's to check. Returns the launch status
 * (cudaSuccess when queued; cudaErrorInvalidValue for an empty table with rows to fill).
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t eigenfast_token_bias_add_f32(float* out, const float* src, const float* table,
                                         const int64_t* pos, int64_t rows, int64_t d,
                                         int64_t table_rows, cudaStream_t stream);
cudaError_t eigenfast_token_bias_add_f64(double* out, const double* src, const double* table,
                                         const int64_t* pos, int64_t rows, int64_t d,
                                         int64_t table_rows, cudaStream_t stream);
cudaError_t eigenfast_token_bias_add_f16(__half* out, const __half* src, const __half* table,
                                         const int64_t* pos, int64_t rows, int64_t d,
                                         int64_t table_rows, cudaStream_t stream);
cudaError_t eigenfast_token_bias_add_bf16(__nv_bfloat16* out, const __nv_bfloat16* src,
                                          const __nv_bfloat16* table, const int64_t* pos,
                                          int64_t rows, int64_t d, int64_t table_rows,
                                          cudaStream_t stream);

#ifdef __cplusplus
}
#endif
