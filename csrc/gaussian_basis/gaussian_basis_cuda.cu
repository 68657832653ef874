// CUDA kernel of csrc/gaussian_basis: one thread per output element, the same arithmetic as the
// CPU (gaussian() in the header); exp may differ from the CPU's in the last bit.
#include "common/cuda_helpers.h"
#include "gaussian_basis/gaussian_basis.h"

namespace jmp_ext::gaussian_basis::cuda {

namespace {

namespace jc = jmp_ext::cuda;

template <class T>
__global__ void gaussian_kernel(const T* x, const T* offset, const T* temps, const T* scale,
                                T* out, int64_t num_edges, int64_t num_radial, T log_tiny) {
  for (int64_t i = jc::grid_start(); i < num_edges * num_radial; i += jc::grid_stride()) {
    int64_t e = i / num_radial, k = i % num_radial;
    T value = gaussian(x[e], offset[k], temps[k], log_tiny);
    out[i] = scale ? scaled(value, scale[e]) : value;
  }
}

template <class T>
void run(const Args& a, cudaStream_t stream) {
  int64_t n = a.num_edges * a.num_radial;
  if (n == 0) return;
  gaussian_kernel<T><<<jc::grid_for(n), jc::kBlock, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.offset), static_cast<const T*>(a.temps),
      static_cast<const T*>(a.scale), static_cast<T*>(a.out), a.num_edges, a.num_radial,
      log_smallest_normal<T>());
  jc::check_launch();
}

}  // namespace

void gaussian_basis(const Args& args, cudaStream_t stream) {
  dispatch_float(args.dtype, [&](auto t) { run<decltype(t)>(args, stream); });
}

}  // namespace jmp_ext::gaussian_basis::cuda
