// CPU kernels of csrc/reductions: deterministic on any thread count, because every output row is
// produced by exactly one thread, in a fixed order of its inputs; threads only decide who does
// which rows.
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "common/parallel.h"
#include "reductions/reducer.h"
#include "reductions/reductions.h"

namespace jmp_ext::reductions::cpu {
namespace {

// Below this many elements of work a thread costs more than it saves.
constexpr int64_t kGrain = 1 << 15;

// Runs f(s_begin, s_end) over contiguous blocks of segments of about equal cost (rows + segments
// in each block), so one hub segment does not leave the other threads idle.
template <class F>
void for_segment_blocks(const int64_t* ptr, int64_t num_segments, int64_t features,
                        int num_threads, F&& f) {
  int64_t cost = (ptr[num_segments] + num_segments) * std::max<int64_t>(features, 1);
  int blocks = static_cast<int>(std::clamp<int64_t>(cost / kGrain, 1, std::max(num_threads, 1)));
  // First segment s with ptr[s] + s >= target (a non-decreasing function of s).
  auto segment_at = [&](int64_t target) {
    int64_t lo = 0, hi = num_segments;
    while (lo < hi) {
      int64_t mid = lo + (hi - lo) / 2;
      if (ptr[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  int64_t total = ptr[num_segments] + num_segments;
  parallel_for(blocks, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      f(segment_at(total * b / blocks), segment_at(total * (b + 1) / blocks));
    }
  });
}

// Reduces segments [s_begin, s_end) with F features (an int64_t, or an integral_constant for
// the small F that dispatch_features singles out) into accumulators acc/arg [F].
template <class T, Reduce R, class Features>
void reduce_block(const SegmentReduceArgs& a, Features F, int64_t s_begin, int64_t s_end, acc_t<T>* acc,
                  int64_t* arg) {
  using Red = Reducer<R, acc_t<T>>;
  const T* src = static_cast<const T*>(a.src);
  T* out = static_cast<T*>(a.out);
  for (int64_t s = s_begin; s < s_end; ++s) {
    for (int64_t f = 0; f < F; ++f) {
      acc[f] = Red::init();
      arg[f] = kNoArg;
    }
    for (int64_t e = a.ptr[s]; e < a.ptr[s + 1]; ++e) {
      int64_t row = a.perm ? a.perm[e] : e;
      const T* x = src + row * F;
      for (int64_t f = 0; f < F; ++f) Red::update(acc[f], arg[f], Acc<T>::load(x[f]), row);
    }
    int64_t count = a.ptr[s + 1] - a.ptr[s];
    for (int64_t f = 0; f < F; ++f) out[s * F + f] = Acc<T>::store(Red::finish(acc[f], count));
    if constexpr (R == Reduce::max) {
      for (int64_t f = 0; f < F; ++f) a.arg[s * F + f] = arg[f] == kNoArg ? a.num_src : arg[f];
    }
  }
}

// Features up to this count get a compile-time F: the row loop unrolls and the accumulators
// stay in registers (a runtime F = 1 or 3 ran at a sixth of the copy bandwidth).
constexpr int64_t kSmallFeatures = 4;

template <int64_t K, class F>
void dispatch_features(int64_t features, F&& f) {
  if constexpr (K > kSmallFeatures) {
    f(features);
  } else if (features == K) {
    f(std::integral_constant<int64_t, K>{});
  } else {
    dispatch_features<K + 1>(features, f);
  }
}

template <class T, Reduce R>
void reduce_segments(const SegmentReduceArgs& a, int num_threads) {
  using A = acc_t<T>;
  for_segment_blocks(a.ptr, a.num_segments, a.features, num_threads,
                     [&](int64_t s_begin, int64_t s_end) {
    dispatch_features<1>(a.features, [&](auto F) {
      if constexpr (std::is_integral_v<decltype(F)>) {
        std::vector<A> acc(F);
        std::vector<int64_t> arg(F);
        reduce_block<T, R>(a, F, s_begin, s_end, acc.data(), arg.data());
      } else {
        A acc[decltype(F)::value];
        int64_t arg[decltype(F)::value];
        reduce_block<T, R>(a, F, s_begin, s_end, acc, arg);
      }
    });
  });
}

// Owner-computes scatter: the output rows are cut into one contiguous range per thread; each
// thread reads the whole index in order and accumulates the sources of its own rows, so every
// row adds its sources in ascending e whatever the thread count. The accumulators of a range
// ([rows, F] of acc_t, small next to the source) stay hot in cache, which a sort-then-reduce
// (random reads through a permutation) does not.
//
// Narrow rows stay on one thread: every owner scans the whole index, and with several owners the
// "is this row mine" branch is taken at random and mispredicted half the time, which made 2
// threads 2-4x slower than 1 below F = 32 (bench_reductions.py, E = 2e6, F = 1 and 3). From
// F = 32 on, the per-row work hides it (F = 64: 2 threads 1.3x faster than 1).
//
// scatter_chunks: how many row ranges a scatter of num_src rows of `features` onto num_rows
// output rows is cut into.
int scatter_chunks(int64_t num_src, int64_t num_rows, int64_t features, int num_threads) {
  constexpr int64_t kMinParallelFeatures = 32;
  int64_t work = (num_src + num_rows) * std::max<int64_t>(features, 1);
  int max_chunks = features < kMinParallelFeatures ? 1 : std::max(num_threads, 1);
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(work / kGrain, num_rows), 1, max_chunks));
}

// Returns how many rows had an index in [0, dim_size): the others were skipped.
template <class T, Reduce R>
int64_t scatter_rows(const ScatterReduceArgs& a, int num_threads) {
  using A = acc_t<T>;
  using Red = Reducer<R, A>;
  const T* src = static_cast<const T*>(a.src);
  T* out = static_cast<T*>(a.out);
  int chunks = scatter_chunks(a.num_src, a.dim_size, a.features, num_threads);
  std::vector<int64_t> accepted(chunks, 0);
  parallel_for(chunks, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t k_begin = a.dim_size * c / chunks, k_end = a.dim_size * (c + 1) / chunks;
      dispatch_features<1>(a.features, [&](auto F) {
        // Only the mean needs the counts: for a sum, counting would be a second scattered
        // read-modify-write per row (half the speed at F = 1).
        constexpr bool kCounts = R == Reduce::mean;
        std::vector<A> acc((k_end - k_begin) * F, Red::init());
        std::vector<int64_t> count(kCounts ? k_end - k_begin : 0, 0);
        int64_t unused_arg = kNoArg;  // sum and mean keep no argument
        int64_t mine = 0;  // counted locally: the threads' accepted[] entries share a cache line
        for (int64_t e = 0; e < a.num_src; ++e) {
          int64_t k = a.index[e];
          if (k < k_begin || k >= k_end) continue;
          ++mine;
          if constexpr (kCounts) ++count[k - k_begin];
          const T* x = src + e * F;
          A* y = acc.data() + (k - k_begin) * F;
          for (int64_t f = 0; f < F; ++f) Red::update(y[f], unused_arg, Acc<T>::load(x[f]), e);
        }
        for (int64_t k = k_begin; k < k_end; ++k) {
          const A* y = acc.data() + (k - k_begin) * F;
          for (int64_t f = 0; f < F; ++f)  // (an empty row's sum is its initial 0)
            out[k * F + f] = Acc<T>::store(kCounts ? Red::finish(y[f], count[k - k_begin]) : y[f]);
        }
        accepted[c] = mine;
      });
    }
  });
  int64_t total = 0;
  for (int64_t n : accepted) total += n;
  return total;
}

// out row i = src row source(i), or zeros where source(i) < 0, for i in [begin, end).
template <class Source>
void copy_rows(const RowCopy& c, int64_t begin, int64_t end, Source&& source) {
  dispatch_elem(c.elem_size, [&](auto u) {
    using U = decltype(u);
    const U* src = static_cast<const U*>(c.src);
    U* out = static_cast<U*>(c.out);
    const int64_t F = c.features;
    for (int64_t i = begin; i < end; ++i) {
      int64_t from = source(i);
      U* o = out + i * F;
      if (from < 0) {
        std::fill(o, o + F, U{0});
      } else {
        const U* x = src + from * F;
        for (int64_t f = 0; f < F; ++f) o[f] = x[f];
      }
    }
  });
}

// The block shapes of segment_outer / segment_contract that get compile-time sizes: GemNet-OC's
// basis widths (7 spherical orders; 8 or 16 radial features in the atom-to-atom sum) by its
// widths, either way round. With both sizes known the R x C block can live in registers and the
// loops unroll (a runtime width of 8 ran at a quarter of that speed); other shapes take runtime
// loops, with a compile-time width if they have one.
template <class F>
void dispatch_width(int64_t n, F&& f) {
  switch (n) {
    case 7: return f(std::integral_constant<int64_t, 7>{});
    case 8: return f(std::integral_constant<int64_t, 8>{});
    case 16: return f(std::integral_constant<int64_t, 16>{});
    case 32: return f(std::integral_constant<int64_t, 32>{});
    case 64: return f(std::integral_constant<int64_t, 64>{});
    default: return f(n);
  }
}

template <class F>
bool dispatch_basis(int64_t n, F&& f) {
  switch (n) {
    case 7: return f(std::integral_constant<int64_t, 7>{}), true;
    case 8: return f(std::integral_constant<int64_t, 8>{}), true;
    case 16: return f(std::integral_constant<int64_t, 16>{}), true;
    default: return false;
  }
}

template <class F>
void dispatch_shape(int64_t rows, int64_t cols, F&& f) {
  if (dispatch_basis(rows, [&](auto R) { dispatch_width(cols, [&](auto C) { f(R, C); }); })) return;
  if (dispatch_basis(cols, [&](auto C) { dispatch_width(rows, [&](auto R) { f(R, C); }); })) return;
  dispatch_width(cols, [&](auto C) { f(rows, C); });
}

template <class N>
constexpr bool is_constant_v = !std::is_same_v<N, int64_t>;

// An R x C accumulator block: a fixed array when both sizes are compile-time constants (so it can
// stay in registers), a heap buffer otherwise.
template <class A, class Rows, class Cols>
auto make_block(Rows R, Cols C) {
  if constexpr (is_constant_v<Rows> && is_constant_v<Cols>) {
    return std::array<A, Rows::value * Cols::value>{};
  } else {
    return std::vector<A>(R * C);
  }
}

// Checks the y_index entries of segment s, if there is a y_index.
void check_y_index(const SegmentBilinearArgs& a, int64_t s) {
  if (!a.y_index) return;
  for (int64_t e = a.ptr[s]; e < a.ptr[s + 1]; ++e) check_index(a.y_index[e], e, a.num_y_rows, "y_index", "the rows of y");
}

// segment_outer over segments [s_begin, s_end), in acc_t<T>: row i of a segment's R x C block is
// accumulated over the segment's rows e in ascending order, one block row at a time, so its C
// accumulators stay in registers while the segment's few rows of y are re-read from L1 (5x
// faster than accumulating the whole block per row e, which spills it to memory).
template <class T, class Rows, class Cols>
void outer_segments(const SegmentBilinearArgs& a, Rows R, Cols C, int64_t s_begin, int64_t s_end) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* out = static_cast<T*>(a.out);
  const int64_t* y_index = a.y_index;
  auto acc = make_block<A>(std::integral_constant<int64_t, 1>{}, C);
  for (int64_t s = s_begin; s < s_end; ++s) {
    check_y_index(a, s);
    for (int64_t i = 0; i < R; ++i) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t e = a.ptr[s]; e < a.ptr[s + 1]; ++e) {
        const A x_ei = Acc<T>::load(x[e * R + i]);
        const T* y_e = y + (y_index ? y_index[e] : e) * C;
        for (int64_t j = 0; j < C; ++j) acc[j] += x_ei * Acc<T>::load(y_e[j]);
      }
      for (int64_t j = 0; j < C; ++j) out[(s * R + i) * C + j] = Acc<T>::store(acc[j]);
    }
  }
}

// 16 bytes of accumulators (4 float / 2 double lanes), as a GCC/Clang vector type: its
// arithmetic compiles to packed SSE/NEON instructions on the baseline target. Written this way
// because the auto-vectoriser turned the plain loops of segment_contract into shuffles that ran
// 2.5x slower.
template <class A>
struct VecOf;
template <>
struct VecOf<float> { typedef float type __attribute__((vector_size(16))); };
template <>
struct VecOf<double> { typedef double type __attribute__((vector_size(16))); };
template <class A>
using Vec = typename VecOf<A>::type;
template <class A>
constexpr int64_t kLanes = 16 / sizeof(A);

// Whether an R x C block with accumulators A fits whole vectors along R (both sizes known).
template <class A, class Rows, class Cols>
constexpr bool vector_rows() {
  if constexpr (is_constant_v<Rows> && is_constant_v<Cols>) return Rows::value % kLanes<A> == 0;
  return false;
}

// Lane l of an accumulator unit: a Vec<A>, or a single A (which has the one lane 0).
template <class U, class A>
void set_lane(U& unit, int64_t l, A value) {
  if constexpr (std::is_same_v<U, A>) unit = value; else unit[l] = value;
}

template <class A, class U>
A get_lane(const U& unit, int64_t l) {
  if constexpr (std::is_same_v<U, A>) return unit; else return unit[l];
}

// A whole vector from / to memory without an alignment requirement.
template <class U, class A>
U load_vec(const A* p) {
  U v;
  std::memcpy(&v, p, sizeof(U));
  return v;
}

template <class U, class A>
void store_vec(A* p, const U& v) {
  std::memcpy(p, &v, sizeof(U));
}

// segment_contract over segments [s_begin, s_end). The block is kept transposed ([C, R]) so the
// inner loop runs over R with independent accumulators; each out[e, i] sums its C terms in
// ascending j. With both sizes known and R a multiple of the vector width, the block and the
// accumulators are rows of K = R / lanes vectors; otherwise of K = R single values.
// With out_index, only the rows e with out_index[e] in [k_begin, k_end) are computed, and added
// to scattered [k_end - k_begin, R] (row out_index[e] - k_begin); returns how many there were.
template <class T, class Rows, class Cols>
int64_t contract_segments(const SegmentBilinearArgs& a, Rows R, Cols C, int64_t s_begin, int64_t s_end,
                          acc_t<T>* scattered = nullptr, int64_t k_begin = 0, int64_t k_end = 0) {
  using A = acc_t<T>;
  constexpr bool kVector = vector_rows<A, Rows, Cols>();
  using U = std::conditional_t<kVector, Vec<A>, A>;
  constexpr int64_t L = kVector ? kLanes<A> : 1;
  const auto K = [&] {
    if constexpr (kVector) return std::integral_constant<int64_t, Rows::value / L>{}; else return R;
  }();
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* out = static_cast<T*>(a.out);
  auto block_t = make_block<U>(C, K);
  auto sum = make_block<U>(std::integral_constant<int64_t, 1>{}, K);
  int64_t computed = 0;
  for (int64_t s = s_begin; s < s_end; ++s) {
    if (a.ptr[s] == a.ptr[s + 1]) continue;
    check_y_index(a, s);
    const T* x_s = x + s * R * C;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j)
        set_lane(block_t[j * K + i / L], i % L, Acc<T>::load(x_s[i * a.x_stride_r + j * a.x_stride_c]));
    for (int64_t e = a.ptr[s]; e < a.ptr[s + 1]; ++e) {
      const int64_t row = a.out_index ? a.out_index[e] : e;
      if (a.out_index && (row < k_begin || row >= k_end)) continue;
      ++computed;
      const T* y_e = y + (a.y_index ? a.y_index[e] : e) * C;
      std::fill(sum.begin(), sum.end(), U{});
      for (int64_t j = 0; j < C; ++j) {
        const A y_ej = Acc<T>::load(y_e[j]);
        for (int64_t k = 0; k < K; ++k) sum[k] += block_t[j * K + k] * y_ej;
      }
      if (a.out_index) {
        A* o = scattered + (row - k_begin) * R;
        if constexpr (kVector) {
          for (int64_t k = 0; k < K; ++k) store_vec(o + k * L, load_vec<U>(o + k * L) + sum[k]);
        } else {
          for (int64_t i = 0; i < R; ++i) o[i] += get_lane<A>(sum[i / L], i % L);
        }
      } else if constexpr (kVector && std::is_same_v<T, A>) {
        for (int64_t k = 0; k < K; ++k) store_vec(out + e * R + k * L, sum[k]);
      } else {
        for (int64_t i = 0; i < R; ++i) out[e * R + i] = Acc<T>::store(get_lane<A>(sum[i / L], i % L));
      }
    }
  }
  return computed;
}

// segment_contract with out_index: owner-computes over ranges of out rows, as scatter_rows, so
// each out row sums its rows e in ascending order on any thread count. A row with a bad
// out_index is skipped by every owner; the count of computed rows then falls short, and a
// serial scan names the first bad entry.
template <class T>
void contract_scattered(const SegmentBilinearArgs& a, int num_threads) {
  using A = acc_t<T>;
  T* out = static_cast<T*>(a.out);
  const int chunks = scatter_chunks(a.num_src, a.num_out_rows, a.rows, num_threads);
  std::vector<int64_t> computed(chunks, 0);
  parallel_for(chunks, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t k_begin = a.num_out_rows * c / chunks, k_end = a.num_out_rows * (c + 1) / chunks;
      std::vector<A> acc((k_end - k_begin) * a.rows, A(0));
      dispatch_shape(a.rows, a.cols, [&](auto R, auto C) {
        computed[c] = contract_segments<T>(a, R, C, 0, a.num_segments, acc.data(), k_begin, k_end);
      });
      for (int64_t i = 0; i < (k_end - k_begin) * a.rows; ++i) out[k_begin * a.rows + i] = Acc<T>::store(acc[i]);
    }
  });
  int64_t total = 0;
  for (int64_t n : computed) total += n;
  if (total != a.num_src) {
    for (int64_t e = 0; e < a.num_src; ++e) check_index(a.out_index[e], e, a.num_out_rows, "out_index", "the rows of out");
  }
}

}  // namespace

void check_ptr(const int64_t* ptr, int64_t num_segments, int64_t num_items) {
  JMP_CHECK(ptr[0] == 0, "ptr[0] must be 0, got ", ptr[0]);
  for (int64_t s = 0; s < num_segments; ++s) {
    JMP_CHECK(ptr[s + 1] >= ptr[s], "ptr must be non-decreasing, but ptr[", s, "] = ", ptr[s],
              " > ptr[", s + 1, "] = ", ptr[s + 1]);
  }
  JMP_CHECK(ptr[num_segments] == num_items, "ptr[-1] must equal the number of source rows (",
            num_items, "), got ", ptr[num_segments]);
}

void check_index(int64_t value, int64_t position, int64_t bound, const char* name,
                 const char* bound_name) {
  JMP_CHECK(value >= 0, name, "[", position, "] = ", value, " is negative");
  JMP_CHECK(value < bound, name, "[", position, "] = ", value, " is out of range for ",
            bound_name, " = ", bound);
}

void fill_slots(const PaddedIndex& p) {
  std::fill(p.slots, p.slots + p.num_rows * p.num_cols, int64_t{-1});
  for (int64_t t = 0; t < p.num_items; ++t) {
    check_index(p.row[t], t, p.num_rows, "row", "num_rows");
    check_index(p.col[t], t, p.num_cols, "col", "num_cols");
    int64_t& slot = p.slots[p.row[t] * p.num_cols + p.col[t]];
    JMP_CHECK(slot < 0, "(row, col) = (", p.row[t], ", ", p.col[t], ") appears twice, at items ",
              slot, " and ", t, "; each padded slot can hold one item");
    slot = t;
  }
}

void segment_reduce(const SegmentReduceArgs& a, int num_threads) {
  check_ptr(a.ptr, a.num_segments, a.num_src);
  dispatch_dtype(a.dtype, [&](auto t) {
    dispatch_reduce(a.reduce, [&](auto r) { reduce_segments<decltype(t), r()>(a, num_threads); });
  });
}

void scatter_reduce(const ScatterReduceArgs& a, int num_threads) {
  JMP_CHECK(a.reduce != Reduce::max, "scatter_reduce takes sum or mean");
  // Every output row's owner skips indices outside its range, so a bad index is never written
  // through; it only makes the count of accepted rows fall short. Then a serial scan names the
  // first bad entry (out, the caller's fresh buffer, is discarded with the error). This saves a
  // separate checking pass over the index.
  int64_t accepted = 0;
  dispatch_dtype(a.dtype, [&](auto t) {
    dispatch_reduce(a.reduce, [&](auto r) { accepted = scatter_rows<decltype(t), r()>(a, num_threads); });
  });
  if (accepted != a.num_src) {
    for (int64_t e = 0; e < a.num_src; ++e) check_index(a.index[e], e, a.dim_size, "index", "dim_size");
  }
}

void gather(const RowCopy& c, const int64_t* index, int64_t num_index, int64_t num_src_rows,
            int num_threads) {
  parallel_for(num_index, num_threads, std::max<int64_t>(1, kGrain / std::max<int64_t>(c.features, 1)),
               [&](int64_t begin, int64_t end) {
                 // Checked as it is read: one pass over the index (chunks run in order, so a
                 // bad entry found here is the first of its chunk; out is discarded on error).
                 copy_rows(c, begin, end, [&](int64_t i) {
                   int64_t k = index[i];
                   if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(num_src_rows))
                     check_index(k, i, num_src_rows, "index", "the number of source rows");
                   return k;
                 });
               });
}

void segment_broadcast(const RowCopy& c, const int64_t* ptr, int64_t num_segments,
                       int64_t num_out_rows, int num_threads) {
  check_ptr(ptr, num_segments, num_out_rows);
  for_segment_blocks(ptr, num_segments, c.features, num_threads, [&](int64_t s_begin, int64_t s_end) {
    for (int64_t s = s_begin; s < s_end; ++s) {
      copy_rows(c, ptr[s], ptr[s + 1], [s](int64_t) { return s; });
    }
  });
}

void ragged_to_padded(const RowCopy& c, const PaddedIndex& p, int num_threads) {
  fill_slots(p);
  int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(c.features, 1));
  parallel_for(p.num_rows * p.num_cols, num_threads, grain, [&](int64_t begin, int64_t end) {
    copy_rows(c, begin, end, [&](int64_t slot) { return p.slots[slot]; });
  });
}

void padded_to_ragged(const RowCopy& c, const PaddedIndex& p, int num_threads) {
  fill_slots(p);
  int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(c.features, 1));
  parallel_for(p.num_items, num_threads, grain, [&](int64_t begin, int64_t end) {
    copy_rows(c, begin, end, [&](int64_t t) { return p.row[t] * p.num_cols + p.col[t]; });
  });
}

void segment_outer(const SegmentBilinearArgs& a, int num_threads) {
  check_ptr(a.ptr, a.num_segments, a.num_src);
  dispatch_dtype(a.dtype, [&](auto t) {
    for_segment_blocks(a.ptr, a.num_segments, a.rows * a.cols, num_threads,
                       [&](int64_t s_begin, int64_t s_end) {
      dispatch_shape(a.rows, a.cols, [&](auto R, auto C) { outer_segments<decltype(t)>(a, R, C, s_begin, s_end); });
    });
  });
}

void segment_contract(const SegmentBilinearArgs& a, int num_threads) {
  check_ptr(a.ptr, a.num_segments, a.num_src);
  dispatch_dtype(a.dtype, [&](auto t) {
    if (a.out_index) return contract_scattered<decltype(t)>(a, num_threads);
    for_segment_blocks(a.ptr, a.num_segments, a.rows * a.cols, num_threads,
                       [&](int64_t s_begin, int64_t s_end) {
      dispatch_shape(a.rows, a.cols, [&](auto R, auto C) { contract_segments<decltype(t)>(a, R, C, s_begin, s_end); });
    });
  });
}

}  // namespace jmp_ext::reductions::cpu
