// Scatter / segment reductions and the ragged <-> padded row copies of GemNet-OC.
//
// Plain-data arguments, no torch: the caller (python/jmp_ext/ops/reductions.py) owns every buffer
// and has checked shapes, dtypes and devices; these entries check the index *values* (ranges,
// monotone pointers, duplicate slots) before writing anything, so bad indices raise
// jmp_ext::InvalidInput instead of writing out of bounds. The same entry names exist under
// cpu:: (reductions_cpu.cpp, deterministic, threaded) and cuda:: (reductions_cuda.cu).
//
// Shapes: a "row" is `features` contiguous elements; src/out tensors are row-major [rows, F].
// Row indices that feed a gather or a scatter and padded (row, col) slots (IndexArray) are int32
// or int64; CSR pointers and permutations are int64.
#pragma once

#include <cstdint>

#include "common/index_array.h"

#ifdef JMP_EXT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace jmp_ext::reductions {

enum class Dtype : int32_t { f32 = 0, f64 = 1, bf16 = 2 };
enum class Reduce : int32_t { sum = 0, mean = 1, max = 2 };

// Marks "no element chosen yet" inside the max reduction.
constexpr int64_t kNoArg = -1;

// out[s] = reduce(src[perm[e]] for e in [ptr[s], ptr[s+1])), in that order of e.
struct SegmentReduceArgs {
  const void* src;       // [num_src, F] of dtype
  const int64_t* ptr;    // [num_segments + 1]: ptr[0] = 0, non-decreasing, ptr[S] = num_src
  const int64_t* perm;   // [num_src] rows of src in segment order, or nullptr for 0, 1, 2, ...
  void* out;             // [num_segments, F] of dtype; empty segments give 0
  int64_t* arg;          // max only: [num_segments, F] row of src picked (num_src if empty)
  int64_t num_src;
  int64_t num_segments;
  int64_t features;
  Dtype dtype;
  Reduce reduce;
};

// out[k] = reduce(src[e] for e ascending with index[e] == k), for k < dim_size: sum or mean.
struct ScatterReduceArgs {
  const void* src;       // [num_src, F] of dtype
  IndexArray index;      // [num_src], values in [0, dim_size)
  void* out;             // [dim_size, F] of dtype; rows that no index points to give 0
  int64_t num_src;
  int64_t dim_size;
  int64_t features;
  Dtype dtype;
  Reduce reduce;
};

// Rows of `features` elements of `elem_size` bytes (2, 4 or 8) copied from src to out.
struct RowCopy {
  const void* src;
  void* out;
  int64_t features;
  int elem_size;
};

// The (row, col) slots of T ragged items in a [num_rows, num_cols] padded layout.
struct PaddedIndex {
  IndexArray row;       // [num_items] in [0, num_rows)
  IndexArray col;       // [num_items] in [0, num_cols); (row, col) pairs must be distinct
  int64_t num_items;
  int64_t num_rows;
  int64_t num_cols;
  int64_t* slots;       // scratch [num_rows * num_cols]: item in each slot; an empty one holds
                        // -1 on the CPU, jmp_ext::cuda::kNoError on CUDA (the atomicMin identity)
};

// The ragged bilinear pair of GemNet-OC's efficient interaction, over CSR segments with blocks of
// R x C per segment (s(e) = the segment of row e):
//   segment_outer:    out[s] = sum over e in [ptr[s], ptr[s+1]) of x[e] (outer) y[e], ascending e
//                     x [num_src, R], y [num_src, C] -> out [num_segments, R, C]
//   segment_contract: out[e] = x[s(e)] @ y[e]
//                     x [num_segments, R, C], y [num_src, C] -> out [num_src, R]
//                     x[s, i, j] is at x + s * R * C + i * x_stride_r + j * x_stride_c, so a
//                     transposed block (a backward pass's grad.transpose(1, 2)) needs no copy.
// Each is the other's adjoint, so their backward passes are made of the same two kernels.
// Two indices (CPU only) fuse the gather that feeds them and the scatter that follows a
// contraction, so the [num_src, C] or [num_src, R] rows in between are never written:
//   y_index (either kind): row e of y is y[y_index[e]] of y [num_y_rows, C].
//   out_index (segment_contract): row e of the product is summed into out[out_index[e]] of
//     out [num_out_rows, R], each out row over its e in ascending order (as scatter_reduce).
struct SegmentBilinearArgs {
  const void* x;
  const void* y;
  const int64_t* ptr;  // [num_segments + 1], as for segment_reduce
  void* out;
  int64_t num_src;
  int64_t num_segments;
  int64_t rows;  // R
  int64_t cols;  // C
  int64_t x_stride_r;  // segment_contract only (segment_outer's x is [num_src, R], dense)
  int64_t x_stride_c;
  IndexArray y_index;  // [num_src] in [0, num_y_rows), or null
  int64_t num_y_rows;
  IndexArray out_index;  // segment_contract only: [num_src] in [0, num_out_rows), or null
  int64_t num_out_rows;
  Dtype dtype;
};

namespace cpu {
// Host-side checks of index values that throw InvalidInput naming the first problem; the CUDA
// entries call them on a host copy of the indices once a kernel has flagged one, so both
// backends give the same message.
// ptr[0] == 0, non-decreasing, ptr[num_segments] == num_items.
void check_ptr(const int64_t* ptr, int64_t num_segments, int64_t num_items);
// 0 <= value < bound, for name[position].
void check_index(int64_t value, int64_t position, int64_t bound, const char* name,
                 const char* bound_name);
// Checks row/col and fills index.slots with the item of each slot (-1 for none); serial, so the
// first duplicate (by item order) is the one reported.
void fill_slots(const PaddedIndex& index);

// "avx2" or "baseline": the build of segment_outer / segment_contract this CPU runs (AVX2 + FMA
// where the CPU has them, unless the environment sets JMP_EXT_CPU_ISA=baseline).
const char* bilinear_isa();

void segment_reduce(const SegmentReduceArgs& args, int num_threads);
// Each row's sources are reduced in ascending e, as a stable sort followed by segment_reduce
// would, but without sorting: threads own ranges of output rows and scan the index in order.
void scatter_reduce(const ScatterReduceArgs& args, int num_threads);
// out[i] = src[index[i]] for i < num_index; index values in [0, num_src_rows).
void gather(const RowCopy& copy, IndexArray index, int64_t num_index, int64_t num_src_rows,
            int num_threads);
// out[e] = src[s] for e in [ptr[s], ptr[s+1]): the adjoint of segment_reduce(sum).
void segment_broadcast(const RowCopy& copy, const int64_t* ptr, int64_t num_segments,
                       int64_t num_out_rows, int num_threads);
// out[row[t] * num_cols + col[t]] = src[t], zeros in the other slots.
void ragged_to_padded(const RowCopy& copy, const PaddedIndex& index, int num_threads);
// out[t] = src[row[t] * num_cols + col[t]]: the adjoint of ragged_to_padded.
void padded_to_ragged(const RowCopy& copy, const PaddedIndex& index, int num_threads);
void segment_outer(const SegmentBilinearArgs& args, int num_threads);
void segment_contract(const SegmentBilinearArgs& args, int num_threads);
}  // namespace cpu

#ifdef JMP_EXT_WITH_CUDA
namespace cuda {
// Same contracts as cpu::, on device pointers, queued on `stream`. `status` is a device int64[1]
// that the caller set to jmp_ext::cuda::kNoError (common/cuda_helpers.h): kernels record bad
// index values there instead of touching memory out of range, and each entry reads it back once
// (one stream synchronisation) to throw InvalidInput.
// Deterministic: a fixed set of threads reduces each output row in a fixed order, no atomics.
void segment_reduce(const SegmentReduceArgs& args, int64_t* status, cudaStream_t stream);
// Non-deterministic opt-in: one atomicAdd per element into acc [dim_size, F] (float for f32 and
// bf16 sources, double for f64), which the caller zeroed.
void scatter_add_atomic(const void* src, Dtype dtype, IndexArray index, int64_t n,
                        int64_t features, int64_t dim_size, void* acc, int64_t* status,
                        cudaStream_t stream);
void gather(const RowCopy& copy, IndexArray index, int64_t num_index, int64_t num_src_rows,
            int64_t* status, cudaStream_t stream);
void segment_broadcast(const RowCopy& copy, const int64_t* ptr, int64_t num_segments,
                       int64_t num_out_rows, int64_t* status, cudaStream_t stream);
void ragged_to_padded(const RowCopy& copy, const PaddedIndex& index, int64_t* status,
                      cudaStream_t stream);
void padded_to_ragged(const RowCopy& copy, const PaddedIndex& index, int64_t* status,
                      cudaStream_t stream);
void segment_outer(const SegmentBilinearArgs& args, int64_t* status, cudaStream_t stream);
void segment_contract(const SegmentBilinearArgs& args, int64_t* status, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace jmp_ext::reductions
