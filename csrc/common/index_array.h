// A read-only array of row indices in either of torch's index dtypes.
//
// The interaction indices are int32 when they fit (half the memory traffic of int64 in the
// model's gathers), while users and torch hand in int64; the kernels that read an index take
// either, through this view, and widen each value to int64 as they read it.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace jmp_ext {

struct IndexArray {
  const void* data = nullptr;  // int32_t[n] or int64_t[n], or null for "no index"
  bool is_int32 = false;

  JMP_HD int64_t operator[](int64_t i) const {
    return is_int32 ? static_cast<const int32_t*>(data)[i] : static_cast<const int64_t*>(data)[i];
  }
  JMP_HD explicit operator bool() const { return data != nullptr; }
};

// Calls f(p) with p the index as a typed pointer (const int32_t* or const int64_t*), so that a
// hot loop reads it without a branch per element.
template <class F>
decltype(auto) visit_index(IndexArray index, F&& f) {
  if (index.is_int32) return f(static_cast<const int32_t*>(index.data));
  return f(static_cast<const int64_t*>(index.data));
}

}  // namespace jmp_ext
