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
}
