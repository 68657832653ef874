// Shared pieces of the CUDA kernels: grid-stride launch shapes and the device-side error report.
//
// Kernels cannot throw. A kernel that meets a bad index skips it (never reading or writing out of
// bounds) and records the smallest bad position in a device int64 status word, which the caller
// set to kNoError beforehand (python/jmp_ext/ops allocates it with torch). After the launch the
// host reads the status back (the op's one synchronisation) and throws InvalidInput with a
// message naming the position, as the CPU kernels do. atomicMin keeps the report independent of
// scheduling: the same bad position is named on every run.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/hd.h"

namespace jmp_ext::cuda {

constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

// Blocks for a grid-stride loop over n items; capped, the loop covers the rest.
inline unsigned int grid_for(int64_t n, int block = kBlock) {
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(n, block), 1, 1 << 16));
}

// This thread's first item and the stride of a grid-stride loop, in int64 (n may exceed 2^31).
__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Records `position` (>= 0) as bad; the status keeps the smallest one.
__device__ __forceinline__ void report(int64_t* status, int64_t position) {
  atomicMin(reinterpret_cast<unsigned long long*>(status),
            static_cast<unsigned long long>(position));
}

// Throws jmp_ext::Error if a launch failed.
inline void check_launch() { JMP_CUDA_CHECK(cudaGetLastError()); }

// Copies n values from the device (in stream order) and waits for them.
template <class T>
void read_back(const T* device, T* host, int64_t n, cudaStream_t stream) {
  JMP_CUDA_CHECK(cudaMemcpyAsync(host, device, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  JMP_CUDA_CHECK(cudaStreamSynchronize(stream));
}

template <class T>
T read_one(const T* device, cudaStream_t stream) {
  T value;
  read_back(device, &value, 1, stream);
  return value;
}

}  // namespace jmp_ext::cuda
