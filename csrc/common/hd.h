// Host/device portability: code marked JMP_HD compiles for the CPU and, under nvcc, for the GPU,
// so that the math shared by both backends is written once.
#pragma once

#if defined(__CUDACC__)
#define JMP_HD __host__ __device__ __forceinline__
#else
#define JMP_HD inline
#endif

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include "common/check.h"

// Throw jmp_ext::Error on a failed CUDA runtime call, naming the call and the CUDA error.
#define JMP_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    cudaError_t jmp_cuda_status_ = (expr);                                               \
    if (jmp_cuda_status_ != cudaSuccess) {                                               \
      throw ::jmp_ext::Error(::jmp_ext::detail::concat(                                  \
          #expr, " failed: ", cudaGetErrorString(jmp_cuda_status_), " (", __FILE__, ":", \
          __LINE__, ")"));                                                               \
    }                                                                                    \
  } while (0)

namespace jmp_ext::cuda {
constexpr int kBlock = 256;
inline __host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace jmp_ext::cuda
#endif
