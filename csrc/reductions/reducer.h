// The one Reducer shared by the CPU and CUDA kernels (sum, mean, max), and the dtype helpers
// both backends use: bfloat16 is carried as its uint16 bit pattern (no torch, no cuda_bf16.h in
// the core) and every reduction accumulates in acc_t<T> (float for bf16 and f32, double for
// f64).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/check.h"
#include "common/hd.h"
#include "reductions/reductions.h"

namespace jmp_ext::reductions {

// bfloat16 as its 16 bits: the top half of an IEEE float32.
struct bf16 {
  uint16_t bits;
};

JMP_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

JMP_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// Conversions between storage type T and accumulation type acc_t<T>. bf16 rounds to nearest
// even, as torch does; NaN stays a (quiet) NaN with its sign.
template <class T>
struct Acc {
  using type = T;
  static JMP_HD T load(T x) { return x; }
  static JMP_HD T store(T x) { return x; }
};

template <>
struct Acc<bf16> {
  using type = float;
  static JMP_HD float load(bf16 x) { return bits_float(uint32_t{x.bits} << 16); }
  static JMP_HD bf16 store(float x) {
    uint32_t u = float_bits(x);
    if (x != x) return bf16{static_cast<uint16_t>((u >> 16) | 0x0040u)};
    u += 0x7FFFu + ((u >> 16) & 1u);
    return bf16{static_cast<uint16_t>(u >> 16)};
  }
};

template <class T>
using acc_t = typename Acc<T>::type;

// Calls f(T{}) with the storage type that `dtype` names.
template <class F>
decltype(auto) dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32:
      return f(float{});
    case Dtype::f64:
      return f(double{});
    case Dtype::bf16:
      return f(bf16{});
  }
  throw InvalidInput(detail::concat("unknown dtype code ", static_cast<int>(dtype)));
}

// Calls f(std::integral_constant<Reduce, r>{}) so the reduction is a compile-time choice.
template <class F>
decltype(auto) dispatch_reduce(Reduce reduce, F&& f) {
  switch (reduce) {
    case Reduce::sum:
      return f(std::integral_constant<Reduce, Reduce::sum>{});
    case Reduce::mean:
      return f(std::integral_constant<Reduce, Reduce::mean>{});
    case Reduce::max:
      return f(std::integral_constant<Reduce, Reduce::max>{});
  }
  throw InvalidInput(detail::concat("unknown reduction code ", static_cast<int>(reduce)));
}

// Calls f(U{}) with an unsigned integer type as wide as one element: copies move bits only.
template <class F>
void dispatch_elem(int elem_size, F&& f) {
  switch (elem_size) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
  }
  throw InvalidInput(detail::concat("element size must be 2, 4 or 8 bytes, got ", elem_size));
}

// init / update / merge / finish of one reduced value. `arg` is the position (in source order)
// of the element that max picked, kNoArg while the segment is empty; sum and mean ignore it.
// Ties and NaN for max: the first maximal element wins; the first NaN wins over any number.
template <Reduce R, class A>
struct Reducer {
  static JMP_HD A init() { return R == Reduce::max ? -std::numeric_limits<A>::infinity() : A(0); }

  static JMP_HD void update(A& acc, int64_t& arg, A value, int64_t position) {
    if constexpr (R == Reduce::max) {
      bool take = arg == kNoArg || value > acc || (value != value && acc == acc);
      if (take) {
        acc = value;
        arg = position;
      }
    } else {
      acc += value;
    }
  }

  // update() of max once the segment has an element (arg != kNoArg), as selects (& and |,
  // not && and ||, which are branches that stop the loop over features from vectorising).
  template <class Position>
  static JMP_HD void update_started(A& acc, Position& arg, A value, Position position) {
    bool take = (value > acc) | ((value != value) & (acc == acc));
    acc = take ? value : acc;
    arg = take ? position : arg;
  }

  // Combines the partial results of two disjoint parts of a segment (a before b in source
  // order), as the CUDA warp reduction does; the same tie rule as update().
  static JMP_HD void merge(A& acc, int64_t& arg, A other, int64_t other_arg) {
    if constexpr (R == Reduce::max) {
      if (other_arg == kNoArg) return;
      bool take = arg == kNoArg || other > acc || (other != other && acc == acc) ||
                  (other == acc && other_arg < arg) ||
                  (other != other && acc != acc && other_arg < arg);
      if (take) {
        acc = other;
        arg = other_arg;
      }
    } else {
      acc += other;
    }
  }

  // The value written out for a segment of `count` elements; empty segments give 0.
  static JMP_HD A finish(A acc, int64_t count) {
    if (count == 0) return A(0);
    if constexpr (R == Reduce::mean) return acc / static_cast<A>(count);
    return acc;
  }
};

}  // namespace jmp_ext::reductions
