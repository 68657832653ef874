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

namespace cpu {
void gaussian_basis(const Args& args, int num_threads);
}  // namespace cpu

#ifdef JMP_EXT_WITH_CUDA
namespace cuda {
void gaussian_basis(const Args& args, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace jmp_ext::gaussian_basis
