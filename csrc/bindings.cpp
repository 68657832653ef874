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

#ifdef JMP_EXT_WITH_CUDA
cudaStream_t stream(uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }
#endif

using nogil = py::call_guard<py::gil_scoped_release>;

// ---- interaction_indices helpers ----
namespace ii = jmp_ext::interaction_indices;

// A graph from the addresses of its edge_index [2,E] int64 and cell_offset [E,3] int32.
ii::Graph graph(uintptr_t edge_index, uintptr_t cell_offset, int64_t num_edges) {
  const int64_t* rows = ptr<const int64_t>(edge_index);
  return {rows, rows + num_edges, ptr<const int32_t>(cell_offset), num_edges};
}

ii::TripletArgs triplet_args(uintptr_t in_edge_index, uintptr_t in_cell_offset, int64_t in_edges,
                             uintptr_t out_edge_index, uintptr_t out_cell_offset,
                             int64_t out_edges, int pairing, int64_t num_atoms,
                             uintptr_t in_ptr, uintptr_t in_order, uintptr_t offsets) {
  ii::TripletArgs args;
  args.in = graph(in_edge_index, in_cell_offset, in_edges);
  args.out = graph(out_edge_index, out_cell_offset, out_edges);
  JMP_CHECK(pairing >= 0 && pairing <= 2, "unknown pairing ", pairing);
  args.pairing = static_cast<ii::Pairing>(pairing);
  args.num_atoms = num_atoms;
  args.out_name = pairing == 0 ? "graph" : "graph_out";
  args.in_ptr = ptr<const int64_t>(in_ptr);
  args.in_order = ptr<const int64_t>(in_order);
  args.offsets = ptr<int64_t>(offsets);
  return args;
}

ii::QuadArgs quad_args(uintptr_t main_edge_index, uintptr_t main_cell_offset, int64_t main_edges,
                       uintptr_t qint_edge_index, uintptr_t qint_cell_offset, int64_t qint_edges,
                       uintptr_t tin_ptr, uintptr_t tin_in, uintptr_t tout_ptr,
                       uintptr_t tout_in, uintptr_t offsets) {
  ii::QuadArgs args;
  args.main = graph(main_edge_index, main_cell_offset, main_edges);
  args.qint = graph(qint_edge_index, qint_cell_offset, qint_edges);
  args.tin_ptr = ptr<const int64_t>(tin_ptr);
  args.tin_in = ptr<const int64_t>(tin_in);
  args.tout_ptr = ptr<const int64_t>(tout_ptr);
  args.tout_in = ptr<const int64_t>(tout_in);
  args.offsets = ptr<int64_t>(offsets);
  return args;
}

// The fill passes take the count pass's arguments plus the output addresses.
ii::TripletArgs with_outputs(ii::TripletArgs args, uintptr_t idx_in, uintptr_t idx_out,
                             uintptr_t out_agg) {
  args.idx_in = ptr<int64_t>(idx_in);
  args.idx_out = ptr<int64_t>(idx_out);
  args.out_agg = ptr<int64_t>(out_agg);
  return args;
}

ii::QuadArgs with_outputs(ii::QuadArgs args, uintptr_t out, uintptr_t trip_out_to_quad,
                          uintptr_t trip_in_to_quad, uintptr_t out_agg) {
  args.out = ptr<int64_t>(out);
  args.trip_out_to_quad = ptr<int64_t>(trip_out_to_quad);
  args.trip_in_to_quad = ptr<int64_t>(trip_in_to_quad);
  args.out_agg = ptr<int64_t>(out_agg);
  return args;
}

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
  // RadiusGraphCpu(pos, dtype, num_atoms, ptr, num_systems, cell, pbc, cutoff, max_neighbors,
  // tolerance, max_edges, num_threads) validates, bins and counts; .num_edges; then
  // .fill(edge_index, cell_offsets, distance, num_threads) writes the caller's buffers.
  {
    namespace rg = jmp_ext::radius_graph;
    auto input = [](uintptr_t pos, int dtype, int64_t num_atoms, uintptr_t ptr_,
                    int64_t num_systems, uintptr_t cell, uintptr_t pbc, double cutoff,
                    int64_t max_neighbors, double tolerance, int64_t max_edges) {
      JMP_CHECK(dtype == 0 || dtype == 1, "radius_graph: unknown dtype code ", dtype);
      rg::Input in;
      in.pos = ptr<const void>(pos);
      in.dtype = static_cast<rg::Dtype>(dtype);
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
                          int num_threads) {
               return new rg::cpu::RadiusGraph(
                   input(pos, dtype, num_atoms, ptr_, num_systems, cell, pbc, cutoff,
                         max_neighbors, tolerance, max_edges),
                   num_threads);
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
  // then scratch and outputs, then num_threads / stream. pairing: 0 same graph, 1 shared
  // target, 2 in-target = out-source (see interaction_indices.h).
  m.def(
      "target_csr_cpu",
      [](uintptr_t edge_index, int64_t num_edges, int64_t num_atoms, const std::string& name,
         uintptr_t csr_ptr, uintptr_t csr_order, uintptr_t scratch, int num_threads) {
        ii::cpu::target_csr(graph(edge_index, 0, num_edges), num_atoms, name.c_str(),
                            {ptr<int64_t>(csr_ptr), ptr<int64_t>(csr_order)},
                            ptr<int64_t>(scratch), num_threads);
      },
      nogil());
  m.def(
      "count_triplets_cpu",
      [](uintptr_t in_ei, uintptr_t in_off, int64_t in_edges, uintptr_t out_ei, uintptr_t out_off,
         int64_t out_edges, int pairing, int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
         uintptr_t offsets, int num_threads) {
        return ii::cpu::count_triplets(triplet_args(in_ei, in_off, in_edges, out_ei, out_off,
                                                    out_edges, pairing, num_atoms, in_ptr,
                                                    in_order, offsets),
                                       num_threads);
      },
      nogil());
  m.def(
      "fill_triplets_cpu",
      [](uintptr_t in_ei, uintptr_t in_off, int64_t in_edges, uintptr_t out_ei, uintptr_t out_off,
         int64_t out_edges, int pairing, int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
         uintptr_t offsets, uintptr_t idx_in, uintptr_t idx_out, uintptr_t out_agg,
         int num_threads) {
        ii::cpu::fill_triplets(
            with_outputs(triplet_args(in_ei, in_off, in_edges, out_ei, out_off, out_edges, pairing,
                                      num_atoms, in_ptr, in_order, offsets),
                         idx_in, idx_out, out_agg),
            num_threads);
      },
      nogil());
  m.def(
      "count_quadruplets_cpu",
      [](uintptr_t main_ei, uintptr_t main_off, int64_t main_edges, uintptr_t qint_ei,
         uintptr_t qint_off, int64_t qint_edges, uintptr_t tin_ptr, uintptr_t tin_in,
         uintptr_t tout_ptr, uintptr_t tout_in, uintptr_t offsets, int num_threads) {
        return ii::cpu::count_quadruplets(quad_args(main_ei, main_off, main_edges, qint_ei,
                                                    qint_off, qint_edges, tin_ptr, tin_in,
                                                    tout_ptr, tout_in, offsets),
                                          num_threads);
      },
      nogil());
  m.def(
      "fill_quadruplets_cpu",
      [](uintptr_t main_ei, uintptr_t main_off, int64_t main_edges, uintptr_t qint_ei,
         uintptr_t qint_off, int64_t qint_edges, uintptr_t tin_ptr, uintptr_t tin_in,
         uintptr_t tout_ptr, uintptr_t tout_in, uintptr_t offsets, uintptr_t out,
         uintptr_t trip_out_to_quad, uintptr_t trip_in_to_quad, uintptr_t out_agg,
         int num_threads) {
        ii::cpu::fill_quadruplets(
            with_outputs(quad_args(main_ei, main_off, main_edges, qint_ei, qint_off, qint_edges,
                                   tin_ptr, tin_in, tout_ptr, tout_in, offsets),
                         out, trip_out_to_quad, trip_in_to_quad, out_agg),
            num_threads);
      },
      nogil());
#ifdef JMP_EXT_WITH_CUDA
  // The CUDA entries take the same arguments with the stream last; they do not synchronise.
  // The TargetCsr and the prefix sums are torch ops on the GPU (see interaction_indices.h), so
  // the counts return nothing: they fill offsets[1..E].
  m.def(
      "count_triplets_cuda",
      [](uintptr_t in_ei, uintptr_t in_off, int64_t in_edges, uintptr_t out_ei, uintptr_t out_off,
         int64_t out_edges, int pairing, int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
         uintptr_t offsets, uintptr_t stream_) {
        ii::cuda::count_triplets(triplet_args(in_ei, in_off, in_edges, out_ei, out_off, out_edges,
                                              pairing, num_atoms, in_ptr, in_order, offsets),
                                 stream(stream_));
      },
      nogil());
  m.def(
      "fill_triplets_cuda",
      [](uintptr_t in_ei, uintptr_t in_off, int64_t in_edges, uintptr_t out_ei, uintptr_t out_off,
         int64_t out_edges, int pairing, int64_t num_atoms, uintptr_t in_ptr, uintptr_t in_order,
         uintptr_t offsets, uintptr_t idx_in, uintptr_t idx_out, uintptr_t out_agg,
         uintptr_t stream_) {
        ii::cuda::fill_triplets(
            with_outputs(triplet_args(in_ei, in_off, in_edges, out_ei, out_off, out_edges, pairing,
                                      num_atoms, in_ptr, in_order, offsets),
                         idx_in, idx_out, out_agg),
            stream(stream_));
      },
      nogil());
  m.def(
      "count_quadruplets_cuda",
      [](uintptr_t main_ei, uintptr_t main_off, int64_t main_edges, uintptr_t qint_ei,
         uintptr_t qint_off, int64_t qint_edges, uintptr_t tin_ptr, uintptr_t tin_in,
         uintptr_t tout_ptr, uintptr_t tout_in, uintptr_t offsets, uintptr_t stream_) {
        ii::cuda::count_quadruplets(quad_args(main_ei, main_off, main_edges, qint_ei, qint_off,
                                              qint_edges, tin_ptr, tin_in, tout_ptr, tout_in,
                                              offsets),
                                    stream(stream_));
      },
      nogil());
  m.def(
      "fill_quadruplets_cuda",
      [](uintptr_t main_ei, uintptr_t main_off, int64_t main_edges, uintptr_t qint_ei,
         uintptr_t qint_off, int64_t qint_edges, uintptr_t tin_ptr, uintptr_t tin_in,
         uintptr_t tout_ptr, uintptr_t tout_in, uintptr_t offsets, uintptr_t out,
         uintptr_t trip_out_to_quad, uintptr_t trip_in_to_quad, uintptr_t out_agg,
         uintptr_t stream_) {
        ii::cuda::fill_quadruplets(
            with_outputs(quad_args(main_ei, main_off, main_edges, qint_ei, qint_off, qint_edges,
                                   tin_ptr, tin_in, tout_ptr, tout_in, offsets),
                         out, trip_out_to_quad, trip_in_to_quad, out_agg),
            stream(stream_));
      },
      nogil());
#endif

  // ---- gaussian_basis (csrc/gaussian_basis) ----
  {
    namespace gb = jmp_ext::gaussian_basis;
    auto args = [](uintptr_t x, uintptr_t offset, uintptr_t temps, uintptr_t out, int64_t num_edges,
                   int64_t num_radial, int dtype) {
      JMP_CHECK(dtype == 0 || dtype == 1, "gaussian_basis: unknown dtype code ", dtype);
      return gb::Args{ptr<const void>(x), ptr<const void>(offset), ptr<const void>(temps),
                      ptr<void>(out), num_edges, num_radial, static_cast<gb::Dtype>(dtype)};
    };
    m.def("gaussian_basis_cpu",
          [=](uintptr_t x, uintptr_t offset, uintptr_t temps, uintptr_t out, int64_t num_edges,
              int64_t num_radial, int dtype, int num_threads) {
            gb::cpu::gaussian_basis(args(x, offset, temps, out, num_edges, num_radial, dtype),
                                    num_threads);
          },
          nogil());
#ifdef JMP_EXT_WITH_CUDA
    m.def("gaussian_basis_cuda",
          [=](uintptr_t x, uintptr_t offset, uintptr_t temps, uintptr_t out, int64_t num_edges,
              int64_t num_radial, int dtype, uintptr_t stream_) {
            gb::cuda::gaussian_basis(args(x, offset, temps, out, num_edges, num_radial, dtype),
                                     stream(stream_));
          },
          nogil());
#endif
  }

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
    auto bilinear_args = [](uintptr_t x, uintptr_t y, uintptr_t ptr_, uintptr_t out, int64_t num_src,
                            int64_t num_segments, int64_t rows, int64_t cols, int dtype) {
      return red::SegmentBilinearArgs{ptr<const void>(x), ptr<const void>(y), ptr<const int64_t>(ptr_),
                                      ptr<void>(out), num_src, num_segments, rows, cols,
                                      static_cast<red::Dtype>(dtype)};
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
    m.def("scatter_reduce_cpu",
          [](uintptr_t src, uintptr_t index, uintptr_t out, int64_t num_src, int64_t dim_size,
             int64_t features, int dtype, int reduce, int num_threads) {
            red::cpu::scatter_reduce({ptr<const void>(src), ptr<const int64_t>(index),
                                      ptr<void>(out), num_src, dim_size, features,
                                      static_cast<red::Dtype>(dtype),
                                      static_cast<red::Reduce>(reduce)},
                                     num_threads);
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
    m.def("segment_outer_cpu",
          [=](uintptr_t x, uintptr_t y, uintptr_t ptr_, uintptr_t out, int64_t num_src,
              int64_t num_segments, int64_t rows, int64_t cols, int dtype, int num_threads) {
            red::cpu::segment_outer(bilinear_args(x, y, ptr_, out, num_src, num_segments, rows, cols, dtype),
                                    num_threads);
          },
          nogil());
    m.def("segment_contract_cpu",
          [=](uintptr_t x, uintptr_t y, uintptr_t ptr_, uintptr_t out, int64_t num_src,
              int64_t num_segments, int64_t rows, int64_t cols, int dtype, int num_threads) {
            red::cpu::segment_contract(bilinear_args(x, y, ptr_, out, num_src, num_segments, rows, cols, dtype),
                                       num_threads);
          },
          nogil());
#ifdef JMP_EXT_WITH_CUDA
    // The CUDA entries take the CPU arguments, then the address of a device int64 status word
    // set to kNoError (see common/cuda_helpers.h) and the stream.
    m.def("segment_reduce_cuda",
          [=](uintptr_t src, uintptr_t ptr_, uintptr_t perm, uintptr_t out, uintptr_t arg,
              int64_t num_src, int64_t num_segments, int64_t features, int dtype, int reduce,
              uintptr_t status, uintptr_t stream_) {
            red::cuda::segment_reduce(segment_args(src, ptr_, perm, out, arg, num_src,
                                                   num_segments, features, dtype, reduce),
                                      ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("scatter_add_atomic_cuda",
          [](uintptr_t src, int dtype, uintptr_t index, int64_t n, int64_t features,
             int64_t dim_size, uintptr_t acc, uintptr_t status, uintptr_t stream_) {
            red::cuda::scatter_add_atomic(ptr<const void>(src), static_cast<red::Dtype>(dtype),
                                          ptr<const int64_t>(index), n, features, dim_size,
                                          ptr<void>(acc), ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("gather_cuda",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t index,
              int64_t num_index, int64_t num_src_rows, uintptr_t status, uintptr_t stream_) {
            red::cuda::gather(row_copy(src, out, features, elem_size), ptr<const int64_t>(index),
                              num_index, num_src_rows, ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("segment_broadcast_cuda",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t ptr_,
              int64_t num_segments, int64_t num_out_rows, uintptr_t status, uintptr_t stream_) {
            red::cuda::segment_broadcast(row_copy(src, out, features, elem_size),
                                         ptr<const int64_t>(ptr_), num_segments, num_out_rows,
                                         ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("ragged_to_padded_cuda",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t row,
              uintptr_t col, int64_t num_items, int64_t num_rows, int64_t num_cols,
              uintptr_t slots, uintptr_t status, uintptr_t stream_) {
            red::cuda::ragged_to_padded(row_copy(src, out, features, elem_size),
                                        padded_index(row, col, num_items, num_rows, num_cols, slots),
                                        ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("padded_to_ragged_cuda",
          [=](uintptr_t src, uintptr_t out, int64_t features, int elem_size, uintptr_t row,
              uintptr_t col, int64_t num_items, int64_t num_rows, int64_t num_cols,
              uintptr_t slots, uintptr_t status, uintptr_t stream_) {
            red::cuda::padded_to_ragged(row_copy(src, out, features, elem_size),
                                        padded_index(row, col, num_items, num_rows, num_cols, slots),
                                        ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("segment_outer_cuda",
          [=](uintptr_t x, uintptr_t y, uintptr_t ptr_, uintptr_t out, int64_t num_src,
              int64_t num_segments, int64_t rows, int64_t cols, int dtype, uintptr_t status,
              uintptr_t stream_) {
            red::cuda::segment_outer(bilinear_args(x, y, ptr_, out, num_src, num_segments, rows, cols, dtype),
                                     ptr<int64_t>(status), stream(stream_));
          },
          nogil());
    m.def("segment_contract_cuda",
          [=](uintptr_t x, uintptr_t y, uintptr_t ptr_, uintptr_t out, int64_t num_src,
              int64_t num_segments, int64_t rows, int64_t cols, int dtype, uintptr_t status,
              uintptr_t stream_) {
            red::cuda::segment_contract(bilinear_args(x, y, ptr_, out, num_src, num_segments, rows, cols, dtype),
                                        ptr<int64_t>(status), stream(stream_));
          },
          nogil());
#endif
  }
}
