// The floating-point dtypes of the operators that take positions or distances in float32 or
// float64 (radius_graph, gaussian_basis), and the dispatch from the runtime code to the C++ type.
// The codes are those that python/jmp_ext/ops passes: 0 float32, 1 float64.
#pragma once

#include <cstdint>

namespace jmp_ext {

enum class FloatDtype : int32_t { f32 = 0, f64 = 1 };

// f(T{}) with T the C++ type of `dtype`.
template <class F>
void dispatch_float(FloatDtype dtype, F&& f) {
  if (dtype == FloatDtype::f64) {
    f(double{});
  } else {
    f(float{});
  }
}

}  // namespace jmp_ext
