// The one pybind11 file: exposes the torch-free kernels of csrc/ to Python as jmp_ext._C.
//
// Tensors cross this boundary as raw addresses (uintptr_t from tensor.data_ptr()), sizes and,
// for CUDA kernels, the address of the current cudaStream_t. Python owns all memory: it
// allocates outputs and scratch with torch and checks shapes, dtypes and devices before calling
// here. The GIL is released while kernels run. jmp_ext::InvalidInput becomes ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/check.h"
#include "gaussian_basis/gaussian_basis.h"
#include "interaction_indices/interaction_indices.h"
#include "radius_graph/radius_graph.h"
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

// A row index of dtype int32 (is_int32) or int64, as python/jmp_ext/ops/_lib.py's index_arg() passes it.
jmp_ext::IndexArray index_array(uintptr_t address, bool is_int32) {
  return {ptr<const void>(address), is_int32};
}

// The dtype of an op that takes float32 or float64 (python/jmp_ext/ops passes 0 or 1).
jmp_ext::FloatDtype float_dtype(int code, const char* op) {
  JMP_CHECK(code == 0 || code == 1, op, ": unknown dtype code ", code);
  return static_cast<jmp_ext::FloatDtype>(code);
}

#ifdef JMP_EXT_WITH_CUDA
cudaStream_t stream(uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }
#endif

using nogil = py::call_guard<py::gil_scoped_release>;

// Where a kernel runs, as python/jmp_ext/ops/_lib.py's launch() passes it: on the CPU with
// num_threads threads, or on a CUDA stream, with a device int64 status word for the kernels that
// report bad indices (common/cuda_helpers.h; 0 for the others). One binding per operator then
// serves both backends.
struct Where {
  bool cuda;
  int num_threads;
  uintptr_t status;
  uintptr_t stream;
};

#ifdef JMP_EXT_WITH_CUDA
int64_t* status(const Where& where) { return ptr<int64_t>(where.status); }
// The CUDA branch of a binding; _lib.require_cuda has already refused CUDA tensors when the
// extension was built without CUDA, so in such a build the branch is unreachable.
#define JMP_CUDA_ONLY(call) return call
#else
#define JMP_CUDA_ONLY(call) throw jmp_ext::Error("jmp_ext was built without CUDA kernels")
#endif

// ---- interaction_indices helpers ----
namespace ii = jmp_ext::interaction_indices;

// A graph from the addresses of its edge_index [2,E] int64 and cell_offset [E,3] int32.
ii::Graph graph(uintptr_t edge_index, uintptr_t cell_offset, int64_t num_edges) {
  const int64_t* rows = ptr<const int64_t>(edge_index);
  return {rows, rows + num_edges, ptr<const int32_t>(cell_offset), num_edges};
}

template <class Index>
ii::TripletArgs<Index> triplet_args(uintptr_t in_edge_index, uintptr_t in_cell_offset,
                                    int64_t in_edges, uintptr_t out_edge_index,
                                    uintptr_t out_cell_offset, int64_t out_edges, int pairing,
                                    int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
                                    uintptr_t offsets, const char* out_name = "out") {
  ii::TripletArgs<Index> args;
  args.in = graph(in_edge_index, in_cell_offset, in_edges);
  args.out = graph(out_edge_index, out_cell_offset, out_edges);
  JMP_CHECK(pairing >= 0 && pairing <= 2, "unknown pairing ", pairing);
  args.pairing = static_cast<ii::Pairing>(pairing);
  args.num_atoms = num_atoms;
  args.out_name = out_name;
  args.in_ptr = ptr<const int64_t>(in_ptr);
  args.in_order = ptr<const int64_t>(in_order);
  args.offsets = ptr<int64_t>(offsets);
  return args;
}

template <class Index>
ii::QuadArgs<Index> quad_args(uintptr_t main_edge_index, uintptr_t main_cell_offset,
                              int64_t main_edges, uintptr_t qint_edge_index,
                              uintptr_t qint_cell_offset, int64_t qint_edges, uintptr_t tin_ptr,
                              uintptr_t tin_in, uintptr_t tout_ptr, uintptr_t tout_in,
                              uintptr_t candidates, uintptr_t offsets) {
  ii::QuadArgs<Index> args;
  args.main = graph(main_edge_index, main_cell_offset, main_edges);
  args.qint = graph(qint_edge_index, qint_cell_offset, qint_edges);
  args.tin_ptr = ptr<const int64_t>(tin_ptr);
  args.tin_in = ptr<const Index>(tin_in);
  args.tout_ptr = ptr<const int64_t>(tout_ptr);
  args.tout_in = ptr<const Index>(tout_in);
  args.candidates = ptr<int64_t>(candidates);
  args.offsets = ptr<int64_t>(offsets);
  return args;
}

// The fill passes take the count pass's arguments plus the output addresses.
template <class Index>
ii::TripletArgs<Index> with_outputs(ii::TripletArgs<Index> args, uintptr_t idx_in,
                                    uintptr_t idx_out, uintptr_t out_agg) {
  args.idx_in = ptr<Index>(idx_in);
  args.idx_out = ptr<Index>(idx_out);
  args.out_agg = ptr<Index>(out_agg);
  return args;
}

template <class Index>
ii::QuadArgs<Index> with_outputs(ii::QuadArgs<Index> args, uintptr_t out,
                                 uintptr_t trip_out_to_quad, uintptr_t trip_in_to_quad,
                                 uintptr_t out_agg) {
  args.out = ptr<Index>(out);
  args.trip_out_to_quad = ptr<Index>(trip_out_to_quad);
  args.trip_in_to_quad = ptr<Index>(trip_in_to_quad);
  args.out_agg = ptr<Index>(out_agg);
  return args;
}

// Calls f(Index{}) with Index = int32_t when the op's indices are int32, else int64_t.
template <class F>
decltype(auto) with_index_type(bool index_is_int32, F&& f) {
  if (index_is_int32) return f(int32_t{});
  return f(int64_t{});
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "jmp_ext compiled kernels (torch-free core; see python/jmp_ext/ops for the ops)";
  py::register_exception<jmp_ext::InvalidInput>(m, "InvalidInput", PyExc_ValueError);
  py::class_<Where>(m, "Where")
      .def(py::init<bool, int, uintptr_t, uintptr_t>(), py::arg("cuda"), py::arg("num_threads"),
           py::arg("status"), py::arg("stream"));

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
    info["cpu_bilinear_isa"] = jmp_ext::reductions::cpu::bilinear_isa();
    return info;
  });
#ifdef JMP_EXT_WITH_CUDA
  // The CUDA version the installed driver supports (e.g. 12080), 0 without a driver: the
  // statically linked runtime (build_info's cuda_version) needs one of its major version.
  m.def("cuda_driver_version", [] {
    int version = 0;
    if (cudaDriverGetVersion(&version) != cudaSuccess) version = 0;
    return version;
  });
#endif

  // ---- radius_graph (csrc/radius_graph) ----
  // RadiusGraphCpu(pos, dtype, num_atoms, ptr, num_systems, cell, pbc, cutoff, max_neighbors,
  // tolerance, max_edges, advise_huge_pages, num_threads) validates, bins and counts; .num_edges; then
  // .fill(edge_index, cell_offsets, distance, num_threads) writes the caller's buffers.
  {
    namespace rg = jmp_ext::radius_graph;
    auto input = [](uintptr_t pos, int dtype, int64_t num_atoms, uintptr_t ptr_,
                    int64_t num_systems, uintptr_t cell, uintptr_t pbc, double cutoff,
                    int64_t max_neighbors, double tolerance, int64_t max_edges) {
      rg::Input in;
      in.pos = ptr<const void>(pos);
      in.dtype = float_dtype(dtype, "radius_graph");
      in.num_atoms = num_atoms;
      in.ptr = ptr<const int64_t>(ptr_);
      in.num_systems = num_systems;
      in.cell = ptr<const double>(cell);
      in.pbc = ptr<const bool>(pbc);
      in.cutoff = cutoff;
      in.max_neighbors = max_neighbors;
      in.tolerance = tolerance;
      in.max_edges = max_edges;
      return in;
    };
    py::class_<rg::cpu::RadiusGraph>(m, "RadiusGraphCpu")
        .def(py::init([=](uintptr_t pos, int dtype, int64_t num_atoms, uintptr_t ptr_,
                          int64_t num_systems, uintptr_t cell, uintptr_t pbc, double cutoff,
                          int64_t max_neighbors, double tolerance, int64_t max_edges,
                          bool advise_huge_pages, int num_threads) {
               rg::Input in = input(pos, dtype, num_atoms, ptr_, num_systems, cell, pbc, cutoff,
                                    max_neighbors, tolerance, max_edges);
               in.advise_huge_pages = advise_huge_pages;
               return new rg::cpu::RadiusGraph(in, num_threads);
             }),
             nogil())
        .def_property_readonly("num_edges", &rg::cpu::RadiusGraph::num_edges)
        .def(
            "fill",
            [](const rg::cpu::RadiusGraph& self, uintptr_t edge_index, uintptr_t cell_offsets,
               uintptr_t distance, int num_threads) {
              self.fill({ptr<int64_t>(edge_index), ptr<int32_t>(cell_offsets),
                         ptr<void>(distance)},
                        num_threads);
            },
            nogil());
    // radius_graph_check_input(num_atoms, ptr, num_systems, cutoff, max_neighbors, tolerance,
    // max_edges): the checks of both backends, on a host ptr (the CUDA path's, before it is
    // copied over).
    m.def("radius_graph_check_input", [=](int64_t num_atoms, uintptr_t ptr_, int64_t num_systems,
                                         double cutoff, int64_t max_neighbors, double tolerance,
                                         int64_t max_edges) {
      rg::check_input(input(0, 0, num_atoms, ptr_, num_systems, 0, 0, cutoff, max_neighbors,
                            tolerance, max_edges));
    });
    m.def("radius_graph_sizes", [] {
      return py::dict(py::arg("frame") = sizeof(rg::Frame), py::arg("placed") = sizeof(rg::Placed),
                      py::arg("errors") = int{rg::kNumCudaErrors});
    });
#ifdef JMP_EXT_WITH_CUDA
    // The CUDA steps take the input as for RadiusGraphCpu (ptr, cell, pbc on the GPU), the
    // workspace as 12 addresses in Workspace's field order, then the stream.
    auto workspace = [](const std::vector<uintptr_t>& a) {
      JMP_CHECK(a.size() == 12, "radius_graph: the CUDA workspace has 12 buffers");
      rg::Workspace ws;
      ws.batch = ptr<const int64_t>(a[0]);
      ws.frames = ptr<rg::Frame>(a[1]);
      ws.placed = ptr<rg::Placed>(a[2]);
      ws.bin_start = ptr<int64_t>(a[3]);
      ws.cursor = ptr<int64_t>(a[4]);
      ws.wrapped = ptr<jmp_ext::Vec3>(a[5]);
      ws.position = ptr<jmp_ext::Vec3>(a[6]);
      ws.index = ptr<int64_t>(a[7]);
      ws.shift = ptr<int32_t>(a[8]);
      ws.offsets = ptr<int64_t>(a[9]);
      ws.top = ptr<double>(a[10]);
      ws.errors = ptr<unsigned long long>(a[11]);
      return ws;
    };
    m.def("radius_graph_step_cuda",
          [=](const std::string& step, uintptr_t pos, int dtype, int64_t num_atoms, uintptr_t ptr_,
              int64_t num_systems, uintptr_t cell, uintptr_t pbc, double cutoff,
              int64_t max_neighbors, double tolerance, int64_t max_edges,
              const std::vector<uintptr_t>& buffers, uintptr_t edge_index, uintptr_t cell_offsets,
              uintptr_t distance, int64_t num_edges, uintptr_t stream_) {
            rg::Input in = input(pos, dtype, num_atoms, ptr_, num_systems, cell, pbc, cutoff,
                                 max_neighbors, tolerance, max_edges);
            rg::Workspace ws = workspace(buffers);
            if (step == "bin") {
              rg::cuda::bin(in, ws, stream(stream_));
            } else if (step == "count") {
              rg::cuda::count(in, ws, stream(stream_));
            } else if (step == "fill") {
              rg::cuda::fill(in, ws,
                             {ptr<int64_t>(edge_index), ptr<int32_t>(cell_offsets),
                              ptr<void>(distance)},
                             num_edges, stream(stream_));
            } else {
              throw jmp_ext::InvalidInput("radius_graph: unknown CUDA step " + step);
            }
          },
          nogil());
#endif
  }

  // ---- interaction_indices (csrc/interaction_indices) ----
  // Arguments in order: graph(s) as (edge_index, cell_offset, num_edges) addresses and sizes,
  // then scratch, index_is_int32 (the type of the indices written, and of the triplets the
  // quadruplet passes read) and outputs, then a Where. pairing: 0 same graph, 1 shared target,
  // 2 in-target = out-source (see interaction_indices.h). On CUDA the TargetCsr and the prefix sums are torch
  // ops (see interaction_indices.h): the counts fill offsets[1..E] and return -1 instead of the
  // total; the CUDA entries do not synchronise.
  m.def(
      "target_csr_cpu",
      [](uintptr_t edge_index, int64_t num_edges, int64_t num_atoms, const std::string& name,
         uintptr_t csr_ptr, uintptr_t csr_order, uintptr_t scratch) {
        ii::cpu::target_csr(graph(edge_index, 0, num_edges), num_atoms, name.c_str(),
                            {ptr<int64_t>(csr_ptr), ptr<int64_t>(csr_order)}, ptr<int64_t>(scratch));
      },
      nogil());
  m.def(
      "count_triplets",
      [](uintptr_t in_ei, uintptr_t in_off, int64_t in_edges, uintptr_t out_ei, uintptr_t out_off,
         int64_t out_edges, int pairing, int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
         uintptr_t offsets, bool index_is_int32, const std::string& out_name,
         const Where& where) -> int64_t {
        return with_index_type(index_is_int32, [&](auto index) -> int64_t {
          auto args = triplet_args<decltype(index)>(in_ei, in_off, in_edges, out_ei, out_off,
                                                    out_edges, pairing, num_atoms, in_ptr,
                                                    in_order, offsets, out_name.c_str());
          if (!where.cuda) return ii::cpu::count_triplets(args, where.num_threads);
          JMP_CUDA_ONLY((ii::cuda::count_triplets(args, stream(where.stream)), int64_t{-1}));
        });
      },
      nogil());
  m.def(
      "fill_triplets",
      [](uintptr_t in_ei, uintptr_t in_off, int64_t in_edges, uintptr_t out_ei, uintptr_t out_off,
         int64_t out_edges, int pairing, int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
         uintptr_t offsets, bool index_is_int32, uintptr_t idx_in, uintptr_t idx_out,
         uintptr_t out_agg, const Where& where) {
        with_index_type(index_is_int32, [&](auto index) {
          auto args = with_outputs(
              triplet_args<decltype(index)>(in_ei, in_off, in_edges, out_ei, out_off, out_edges,
                                            pairing, num_atoms, in_ptr, in_order, offsets),
              idx_in, idx_out, out_agg);
          if (!where.cuda) return ii::cpu::fill_triplets(args, where.num_threads);
          JMP_CUDA_ONLY(ii::cuda::fill_triplets(args, stream(where.stream)));
        });
      },
      nogil());
  m.def(
      "count_quadruplets",
      [](uintptr_t main_ei, uintptr_t main_off, int64_t main_edges, uintptr_t qint_ei,
         uintptr_t qint_off, int64_t qint_edges, uintptr_t tin_ptr, uintptr_t tin_in,
         uintptr_t tout_ptr, uintptr_t tout_in, uintptr_t candidates, uintptr_t offsets,
         bool index_is_int32,
         const Where& where) -> int64_t {
        return with_index_type(index_is_int32, [&](auto index) -> int64_t {
          auto args = quad_args<decltype(index)>(main_ei, main_off, main_edges, qint_ei, qint_off,
                                                 qint_edges, tin_ptr, tin_in, tout_ptr, tout_in,
                                                 candidates, offsets);
          if (!where.cuda) return ii::cpu::count_quadruplets(args, where.num_threads);
          JMP_CUDA_ONLY((ii::cuda::count_quadruplets(args, stream(where.stream)), int64_t{-1}));
        });
      },
      nogil());
  m.def(
      "fill_quadruplets",
      [](uintptr_t main_ei, uintptr_t main_off, int64_t main_edges, uintptr_t qint_ei,
         uintptr_t qint_off, int64_t qint_edges, uintptr_t tin_ptr, uintptr_t tin_in,
         uintptr_t tout_ptr, uintptr_t tout_in, uintptr_t candidates, uintptr_t offsets,
         bool index_is_int32,
         uintptr_t out, uintptr_t trip_out_to_quad, uintptr_t trip_in_to_quad, uintptr_t out_agg,
         const Where& where) {
        with_index_type(index_is_int32, [&](auto index) {
          auto args = with_outputs(
              quad_args<decltype(index)>(main_ei, main_off, main_edges, qint_ei, qint_off,
                                         qint_edges, tin_ptr, tin_in, tout_ptr, tout_in, candidates,
                                         offsets),
              out, trip_out_to_quad, trip_in_to_quad, out_agg);
          if (!where.cuda) return ii::cpu::fill_quadruplets(args, where.num_threads);
          JMP_CUDA_ONLY(ii::cuda::fill_quadruplets(args, stream(where.stream)));
        });
      },
      nogil());

  // ---- gaussian_basis (csrc/gaussian_basis) ----
  m.def(
      "gaussian_basis",
      [](uintptr_t x, uintptr_t offset, uintptr_t temps, uintptr_t scale, uintptr_t out,
         int64_t num_edges, int64_t num_radial, int dtype, const Where& where) {
        namespace gb = jmp_ext::gaussian_basis;
        gb::Args args{ptr<const void>(x),     ptr<const void>(offset), ptr<const void>(temps),
                      ptr<const void>(scale), ptr<void>(out),          num_edges,
                      num_radial,             float_dtype(dtype, "gaussian_basis")};
        if (!where.cuda) return gb::cpu::gaussian_basis(args, where.num_threads);
        JMP_CUDA_ONLY(gb::cuda::gaussian_basis(args, stream(where.stream)));
      },
      nogil());
  m.def(
      "gaussian_basis_backward",
      [](uintptr_t grad, uintptr_t x, uintptr_t offset, uintptr_t temps, uintptr_t scale,
         uintptr_t grad_x, uintptr_t grad_scale, int64_t num_edges, int64_t num_radial, int dtype,
         const Where& where) {
        namespace gb = jmp_ext::gaussian_basis;
        gb::BackwardArgs args{ptr<const void>(grad),  ptr<const void>(x),     ptr<const void>(offset),
                              ptr<const void>(temps), ptr<const void>(scale), ptr<void>(grad_x),
                              ptr<void>(grad_scale),  num_edges,              num_radial,
                              float_dtype(dtype, "gaussian_basis_backward")};
        if (!where.cuda) return gb::cpu::gaussian_basis_backward(args, where.num_threads);
        JMP_CUDA_ONLY(gb::cuda::gaussian_basis_backward(args, stream(where.stream)));
      },
      nogil());
  m.def(
      "gaussian_basis_second",
      [](uintptr_t grad, uintptr_t x, uintptr_t offset, uintptr_t temps, uintptr_t scale,
         uintptr_t grad_grad_x, uintptr_t grad_grad_scale, uintptr_t d_grad, uintptr_t d_x,
         uintptr_t d_scale, int64_t num_edges, int64_t num_radial, int dtype, const Where& where) {
        namespace gb = jmp_ext::gaussian_basis;
        gb::SecondArgs args{ptr<const void>(grad),        ptr<const void>(x),
                            ptr<const void>(offset),      ptr<const void>(temps),
                            ptr<const void>(scale),       ptr<const void>(grad_grad_x),
                            ptr<const void>(grad_grad_scale), ptr<void>(d_grad),
                            ptr<void>(d_x),               ptr<void>(d_scale),
                            num_edges,                    num_radial,
                            float_dtype(dtype, "gaussian_basis_second")};
        if (!where.cuda) return gb::cpu::gaussian_basis_second(args, where.num_threads);
        JMP_CUDA_ONLY(gb::cuda::gaussian_basis_second(args, stream(where.stream)));
      },
      nogil());

  // ---- reductions (csrc/reductions) ----
  // Each entry takes the addresses and sizes, then a Where; the CUDA kernels also get the
  // status word in which they report bad indices (common/cuda_helpers.h).
  {
    namespace red = jmp_ext::reductions;
    auto row_copy = [](uintptr_t src, uintptr_t out, int64_t features, int elem_size) {
      return red::RowCopy{ptr<const void>(src), ptr<void>(out), features, elem_size};
    };
    auto padded_index = [](uintptr_t row, bool row_is_int32, uintptr_t col, bool col_is_int32,
                           int64_t num_items, int64_t num_rows, int64_t num_cols, uintptr_t slots) {
      return red::PaddedIndex{index_array(row, row_is_int32), index_array(col, col_is_int32),
                              num_items, num_rows, num_cols, ptr<int64_t>(slots)};
    };
    m.def("segment_reduce",
          [](uintptr_t src, uintptr_t ptr_, uintptr_t perm, uintptr_t out, uintptr_t arg,
             int64_t num_src, int64_t num_segments, int64_t features, int dtype, int reduce,
             const Where& where) {
            red::SegmentReduceArgs args{ptr<const void>(src), ptr<const int64_t>(ptr_),
                                        ptr<const int64_t>(perm), ptr<void>(out), ptr<int64_t>(arg),
                                        num_src, num_segments, features,
                                        static_cast<red::Dtype>(dtype), static_cast<red::Reduce>(reduce)};
            if (!where.cuda) return red::cpu::segment_reduce(args, where.num_threads);
            JMP_CUDA_ONLY(red::cuda::segment_reduce(args, status(where), stream(where.stream)));
          },
          nogil());
    // CPU only: on CUDA a scatter is a sort + segment_reduce, or scatter_add_atomic.
    m.def("scatter_reduce_cpu",
          [](uintptr_t src, uintptr_t index, bool index_is_int32, uintptr_t out, int64_t num_src,
             int64_t dim_size, int64_t features, int dtype, int reduce, int num_threads) {
            red::cpu::scatter_reduce({ptr<const void>(src), index_array(index, index_is_int32),
                                      ptr<void>(out), num_src, dim_size, features,
                                      static_cast<red::Dtype>(dtype),
                                      static_cast<red::Reduce>(reduce)},
                                     num_threads);
          },
          nogil());
#ifdef JMP_EXT_WITH_CUDA
    m.def("scatter_add_atomic_cuda",
          [](uintptr_t src, int dtype, uintptr_t index, bool index_is_int32, int64_t n,
             int64_t features, int64_t dim_size, uintptr_t acc, const Where& where) {
            red::cuda::scatter_add_atomic(ptr<const void>(src), static_cast<red::Dtype>(dtype),
                                          index_array(index, index_is_int32), n, features, dim_size,
                                          ptr<void>(acc), status(where), stream(where.stream));
          },
          nogil());
#endif
    m.def("gather",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t index,
              bool index_is_int32, int64_t num_index, int64_t num_src_rows, const Where& where) {
            auto copy = row_copy(src, out, features, elem_size);
            auto idx = index_array(index, index_is_int32);
            if (!where.cuda) return red::cpu::gather(copy, idx, num_index, num_src_rows, where.num_threads);
            JMP_CUDA_ONLY(red::cuda::gather(copy, idx, num_index, num_src_rows, status(where),
                                            stream(where.stream)));
          },
          nogil());
    m.def("segment_broadcast",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t ptr_,
              int64_t num_segments, int64_t num_out_rows, const Where& where) {
            auto copy = row_copy(src, out, features, elem_size);
            auto p = ptr<const int64_t>(ptr_);
            if (!where.cuda)
              return red::cpu::segment_broadcast(copy, p, num_segments, num_out_rows, where.num_threads);
            JMP_CUDA_ONLY(red::cuda::segment_broadcast(copy, p, num_segments, num_out_rows,
                                                       status(where), stream(where.stream)));
          },
          nogil());
    // direction 0: ragged_to_padded, 1: padded_to_ragged (the same arguments either way).
    m.def("padded_copy",
          [=](int direction, uintptr_t src, uintptr_t out, int64_t features, int elem_size,
              uintptr_t row, bool row_is_int32, uintptr_t col, bool col_is_int32, int64_t num_items,
              int64_t num_rows, int64_t num_cols, uintptr_t slots, const Where& where) {
            JMP_CHECK(direction == 0 || direction == 1, "padded_copy: unknown direction ", direction);
            auto copy = row_copy(src, out, features, elem_size);
            auto index = padded_index(row, row_is_int32, col, col_is_int32, num_items, num_rows, num_cols, slots);
            if (!where.cuda) {
              return direction == 0 ? red::cpu::ragged_to_padded(copy, index, where.num_threads)
                                    : red::cpu::padded_to_ragged(copy, index, where.num_threads);
            }
            JMP_CUDA_ONLY(direction == 0
                              ? red::cuda::ragged_to_padded(copy, index, status(where), stream(where.stream))
                              : red::cuda::padded_to_ragged(copy, index, status(where), stream(where.stream)));
          },
          nogil());
    // kind 0: segment_outer, 1: segment_contract (each other's adjoints, the same arguments).
    m.def("segment_bilinear",
          [=](int kind, uintptr_t x, uintptr_t y, uintptr_t ptr_, uintptr_t out, int64_t num_src,
              int64_t num_segments, int64_t rows, int64_t cols, int64_t x_stride_r, int64_t x_stride_c,
              uintptr_t y_index, bool y_index_is_int32, int64_t num_y_rows, uintptr_t out_index,
              bool out_index_is_int32, int64_t num_out_rows, int dtype, const Where& where) {
            JMP_CHECK(kind == 0 || kind == 1, "segment_bilinear: unknown kind ", kind);
            JMP_CHECK((y_index == 0 && out_index == 0) || !where.cuda,
                      "segment_bilinear: y_index and out_index are only implemented by the CPU kernels");
            JMP_CHECK(out_index == 0 || kind == 1, "segment_bilinear: out_index is for segment_contract");
            red::SegmentBilinearArgs args{ptr<const void>(x), ptr<const void>(y), ptr<const int64_t>(ptr_),
                                          ptr<void>(out), num_src, num_segments, rows, cols,
                                          x_stride_r, x_stride_c, index_array(y_index, y_index_is_int32),
                                          num_y_rows, index_array(out_index, out_index_is_int32),
                                          num_out_rows,
                                          static_cast<red::Dtype>(dtype)};
            if (!where.cuda) {
              return kind == 0 ? red::cpu::segment_outer(args, where.num_threads)
                               : red::cpu::segment_contract(args, where.num_threads);
            }
            JMP_CUDA_ONLY(kind == 0 ? red::cuda::segment_outer(args, status(where), stream(where.stream))
                                    : red::cuda::segment_contract(args, status(where), stream(where.stream)));
          },
          nogil());
  }
}
