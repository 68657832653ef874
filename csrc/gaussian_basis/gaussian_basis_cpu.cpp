// CPU kernel of csrc/gaussian_basis: rows of edges split across threads (each output element
// depends on its own inputs only, so the result is the same on any thread count).
#include "gaussian_basis/gaussian_basis.h"

#include "common/parallel.h"

namespace jmp_ext::gaussian_basis::cpu {

namespace {

template <class T>
void run(const Args& a, int num_threads) {
  const T* x = static_cast<const T*>(a.x);
  const T* offset = static_cast<const T*>(a.offset);
  const T* temps = static_cast<const T*>(a.temps);
  const T* scale = static_cast<const T*>(a.scale);
  T* out = static_cast<T*>(a.out);
  const T log_tiny = log_smallest_normal<T>();
  const int64_t R = a.num_radial;
  parallel_for(a.num_edges, num_threads, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      T* row = out + e * R;
      for (int64_t k = 0; k < R; ++k) row[k] = gaussian(x[e], offset[k], temps[k], log_tiny);
      // A second pass over the row (in L1): without the exp calls it vectorises.
      if (scale) {
        for (int64_t k = 0; k < R; ++k) row[k] = scaled(row[k], scale[e]);
      }
    }
  });
}

template <class T>
void run_backward(const BackwardArgs& a, int num_threads) {
  const T* grad = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const T* scale = static_cast<const T*>(a.scale);
  T* grad_x = static_cast<T*>(a.grad_x);
  T* grad_scale = static_cast<T*>(a.grad_scale);
  const T log_tiny = log_smallest_normal<T>();
  const int64_t R = a.num_radial;
  parallel_for(a.num_edges, num_threads, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      T gs;
      backward_row(grad + e * R, x[e], static_cast<const T*>(a.offset), static_cast<const T*>(a.temps),
                   scale ? scale + e : nullptr, R, log_tiny, grad_x[e], gs);
      if (grad_scale) grad_scale[e] = gs;
    }
  });
}

template <class T>
void run_second(const SecondArgs& a, int num_threads) {
  const T* grad = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const T* scale = static_cast<const T*>(a.scale);
  const T* ggx = static_cast<const T*>(a.grad_grad_x);
  const T* ggs = static_cast<const T*>(a.grad_grad_scale);
  T* d_grad = static_cast<T*>(a.d_grad);
  T* d_x = static_cast<T*>(a.d_x);
  T* d_scale = static_cast<T*>(a.d_scale);
  const T log_tiny = log_smallest_normal<T>();
  const int64_t R = a.num_radial;
  parallel_for(a.num_edges, num_threads, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      T ds;
      second_row(grad + e * R, x[e], static_cast<const T*>(a.offset), static_cast<const T*>(a.temps),
                 scale ? scale + e : nullptr, ggx ? ggx[e] : T(0), ggs ? ggs[e] : T(0), R, log_tiny,
                 d_grad + e * R, d_x[e], ds);
      if (d_scale) d_scale[e] = ds;
    }
  });
}

}  // namespace

void gaussian_basis(const Args& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto t) { run<decltype(t)>(args, num_threads); });
}

void gaussian_basis_backward(const BackwardArgs& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto t) { run_backward<decltype(t)>(args, num_threads); });
}

void gaussian_basis_second(const SecondArgs& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto t) { run_second<decltype(t)>(args, num_threads); });
}

}  // namespace jmp_ext::gaussian_basis::cpu
