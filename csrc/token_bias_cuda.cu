// CUDA gather(-add) for the token-bias op: out[r] = src[r] + table[clamp(pos[r])], or
// out[r] = table[clamp(pos[r])] when src is null.
//
// Deliberately free of PyTorch headers: it builds with a bare `nvcc -c`, and the
// extension's glue (token_bias_cuda_ops.cpp) reaches it through the C launchers below.
// The op is memory bound, so the kernel's job is wide (128-bit) coalesced accesses.
#include <stdint.h>

#include <algorithm>

#include "token_bias_cuda.h"

namespace {

constexpr int kMaxThreads = 256;
// Rows past this many blocks are covered by the grid-stride loop.
constexpr int64_t kMaxBlocks = 65535;

// Half types are added in float and rounded once, matching torch.add.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(decltype(to_acc(T())) v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one aligned load/store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One block per row (grid-stride when rows exceed the grid), threads across the row.
// `src` may alias `out`, so only the table is __restrict__. Every position is clamped
// into [0, table_rows): callers that need exact positions check them on the host
// first, and whatever reaches the kernel never reads outside the table.
template <typename T, int N>
__global__ void gather_add_kernel(T* out, const T* src, const T* __restrict__ table,
                                  const int64_t* __restrict__ pos, int64_t rows, int64_t d,
                                  int64_t table_rows) {
  using P = Pack<T, N>;
  const int64_t packs = d / N;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t raw = pos[r];
    const int64_t p = raw < 0 ? 0 : (raw >= table_rows ? table_rows - 1 : raw);
    const P* t = reinterpret_cast<const P*>(table + p * d);
    P* o = reinterpret_cast<P*>(out + r * d);
    if (src == nullptr) {
      for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) o[j] = t[j];
      continue;
    }
    const P* s = reinterpret_cast<const P*>(src + r * d);
    for (int64_t j = threadIdx.x; j < packs; j += blockDim.x) {
      P a = s[j];
      const P b = t[j];
#pragma unroll
      for (int k = 0; k < N; ++k) a.v[k] = from_acc<T>(to_acc(a.v[k]) + to_acc(b.v[k]));
      o[j] = a;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch_gather_add(T* out, const T* src, const T* table, const int64_t* pos,
                              int64_t rows, int64_t d, int64_t table_rows,
                              cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  // An empty table has no row to clamp to; the glue rejects it before launching.
  if (table_rows <= 0) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  // Rows start on 16-byte boundaries only when d is a multiple of the pack width.
  const bool vectorised = d % kVec == 0 && aligned16(out) && (src == nullptr || aligned16(src)) &&
                          aligned16(table);
  const int64_t per_row = vectorised ? d / kVec : d;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (per_row + 31) / 32 * 32));
  const unsigned blocks = static_cast<unsigned>(std::min(rows, kMaxBlocks));
  if (vectorised) {
    gather_add_kernel<T, kVec><<<blocks, threads, 0, stream>>>(out, src, table, pos, rows, d,
                                                               table_rows);
  } else {
    gather_add_kernel<T, 1><<<blocks, threads, 0, stream>>>(out, src, table, pos, rows, d,
                                                            table_rows);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t eigenfast_token_bias_add_f32(float* out, const float* src, const float* table,
                                         const int64_t* pos, int64_t rows, int64_t d,
                                         int64_t table_rows, cudaStream_t stream) {
  return launch_gather_add(out, src, table, pos, rows, d, table_rows, stream);
}

cudaError_t eigenfast_token_bias_add_f64(double* out, const double* src, const double* table,
                                         const int64_t* pos, int64_t rows, int64_t d,
                                         int64_t table_rows, cudaStream_t stream) {
  return launch_gather_add(out, src, table, pos, rows, d, table_rows, stream);
}

cudaError_t eigenfast_token_bias_add_f16(__half* out, const __half* src, const __half* table,
                                         const int64_t* pos, int64_t rows, int64_t d,
                                         int64_t table_rows, cudaStream_t stream) {
  return launch_gather_add(out, src, table, pos, rows, d, table_rows, stream);
}

cudaError_t eigenfast_token_bias_add_bf16(__nv_bfloat16* out, const __nv_bfloat16* src,
                                          const __nv_bfloat16* table, const int64_t* pos,
                                          int64_t rows, int64_t d, int64_t table_rows,
                                          cudaStream_t stream) {
  return launch_gather_add(out, src, table, pos, rows, d, table_rows, stream);
}

}  // extern "C"
