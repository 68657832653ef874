// CUDA kernels of csrc/reductions. The arithmetic is reducer.h's Reducer, the same as on the
// CPU; what differs is only who runs it:
//   - segment reductions, F >= 32: one thread per (segment, feature) walks the segment's rows in
//     order (neighbouring threads read neighbouring features, so loads coalesce); the result is
//     bitwise that of the CPU kernel.
//   - segment reductions, F < 32: one warp per segment; lane r * F + f reduces rows r, r + R, ...
//     (R = 32 / F rows in flight) of feature f, then lane f merges the R partials in lane order.
//     Deterministic (a fixed summation tree), though not bitwise the CPU's sequential sum.
//   - row copies (gather, broadcast, padded layouts): one thread per output element.
//   - scatter_add_atomic: the opt-in non-deterministic path, one atomicAdd per element.
// Index values are checked on the device: a bad one is skipped and reported through `status`
// (common/cuda_helpers.h); the host then reads the status once and, on a report, re-runs the
// CPU check on a host copy of the indices, which throws the CPU backend's exact message.
#include <vector>

#include "common/cuda_helpers.h"
#include "reductions/reducer.h"
#include "reductions/reductions.h"

namespace jmp_ext::reductions::cuda {

namespace {

namespace jc = jmp_ext::cuda;
using jc::grid_start;
using jc::grid_stride;
using jc::kBlock;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kBlock / kWarp;
// From this many features on, one thread per feature keeps a warp's loads contiguous.
constexpr int64_t kWideFeatures = kWarp;

// ---- segment reductions ----

// Flags k where ptr breaks its contract (ptr[0] == 0, non-decreasing, ptr[S] == n).
__global__ void check_ptr_kernel(const int64_t* ptr, int64_t num_segments, int64_t n,
                                 int64_t* status) {
  for (int64_t k = grid_start(); k <= num_segments; k += grid_stride()) {
    bool bad = (k == 0 && ptr[0] != 0) || (k < num_segments && ptr[k] > ptr[k + 1]) ||
               (k == num_segments && ptr[k] != n);
    if (bad) jc::report(status, k);
  }
}

// Rows [begin, end) of a segment, or false when ptr is broken there (then reported by
// check_ptr_kernel; the segment is skipped so nothing is read out of range).
__device__ __forceinline__ bool segment_rows(const SegmentReduceArgs& a, int64_t s,
                                             int64_t& begin, int64_t& end) {
  begin = a.ptr[s];
  end = a.ptr[s + 1];
  return 0 <= begin && begin <= end && end <= a.num_src;
}

template <class T, Reduce R>
__device__ __forceinline__ void store_result(const SegmentReduceArgs& a, int64_t i, acc_t<T> acc,
                                             int64_t arg, int64_t count) {
  static_cast<T*>(a.out)[i] = Acc<T>::store(Reducer<R, acc_t<T>>::finish(acc, count));
  if constexpr (R == Reduce::max) a.arg[i] = arg == kNoArg ? a.num_src : arg;
}

template <class T, Reduce R>
__global__ void segment_reduce_wide(SegmentReduceArgs a) {
  using Red = Reducer<R, acc_t<T>>;
  const T* src = static_cast<const T*>(a.src);
  const int64_t F = a.features;
  for (int64_t i = grid_start(); i < a.num_segments * F; i += grid_stride()) {
    int64_t s = i / F, f = i % F, begin, end;
    if (!segment_rows(a, s, begin, end)) continue;
    acc_t<T> acc = Red::init();
    int64_t arg = kNoArg;
    for (int64_t e = begin; e < end; ++e) {
      int64_t row = a.perm ? a.perm[e] : e;
      Red::update(acc, arg, Acc<T>::load(src[row * F + f]), row);
    }
    store_result<T, R>(a, i, acc, arg, end - begin);
  }
}

template <class T, Reduce R>
__global__ void segment_reduce_narrow(SegmentReduceArgs a) {
  using Red = Reducer<R, acc_t<T>>;
  __shared__ acc_t<T> partial[kWarpsPerBlock][kWarp];
  __shared__ int64_t partial_arg[kWarpsPerBlock][kWarp];
  const T* src = static_cast<const T*>(a.src);
  const int64_t F = a.features, rows_in_flight = kWarp / F;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t f = lane % F, r = lane / F;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; s < a.num_segments;
       s += num_warps) {
    int64_t begin, end;
    bool ok = segment_rows(a, s, begin, end);  // the same for the whole warp
    acc_t<T> acc = Red::init();
    int64_t arg = kNoArg;
    if (ok && r < rows_in_flight) {
      for (int64_t e = begin + r; e < end; e += rows_in_flight) {
        int64_t row = a.perm ? a.perm[e] : e;
        Red::update(acc, arg, Acc<T>::load(src[row * F + f]), row);
      }
    }
    partial[warp][lane] = acc;
    partial_arg[warp][lane] = arg;
    __syncwarp();
    if (ok && lane < F) {
      for (int64_t k = 1; k < rows_in_flight; ++k)
        Red::merge(acc, arg, partial[warp][k * F + f], partial_arg[warp][k * F + f]);
      store_result<T, R>(a, s * F + f, acc, arg, end - begin);
    }
    __syncwarp();
  }
}

// Throws the CPU check's message for a ptr that check_ptr_kernel flagged.
[[noreturn]] void throw_bad_ptr(const int64_t* ptr, int64_t num_segments, int64_t n,
                                cudaStream_t stream) {
  std::vector<int64_t> host(num_segments + 1);
  jc::read_back(ptr, host.data(), num_segments + 1, stream);
  cpu::check_ptr(host.data(), num_segments, n);
  throw Error("internal error: the CUDA ptr check flagged a valid ptr");
}

void check_ptr_on_device(const int64_t* ptr, int64_t num_segments, int64_t n, int64_t* status,
                         cudaStream_t stream) {
  check_ptr_kernel<<<jc::grid_for(num_segments + 1), kBlock, 0, stream>>>(ptr, num_segments, n,
                                                                          status);
  jc::check_launch();
}

// After the launches that read ptr: throws the CPU check's message if check_ptr_on_device flagged it.
void finish_ptr(const int64_t* ptr, int64_t num_segments, int64_t n, const int64_t* status,
                cudaStream_t stream) {
  if (jc::read_one(status, stream) != jc::kNoError) throw_bad_ptr(ptr, num_segments, n, stream);
}

// ---- row copies ----

// Where output row i comes from: a source row, or -1 for zeros.
struct GatherRows {
  IndexArray index;
  int64_t num_src_rows;
  int64_t* status;
  __device__ int64_t operator()(int64_t i) const {
    int64_t from = index[i];
    if (from < 0 || from >= num_src_rows) {
      jc::report(status, i);
      return -1;
    }
    return from;
  }
};

struct BroadcastRows {  // row e comes from the segment s with ptr[s] <= e < ptr[s + 1]
  const int64_t* ptr;
  int64_t num_segments;
  __device__ int64_t operator()(int64_t e) const {
    int64_t lo = 0, hi = num_segments;  // last s with ptr[s] <= e, by bisection
    while (hi - lo > 1) {
      int64_t mid = lo + (hi - lo) / 2;
      if (ptr[mid] <= e) lo = mid; else hi = mid;
    }
    return num_segments > 0 ? lo : -1;  // S == 0 with rows is a ptr error, reported separately
  }
};

struct SlotRows {  // padded slot -> the item in it (slots holds kNoError where there is none)
  const int64_t* slots;
  int64_t num_items;
  __device__ int64_t operator()(int64_t slot) const {
    int64_t item = slots[slot];
    return item < num_items ? item : -1;
  }
};

struct ItemSlots {  // ragged item t -> its padded slot, -1 if (row, col) is out of range
  PaddedIndex p;
  __device__ int64_t operator()(int64_t t) const {
    int64_t r = p.row[t], c = p.col[t];
    return r >= 0 && r < p.num_rows && c >= 0 && c < p.num_cols ? r * p.num_cols + c : -1;
  }
};

template <class U, class Source>
__global__ void copy_rows_kernel(const U* src, U* out, int64_t rows, int64_t F, Source source) {
  for (int64_t i = grid_start(); i < rows * F; i += grid_stride()) {
    int64_t from = source(i / F);
    out[i] = from < 0 ? U{0} : src[from * F + i % F];
  }
}

template <class Source>
void copy_rows(const RowCopy& c, int64_t rows, Source source, cudaStream_t stream) {
  if (rows * c.features == 0) return;
  dispatch_elem(c.elem_size, [&](auto u) {
    using U = decltype(u);
    copy_rows_kernel<<<jc::grid_for(rows * c.features), kBlock, 0, stream>>>(
        static_cast<const U*>(c.src), static_cast<U*>(c.out), rows, c.features, source);
  });
  jc::check_launch();
}

// ---- padded slots: the CPU's fill_slots, in three passes ----

__global__ void fill_kernel(int64_t* data, int64_t n, int64_t value) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) data[i] = value;
}

// Every slot keeps its smallest item; items out of range are reported.
__global__ void claim_slots_kernel(PaddedIndex p, int64_t* status) {
  ItemSlots slot_of{p};
  for (int64_t t = grid_start(); t < p.num_items; t += grid_stride()) {
    int64_t slot = slot_of(t);
    if (slot < 0) {
      jc::report(status, t);
      continue;
    }
    atomicMin(reinterpret_cast<unsigned long long*>(p.slots + slot),
              static_cast<unsigned long long>(t));
  }
}

// An item that did not keep its slot is a duplicate (the smallest such item is the one the
// serial CPU check meets first).
__global__ void find_duplicates_kernel(PaddedIndex p, int64_t* status) {
  ItemSlots slot_of{p};
  for (int64_t t = grid_start(); t < p.num_items; t += grid_stride()) {
    int64_t slot = slot_of(t);
    if (slot >= 0 && p.slots[slot] != t) jc::report(status, t);
  }
}

void fill_slots_on_device(const PaddedIndex& p, int64_t* status, cudaStream_t stream) {
  int64_t num_slots = p.num_rows * p.num_cols;
  if (num_slots > 0) {
    fill_kernel<<<jc::grid_for(num_slots), kBlock, 0, stream>>>(p.slots, num_slots, jc::kNoError);
  }
  if (p.num_items > 0) {
    claim_slots_kernel<<<jc::grid_for(p.num_items), kBlock, 0, stream>>>(p, status);
    find_duplicates_kernel<<<jc::grid_for(p.num_items), kBlock, 0, stream>>>(p, status);
  }
  jc::check_launch();
}

// The first n entries of a device index, widened to int64 on the host.
std::vector<int64_t> read_back_index(IndexArray index, int64_t n, cudaStream_t stream) {
  return visit_index(index, [&](auto device) {
    std::vector<std::remove_const_t<std::remove_pointer_t<decltype(device)>>> host(n);
    jc::read_back(device, host.data(), n, stream);
    return std::vector<int64_t>(host.begin(), host.end());
  });
}

// Reads the status; on a report, replays the CPU check over the items up to the bad one.
void finish_slots(const PaddedIndex& p, const int64_t* status, cudaStream_t stream) {
  int64_t bad = jc::read_one(status, stream);
  if (bad == jc::kNoError) return;
  std::vector<int64_t> row = read_back_index(p.row, bad + 1, stream);
  std::vector<int64_t> col = read_back_index(p.col, bad + 1, stream);
  std::vector<int64_t> slots(p.num_rows * p.num_cols);
  cpu::fill_slots({{row.data(), false}, {col.data(), false}, bad + 1, p.num_rows, p.num_cols, slots.data()});
  throw Error("internal error: the CUDA slot check flagged valid items");
}

// ---- atomic scatter ----

template <class T>
__global__ void scatter_add_atomic_kernel(const T* src, IndexArray index, int64_t n,
                                          int64_t F, int64_t dim_size, acc_t<T>* acc,
                                          int64_t* status) {
  for (int64_t i = grid_start(); i < n * F; i += grid_stride()) {
    int64_t e = i / F, k = index[e];
    if (k < 0 || k >= dim_size) {
      jc::report(status, e);
      continue;
    }
    atomicAdd(acc + k * F + i % F, Acc<T>::load(src[i]));
  }
}

// With F = 0 no row moves, but the indices are still checked, as on the CPU: GatherRows
// reports an index outside [0, bound).
__global__ void check_index_kernel(GatherRows rows, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_stride()) rows(i);
}

void check_index_on_device(IndexArray index, int64_t n, int64_t bound, int64_t* status,
                           cudaStream_t stream) {
  if (n == 0) return;
  check_index_kernel<<<jc::grid_for(n), kBlock, 0, stream>>>(GatherRows{index, bound, status}, n);
  jc::check_launch();
}

// Reads the status; on a report, throws the CPU message for index[bad].
void finish_index(IndexArray index, int64_t bound, const char* bound_name,
                  const int64_t* status, cudaStream_t stream) {
  int64_t bad = jc::read_one(status, stream);
  if (bad == jc::kNoError) return;
  int64_t value = visit_index(index, [&](auto p) { return int64_t{jc::read_one(p + bad, stream)}; });
  cpu::check_index(value, bad, bound, "index", bound_name);
  throw Error("internal error: the CUDA index check flagged a valid index");
}

// ---- segment bilinear pair ----

// One thread per output element (s, i, j) of segment_outer, summing its segment in ascending e.
template <class T>
__global__ void segment_outer_kernel(SegmentBilinearArgs a) {
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  const int64_t block = a.rows * a.cols;
  for (int64_t k = grid_start(); k < a.num_segments * block; k += grid_stride()) {
    const int64_t s = k / block, i = (k % block) / a.cols, j = k % a.cols;
    const int64_t begin = a.ptr[s], end = a.ptr[s + 1];
    acc_t<T> acc = 0;
    if (0 <= begin && begin <= end && end <= a.num_src) {  // else reported by check_ptr_kernel
      for (int64_t e = begin; e < end; ++e)
        acc += Acc<T>::load(x[e * a.rows + i]) * Acc<T>::load(y[e * a.cols + j]);
    }
    static_cast<T*>(a.out)[k] = Acc<T>::store(acc);
  }
}

// One thread per (segment, row i): out[e, i] for the rows e of that segment.
template <class T>
__global__ void segment_contract_kernel(SegmentBilinearArgs a) {
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  for (int64_t k = grid_start(); k < a.num_segments * a.rows; k += grid_stride()) {
    const int64_t s = k / a.rows, i = k % a.rows;
    const int64_t begin = a.ptr[s], end = a.ptr[s + 1];
    if (!(0 <= begin && begin <= end && end <= a.num_src)) continue;  // reported by check_ptr_kernel
    const T* x_si = x + s * a.rows * a.cols + i * a.x_stride_r;
    for (int64_t e = begin; e < end; ++e) {
      acc_t<T> sum = 0;
      for (int64_t j = 0; j < a.cols; ++j)
        sum += Acc<T>::load(x_si[j * a.x_stride_c]) * Acc<T>::load(y[e * a.cols + j]);
      static_cast<T*>(a.out)[e * a.rows + i] = Acc<T>::store(sum);
    }
  }
}

// Checks ptr, queues launch(dtype tag) when there is work, then throws on a reported bad ptr.
template <class Launch>
void run_bilinear(const SegmentBilinearArgs& a, int64_t threads, int64_t* status, cudaStream_t stream,
                  Launch&& launch) {
  check_ptr_on_device(a.ptr, a.num_segments, a.num_src, status, stream);
  if (threads > 0) {
    dispatch_dtype(a.dtype, launch);
    jc::check_launch();
  }
  finish_ptr(a.ptr, a.num_segments, a.num_src, status, stream);
}

}  // namespace

void segment_outer(const SegmentBilinearArgs& a, int64_t* status, cudaStream_t stream) {
  const int64_t threads = a.num_segments * a.rows * a.cols;
  run_bilinear(a, threads, status, stream, [&](auto t) {
    segment_outer_kernel<decltype(t)><<<jc::grid_for(threads), kBlock, 0, stream>>>(a);
  });
}

void segment_contract(const SegmentBilinearArgs& a, int64_t* status, cudaStream_t stream) {
  const int64_t threads = a.num_segments * a.rows;
  run_bilinear(a, threads, status, stream, [&](auto t) {
    segment_contract_kernel<decltype(t)><<<jc::grid_for(threads), kBlock, 0, stream>>>(a);
  });
}

void segment_reduce(const SegmentReduceArgs& a, int64_t* status, cudaStream_t stream) {
  check_ptr_on_device(a.ptr, a.num_segments, a.num_src, status, stream);
  if (a.num_segments * a.features > 0) {
    dispatch_dtype(a.dtype, [&](auto t) {
      dispatch_reduce(a.reduce, [&](auto r) {
        using T = decltype(t);
        constexpr Reduce R = decltype(r)::value;
        if (a.features >= kWideFeatures) {
          segment_reduce_wide<T, R>
              <<<jc::grid_for(a.num_segments * a.features), kBlock, 0, stream>>>(a);
        } else {
          segment_reduce_narrow<T, R>
              <<<jc::grid_for(a.num_segments * kWarp), kBlock, 0, stream>>>(a);
        }
      });
    });
    jc::check_launch();
  }
  finish_ptr(a.ptr, a.num_segments, a.num_src, status, stream);
}

void scatter_add_atomic(const void* src, Dtype dtype, IndexArray index, int64_t n,
                        int64_t features, int64_t dim_size, void* acc, int64_t* status,
                        cudaStream_t stream) {
  if (n * features > 0) {
    dispatch_dtype(dtype, [&](auto t) {
      using T = decltype(t);
      scatter_add_atomic_kernel<T><<<jc::grid_for(n * features), kBlock, 0, stream>>>(
          static_cast<const T*>(src), index, n, features, dim_size, static_cast<acc_t<T>*>(acc),
          status);
    });
    jc::check_launch();
  } else if (features == 0) {
    check_index_on_device(index, n, dim_size, status, stream);
  }
  finish_index(index, dim_size, "dim_size", status, stream);
}

void gather(const RowCopy& c, IndexArray index, int64_t num_index, int64_t num_src_rows,
            int64_t* status, cudaStream_t stream) {
  if (c.features == 0) check_index_on_device(index, num_index, num_src_rows, status, stream);
  copy_rows(c, num_index, GatherRows{index, num_src_rows, status}, stream);
  finish_index(index, num_src_rows, "the number of source rows", status, stream);
}

void segment_broadcast(const RowCopy& c, const int64_t* ptr, int64_t num_segments,
                       int64_t num_out_rows, int64_t* status, cudaStream_t stream) {
  check_ptr_on_device(ptr, num_segments, num_out_rows, status, stream);
  copy_rows(c, num_out_rows, BroadcastRows{ptr, num_segments}, stream);
  finish_ptr(ptr, num_segments, num_out_rows, status, stream);
}

void ragged_to_padded(const RowCopy& c, const PaddedIndex& p, int64_t* status,
                      cudaStream_t stream) {
  fill_slots_on_device(p, status, stream);
  copy_rows(c, p.num_rows * p.num_cols, SlotRows{p.slots, p.num_items}, stream);
  finish_slots(p, status, stream);
}

void padded_to_ragged(const RowCopy& c, const PaddedIndex& p, int64_t* status,
                      cudaStream_t stream) {
  fill_slots_on_device(p, status, stream);
  copy_rows(c, p.num_items, ItemSlots{p}, stream);
  finish_slots(p, status, stream);
}

}  // namespace jmp_ext::reductions::cuda
