// CUDA radius graph: the same cell list (cell_list.h) and edge order as the CPU kernel.
//
// Launch sequence (radius_graph.h): frames (a block per system), guard (one block), place (a
// thread per atom, atomic bin counts), [caller scans bin_start], scatter atoms into bins, count
// (a thread per target), [caller scans offsets and reads the total: the one host sync], fill (a
// thread per target keeps its edges sorted, by insertion, inside its own output range). The
// order of atoms inside a bin depends on atomics, but each target's edges are fully sorted by
// (distance, source, shift), so the output is deterministic and equal to the CPU's, distances
// included (both files build without fused multiply-adds: CMakeLists.txt).
#include <cstdint>

#include "common/check.h"
#include "common/hd.h"
#include "radius_graph/radius_graph.h"

namespace jmp_ext::radius_graph::cuda {
namespace {

using jmp_ext::cuda::ceil_div;
using jmp_ext::cuda::kBlock;

__device__ void flag(unsigned long long* errors, int slot, int64_t what) {
  atomicMin(errors + slot, static_cast<unsigned long long>(what));
}

__device__ bool failed(const unsigned long long* errors) {
  for (int k = 0; k < kHopelessEdges; ++k)
    if (errors[k] != kNoError) return true;
  return false;
}

// A block per system: basis, extent on open axes (block reduction), bins, search cost.
template <class T>
__global__ void frames_kernel(const T* pos, const int64_t* ptr, const double* cell,
                              const bool* pbc, double cutoff, Frame* frames,
                              unsigned long long* errors) {
  const int64_t b = blockIdx.x;
  const int64_t begin = ptr[b], end = ptr[b + 1];
  __shared__ Frame frame;
  __shared__ int ok;
  __shared__ double lo[3][kBlock], hi[3][kBlock];
  if (threadIdx.x == 0) {
    const double* c = cell + 9 * b;
    Mat3 m{{{c[0], c[1], c[2]}, {c[3], c[4], c[5]}, {c[6], c[7], c[8]}}};
    FrameStatus status = make_basis(m, pbc + 3 * b, frame);
    ok = status == FrameStatus::kOk;
    if (status == FrameStatus::kNonFiniteCell) flag(errors, kNonFiniteCell, b);
    if (status == FrameStatus::kSingularCell) flag(errors, kSingularCell, b);
  }
  __syncthreads();
  if (!ok) return;
  for (int k = 0; k < 3; ++k) lo[k][threadIdx.x] = INFINITY, hi[k][threadIdx.x] = -INFINITY;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    Vec3 r = load_position(pos, i);
    if (!is_finite(r)) {
      flag(errors, kNonFinitePosition, i);
      continue;
    }
    Vec3 f = fractional(frame, r);
    for (int k = 0; k < 3; ++k) {
      double fk = component(f, k);
      if (frame.periodic[k] && !(fabs(fk) < 1e9)) flag(errors, kTooFarOutside, i);
      lo[k][threadIdx.x] = fmin(lo[k][threadIdx.x], fk);
      hi[k][threadIdx.x] = fmax(hi[k][threadIdx.x], fk);
    }
  }
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < 3; ++k) {
        lo[k][threadIdx.x] = fmin(lo[k][threadIdx.x], lo[k][threadIdx.x + stride]);
        hi[k][threadIdx.x] = fmax(hi[k][threadIdx.x], hi[k][threadIdx.x + stride]);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double l[3] = {lo[0][0], lo[1][0], lo[2][0]}, h[3] = {hi[0][0], hi[1][0], hi[2][0]};
    make_bins(frame, l, h, cutoff, end - begin);
    frame.first_bin = 2 * begin + b;
    search_cost(frame, end - begin, frame.candidates, frame.edges);
    if (!isfinite(frame.candidates)) flag(errors, kUnsearchable, b);
    frames[b] = frame;
  }
}

// One thread: the CPU's guard, on the whole batch's search cost (not system by system), summed
// in system order as the CPU sums it (another order could round across the threshold and refuse
// a batch the CPU searches). Refuses the search before any atom is placed; B is small.
__global__ void guard_kernel(const Frame* frames, int64_t num_systems, int64_t max_edges, bool capped,
                             int64_t num_atoms, unsigned long long* errors) {
  if (failed(errors)) return;  // a failed system's frame was never written
  double candidates = 0, edges = 0;
  for (int64_t b = 0; b < num_systems; ++b) {
    candidates += frames[b].candidates;
    edges += frames[b].edges;
  }
  if (hopeless(candidates, edges, max_edges, capped, num_atoms)) {
    // The doubles themselves (finite and > 0: never kNoError's bits), for the CPU's message.
    errors[kHopelessEdges] = static_cast<unsigned long long>(__double_as_longlong(edges));
    errors[kHopelessSearch] = static_cast<unsigned long long>(__double_as_longlong(candidates));
  }
}

template <class T>
__global__ void place_kernel(const T* pos, int64_t n, const int64_t* batch, const Frame* frames,
                             Placed* placed, int64_t* bin_start,
                             const unsigned long long* errors) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n || failed(errors)) return;
  const Frame& frame = frames[batch[i]];
  Placed p = place(frame, load_position(pos, i));
  placed[i] = p;
  atomicAdd(reinterpret_cast<unsigned long long*>(bin_start) +
                bin_index(frame, p.bin[0], p.bin[1], p.bin[2]) + 1,
            1ull);
}

__global__ void scatter_kernel(int64_t n, const int64_t* batch, const Frame* frames,
                               Workspace ws) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n || failed(ws.errors)) return;
  const Placed& p = ws.placed[i];
  int64_t bin = bin_index(frames[batch[i]], p.bin[0], p.bin[1], p.bin[2]);
  int64_t s = static_cast<int64_t>(
      atomicAdd(reinterpret_cast<unsigned long long*>(ws.cursor) + bin, 1ull));
  ws.wrapped[s] = p.wrapped;
  ws.position[s] = p.position;
  ws.index[s] = i;
  for (int k = 0; k < 3; ++k) ws.shift[3 * s + k] = p.shift[k];
}

__device__ CellList cell_list(const Workspace& ws) {
  return {ws.bin_start, ws.wrapped, ws.position, ws.index, ws.shift};
}

// Edges per target after the cap, at offsets[i + 1].
template <class T>
__global__ void count_kernel(Input in, Workspace ws) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= in.num_atoms || failed(ws.errors)) return;
  const Frame& frame = ws.frames[ws.batch[i]];
  const double cutoff2 = in.cutoff * in.cutoff;
  const CellList cells = cell_list(ws);
  int64_t count = 0;
  for_each_neighbor(frame, ws.placed[i], cutoff2, cells,
                    [&](int64_t, const int32_t*, double) { ++count; });
  const int64_t k = in.max_neighbors;
  if (k > 0 && count > k && in.tolerance >= 0) {
    // Tolerant cap: the k + 1 nearest distances, kept sorted, then d^2 <= d_(k+1)^2 + tol.
    double* top = ws.top + i * (k + 1);
    int64_t size = 0;
    for_each_neighbor(frame, ws.placed[i], cutoff2, cells,
                      [&](int64_t, const int32_t*, double d2) {
                        double d = edge_distance<T>(d2);
                        if (size == k + 1 && d >= top[k]) return;
                        int64_t at = size == k + 1 ? k : size++;
                        for (; at > 0 && top[at - 1] > d; --at) top[at] = top[at - 1];
                        top[at] = d;
                      });
    double bound = top[k] * top[k] + in.tolerance;
    count = 0;
    for_each_neighbor(frame, ws.placed[i], cutoff2, cells,
                      [&](int64_t, const int32_t*, double d2) {
                        double d = edge_distance<T>(d2);
                        count += d * d <= bound;
                      });
  } else if (k > 0 && count > k) {
    count = k;
  }
  ws.offsets[i + 1] = count;
}

// (distance, source, shift) of edge e is lexicographically after the candidate's.
template <class T>
__device__ bool after(const T* distance, const int64_t* source, const int32_t* shift, int64_t e,
                      double d, int64_t j, const int32_t* s) {
  double de = static_cast<double>(distance[e]);
  if (de != d) return de > d;
  if (source[e] != j) return source[e] > j;
  for (int k = 0; k < 3; ++k)
    if (shift[3 * e + k] != s[k]) return shift[3 * e + k] > s[k];
  return false;
}

// Each target keeps its first `count` edges sorted inside its output range by insertion.
template <class T>
__global__ void fill_kernel(Input in, Workspace ws, Output out, int64_t num_edges) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= in.num_atoms) return;
  const int64_t first = ws.offsets[i], count = ws.offsets[i + 1] - first;
  if (count == 0) return;
  int64_t* source = out.edge_index + first;
  int64_t* target = out.edge_index + num_edges + first;
  int32_t* shift = out.cell_offsets + 3 * first;
  T* distance = static_cast<T*>(out.distance) + first;
  int64_t size = 0;
  for_each_neighbor(ws.frames[ws.batch[i]], ws.placed[i], in.cutoff * in.cutoff, cell_list(ws),
                    [&](int64_t j, const int32_t* s, double d2) {
                      double d = edge_distance<T>(d2);
                      if (size == count && !after(distance, source, shift, count - 1, d, j, s))
                        return;
                      int64_t at = size == count ? count - 1 : size++;
                      for (; at > 0 && after(distance, source, shift, at - 1, d, j, s); --at) {
                        distance[at] = distance[at - 1];
                        source[at] = source[at - 1];
                        for (int k = 0; k < 3; ++k) shift[3 * at + k] = shift[3 * (at - 1) + k];
                      }
                      distance[at] = static_cast<T>(d);
                      source[at] = j;
                      for (int k = 0; k < 3; ++k) shift[3 * at + k] = s[k];
                    });
  for (int64_t e = 0; e < count; ++e) target[e] = i;
}

unsigned int blocks(int64_t n) { return static_cast<unsigned int>(ceil_div(n, kBlock)); }

}  // namespace

void bin(const Input& in, const Workspace& ws, cudaStream_t stream) {
  if (in.num_systems == 0) return;
  dispatch_float(in.dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* pos = static_cast<const T*>(in.pos);
    frames_kernel<T><<<static_cast<unsigned int>(in.num_systems), kBlock, 0, stream>>>(
        pos, in.ptr, in.cell, in.pbc, in.cutoff, ws.frames, ws.errors);
    JMP_CUDA_CHECK(cudaGetLastError());
    guard_kernel<<<1, 1, 0, stream>>>(ws.frames, in.num_systems, in.max_edges, in.max_neighbors > 0,
                                      in.num_atoms, ws.errors);
    JMP_CUDA_CHECK(cudaGetLastError());
    if (in.num_atoms == 0) return;
    place_kernel<T><<<blocks(in.num_atoms), kBlock, 0, stream>>>(
        pos, in.num_atoms, ws.batch, ws.frames, ws.placed, ws.bin_start, ws.errors);
    JMP_CUDA_CHECK(cudaGetLastError());
  });
}

void count(const Input& in, const Workspace& ws, cudaStream_t stream) {
  if (in.num_atoms == 0) return;
  scatter_kernel<<<blocks(in.num_atoms), kBlock, 0, stream>>>(in.num_atoms, ws.batch, ws.frames,
                                                               ws);
  JMP_CUDA_CHECK(cudaGetLastError());
  dispatch_float(in.dtype, [&](auto zero) {
    count_kernel<decltype(zero)><<<blocks(in.num_atoms), kBlock, 0, stream>>>(in, ws);
  });
  JMP_CUDA_CHECK(cudaGetLastError());
}

void fill(const Input& in, const Workspace& ws, const Output& out, int64_t num_edges,
          cudaStream_t stream) {
  if (num_edges == 0) return;
  dispatch_float(in.dtype, [&](auto zero) {
    fill_kernel<decltype(zero)><<<blocks(in.num_atoms), kBlock, 0, stream>>>(in, ws, out,
                                                                             num_edges);
  });
  JMP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace jmp_ext::radius_graph::cuda
