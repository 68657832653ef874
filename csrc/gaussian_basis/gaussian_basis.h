// GemNet-OC's Gaussian radial basis, computed only where it is not negligible.
//
// out[e, k] = exp(-temps[k] * (x[e] - offset[k])^2), and exactly 0 where that exponent is not
// above log(smallest normal number of the dtype) (or is NaN); with a scale [E], that times
// scale[e], and 0 where the product is below the smallest normal number. The zeroing is the model's
// definition, not an approximation: results below the smallest normal number would be
// subnormal, and subnormals make exp and every op that reads them ~10x slower on x86. With 128
// centres over [0, 1] only ~27 per edge survive in float32, so the kernel evaluates exp for
// those only instead of the 9 elementwise passes over [E, 128] that torch needs.
//
// Plain-data arguments, no torch: python/jmp_ext/ops/gaussian_basis.py owns the buffers and has
// checked shapes, dtypes and devices. The same entry exists under cpu:: and cuda::.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/float_dtype.h"
#include "common/hd.h"

#ifdef JMP_EXT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace jmp_ext::gaussian_basis {

struct Args {
  const void* x;       // [num_edges] of dtype: distances divided by the cutoff
  const void* offset;  // [num_radial] of dtype: the centres
  const void* temps;   // [num_radial] of dtype: the inverse widths, 1 / (2 sigma^2)
  const void* scale;   // [num_edges] of dtype, or null: a factor per edge (the envelope)
  void* out;           // [num_edges, num_radial] of dtype
  int64_t num_edges;
  int64_t num_radial;
  FloatDtype dtype;
};

// The gradient of a scalar through out = gaussian_basis(x, offset, temps, scale), given
// grad = d/d out: for each edge e, over the k where out[e, k] != 0,
//   grad_x[e]     = sum_k grad[e, k] * out[e, k] * slope[e, k],  slope = -2 temps[k] (x[e] - offset[k])
//   grad_scale[e] = sum_k grad[e, k] * basis[e, k]              (with a scale only)
// recomputing the ~27 non-zero values of each row instead of reading [E, R] saved tensors.
struct BackwardArgs {
  const void* grad;    // [num_edges, num_radial] of dtype
  const void* x;       // [num_edges]
  const void* offset;  // [num_radial]
  const void* temps;   // [num_radial]
  const void* scale;   // [num_edges], or null
  void* grad_x;        // [num_edges]
  void* grad_scale;    // [num_edges], or null (when scale is)
  int64_t num_edges;
  int64_t num_radial;
  FloatDtype dtype;
};

// The gradient of a scalar through BackwardArgs' outputs (grad_x, grad_scale), given
// grad_grad_x = d/d grad_x and grad_grad_scale = d/d grad_scale (either may be null: zero): with
// b = basis, out, s = slope as above, over the k where out[e, k] != 0 (d_grad is 0 elsewhere),
//   d_grad[e, k] = ggx[e] out s + ggs[e] b
//   d_x[e]       = sum_k grad[e, k] (ggx[e] out (s^2 - 2 temps[k]) + ggs[e] b s)
//   d_scale[e]   = sum_k grad[e, k] ggx[e] b s                          (with a scale only)
// (this is what training on forces -dE/dpos needs; no higher derivative is provided).
struct SecondArgs {
  const void* grad;             // [num_edges, num_radial] of dtype
  const void* x;                // [num_edges]
  const void* offset;           // [num_radial]
  const void* temps;            // [num_radial]
  const void* scale;            // [num_edges], or null
  const void* grad_grad_x;      // [num_edges], or null
  const void* grad_grad_scale;  // [num_edges], or null
  void* d_grad;                 // [num_edges, num_radial]
  void* d_x;                    // [num_edges]
  void* d_scale;                // [num_edges], or null (when scale is)
  int64_t num_edges;
  int64_t num_radial;
  FloatDtype dtype;
};

// log of the smallest normal number, rounded to T: the threshold that torch's
// `exponent > math.log(torch.finfo(dtype).tiny)` compares against.
template <class T>
T log_smallest_normal() {
  return static_cast<T>(std::log(static_cast<double>(std::numeric_limits<T>::min())));
}

// exp in the precision of its argument (expf for float), on the host and the device alike.
JMP_HD float exp_of(float v) { return expf(v); }
JMP_HD double exp_of(double v) { return exp(v); }

// One basis value. The exponent is formed as (-temp) * (diff * diff), in the order of the
// torch expression it replaces, so the two agree to the last bit before exp.
template <class T>
JMP_HD T gaussian(T x, T offset, T temp, T log_tiny) {
  T diff = x - offset;
  T exponent = -temp * (diff * diff);
  return exponent > log_tiny ? exp_of(exponent) : T(0);
}

// A basis value times its edge's scale, zeroed where the product falls below the smallest normal
// number, as the torch expression where(|scale * value| < tiny, 0, scale * value) does: a small
// Gaussian times a small envelope would otherwise be subnormal.
template <class T>
JMP_HD T scaled(T value, T scale) {
  T v = scale * value;
  T tiny = std::numeric_limits<T>::min();
  return v < tiny && v > -tiny ? T(0) : v;
}

// One edge's row of BackwardArgs, shared by the CPU and CUDA kernels. The products are formed in
// the order of the torch expression's gradient, ((grad * out) * slope); the sums run over k.
template <class T>
JMP_HD void backward_row(const T* grad, T x, const T* offset, const T* temps, const T* scale,
                         int64_t num_radial, T log_tiny, T& grad_x, T& grad_scale) {
  T sum_x = 0, sum_scale = 0;
  for (int64_t k = 0; k < num_radial; ++k) {
    T basis = gaussian(x, offset[k], temps[k], log_tiny);
    T out = scale ? scaled(basis, *scale) : basis;
    if (out == T(0)) continue;
    T slope = T(-2) * temps[k] * (x - offset[k]);
    sum_x += grad[k] * out * slope;
    sum_scale += grad[k] * basis;
  }
  grad_x = sum_x;
  grad_scale = sum_scale;
}

// One edge's row of SecondArgs; ggx and ggs are this edge's values (0 where absent).
template <class T>
JMP_HD void second_row(const T* grad, T x, const T* offset, const T* temps, const T* scale,
                       T ggx, T ggs, int64_t num_radial, T log_tiny, T* d_grad, T& d_x,
                       T& d_scale) {
  T sum_x = 0, sum_scale = 0;
  for (int64_t k = 0; k < num_radial; ++k) {
    T basis = gaussian(x, offset[k], temps[k], log_tiny);
    T out = scale ? scaled(basis, *scale) : basis;
    if (out == T(0)) {
      d_grad[k] = T(0);
      continue;
    }
    T slope = T(-2) * temps[k] * (x - offset[k]);
    d_grad[k] = ggx * out * slope + ggs * basis;
    sum_x += grad[k] * (ggx * out * (slope * slope - T(2) * temps[k]) + ggs * basis * slope);
    sum_scale += grad[k] * ggx * basis * slope;
  }
  d_x = sum_x;
  d_scale = sum_scale;
}

namespace cpu {
void gaussian_basis(const Args& args, int num_threads);
void gaussian_basis_backward(const BackwardArgs& args, int num_threads);
void gaussian_basis_second(const SecondArgs& args, int num_threads);
}  // namespace cpu

#ifdef JMP_EXT_WITH_CUDA
namespace cuda {
void gaussian_basis(const Args& args, cudaStream_t stream);
void gaussian_basis_backward(const BackwardArgs& args, cudaStream_t stream);
void gaussian_basis_second(const SecondArgs& args, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace jmp_ext::gaussian_basis
