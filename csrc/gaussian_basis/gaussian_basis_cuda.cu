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

// One thread per edge: a row of 128 values with ~27 exps is little work, and one owner per
// output keeps the sums deterministic.
template <class T>
__global__ void backward_kernel(BackwardArgs a, T log_tiny) {
  const T* scale = static_cast<const T*>(a.scale);
  T* grad_scale = static_cast<T*>(a.grad_scale);
  for (int64_t e = jc::grid_start(); e < a.num_edges; e += jc::grid_stride()) {
    T gs;
    backward_row(static_cast<const T*>(a.grad) + e * a.num_radial, static_cast<const T*>(a.x)[e],
                 static_cast<const T*>(a.offset), static_cast<const T*>(a.temps),
                 scale ? scale + e : nullptr, a.num_radial, log_tiny, static_cast<T*>(a.grad_x)[e], gs);
    if (grad_scale) grad_scale[e] = gs;
  }
}

template <class T>
void run_backward(const BackwardArgs& a, cudaStream_t stream) {
  if (a.num_edges == 0) return;
  backward_kernel<T><<<jc::grid_for(a.num_edges), jc::kBlock, 0, stream>>>(a, log_smallest_normal<T>());
  jc::check_launch();
}

template <class T>
__global__ void second_kernel(SecondArgs a, T log_tiny) {
  const T* scale = static_cast<const T*>(a.scale);
  const T* ggx = static_cast<const T*>(a.grad_grad_x);
  const T* ggs = static_cast<const T*>(a.grad_grad_scale);
  T* d_scale = static_cast<T*>(a.d_scale);
  for (int64_t e = jc::grid_start(); e < a.num_edges; e += jc::grid_stride()) {
    T ds;
    second_row(static_cast<const T*>(a.grad) + e * a.num_radial, static_cast<const T*>(a.x)[e],
               static_cast<const T*>(a.offset), static_cast<const T*>(a.temps),
               scale ? scale + e : nullptr, ggx ? ggx[e] : T(0), ggs ? ggs[e] : T(0), a.num_radial,
               log_tiny, static_cast<T*>(a.d_grad) + e * a.num_radial,
               static_cast<T*>(a.d_x)[e], ds);
    if (d_scale) d_scale[e] = ds;
  }
}

template <class T>
void run_second(const SecondArgs& a, cudaStream_t stream) {
  if (a.num_edges == 0) return;
  second_kernel<T><<<jc::grid_for(a.num_edges), jc::kBlock, 0, stream>>>(a, log_smallest_normal<T>());
  jc::check_launch();
}

}  // namespace

void gaussian_basis(const Args& args, cudaStream_t stream) {
  dispatch_float(args.dtype, [&](auto t) { run<decltype(t)>(args, stream); });
}

void gaussian_basis_backward(const BackwardArgs& args, cudaStream_t stream) {
  dispatch_float(args.dtype, [&](auto t) { run_backward<decltype(t)>(args, stream); });
}

void gaussian_basis_second(const SecondArgs& args, cudaStream_t stream) {
  dispatch_float(args.dtype, [&](auto t) { run_second<decltype(t)>(args, stream); });
}

}  // namespace jmp_ext::gaussian_basis::cuda
