// The one pybind11 file: exposes the torch-free kernels of csrc/ to Python as jmp_ext._C.
//
// Tensors cross this boundary as raw addresses (uintptr_t from tensor.data_ptr()), sizes and,
// for CUDA kernels, the address of the current cudaStream_t. Python owns all memory: it
// allocates outputs and scratch with torch and checks shapes, dtypes and devices before calling
// here. The GIL is released while kernels run. jmp_ext::InvalidInput becomes ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "common/check.h"
#include "reductions/reductions.h"

#ifdef JMP_EXT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

#ifdef JMP_EXT_WITH_CUDA
cudaStream_t stream(uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }
#endif

using nogil = py::call_guard<py::gil_scoped_release>;

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "jmp_ext compiled kernels (torch-free core; see python/jmp_ext/ops for the ops)";
  py::register_exception<jmp_ext::InvalidInput>(m, "InvalidInput", PyExc_ValueError);

  m.def("build_info", [] {
    py::dict info;
    info["version"] = JMP_EXT_VERSION;
#ifdef JMP_EXT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = CUDART_VERSION;
#else
    info["cuda"] = false;
    info["cuda_version"] = py::none();
#endif
    return info;
  });

  // ---- radius_graph (csrc/radius_graph) ----

  // ---- interaction_indices (csrc/interaction_indices) ----

  // ---- reductions (csrc/reductions) ----
  {
    namespace red = jmp_ext::reductions;
    auto segment_args = [](uintptr_t src, uintptr_t ptr_, uintptr_t perm, uintptr_t out,
                           uintptr_t arg, int64_t num_src, int64_t num_segments, int64_t features,
                           int dtype, int reduce) {
      return red::SegmentReduceArgs{ptr<const void>(src), ptr<const int64_t>(ptr_),
                                    ptr<const int64_t>(perm), ptr<void>(out), ptr<int64_t>(arg),
                                    num_src, num_segments, features,
                                    static_cast<red::Dtype>(dtype), static_cast<red::Reduce>(reduce)};
    };
    auto row_copy = [](uintptr_t src, uintptr_t out, int64_t features, int elem_size) {
      return red::RowCopy{ptr<const void>(src), ptr<void>(out), features, elem_size};
    };
    auto padded_index = [](uintptr_t row, uintptr_t col, int64_t num_items, int64_t num_rows,
                           int64_t num_cols, uintptr_t slots) {
      return red::PaddedIndex{ptr<const int64_t>(row), ptr<const int64_t>(col), num_items,
                              num_rows, num_cols, ptr<int64_t>(slots)};
    };
    m.def("segment_reduce_cpu",
          [=](uintptr_t src, uintptr_t ptr_, uintptr_t perm, uintptr_t out, uintptr_t arg,
              int64_t num_src, int64_t num_segments, int64_t features, int dtype, int reduce,
              int num_threads) {
            red::cpu::segment_reduce(segment_args(src, ptr_, perm, out, arg, num_src,
                                                  num_segments, features, dtype, reduce),
                                     num_threads);
          },
          nogil());
    m.def("index_to_csr_cpu",
          [](uintptr_t index, int64_t n, int64_t dim_size, uintptr_t ptr_, uintptr_t perm,
             int num_threads) {
            red::cpu::index_to_csr(ptr<const int64_t>(index), n, dim_size, ptr<int64_t>(ptr_),
                                   ptr<int64_t>(perm), num_threads);
          },
          nogil());
    m.def("gather_cpu",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t index,
              int64_t num_index, int64_t num_src_rows, int num_threads) {
            red::cpu::gather(row_copy(src, out, features, elem_size), ptr<const int64_t>(index),
                             num_index, num_src_rows, num_threads);
          },
          nogil());
    m.def("segment_broadcast_cpu",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t ptr_,
              int64_t num_segments, int64_t num_out_rows, int num_threads) {
            red::cpu::segment_broadcast(row_copy(src, out, features, elem_size),
                                        ptr<const int64_t>(ptr_), num_segments, num_out_rows,
                                        num_threads);
          },
          nogil());
    m.def("ragged_to_padded_cpu",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t row,
              uintptr_t col, int64_t num_items, int64_t num_rows, int64_t num_cols,
              uintptr_t slots, int num_threads) {
            red::cpu::ragged_to_padded(row_copy(src, out, features, elem_size),
                                       padded_index(row, col, num_items, num_rows, num_cols, slots),
                                       num_threads);
          },
          nogil());
    m.def("padded_to_ragged_cpu",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t row,
              uintptr_t col, int64_t num_items, int64_t num_rows, int64_t num_cols,
              uintptr_t slots, int num_threads) {
            red::cpu::padded_to_ragged(row_copy(src, out, features, elem_size),
                                       padded_index(row, col, num_items, num_rows, num_cols, slots),
                                       num_threads);
          },
          nogil());
  }
}
