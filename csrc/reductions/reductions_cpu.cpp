// CPU kernels of csrc/reductions: deterministic on any thread count, because every output row is
// produced by exactly one thread, in a fixed order of its inputs; threads only decide who does
// which rows.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
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

// The position of a row inside its segment while max runs over it: as wide as the accumulator,
// so that its select vectorises with the compare (an int64 select on a float compare does not).
template <class A>
using rel_t = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;

// max of the rows [first, first + count) of x (F features, contiguous, float or double) into
// acc [F] and their positions into arg [F], for a small compile-time F. Two passes instead of one
// chain of compare-and-selects per feature, whose latency had kept F = 1-4 at 0.72-0.77x
// torch.segment_reduce (which keeps no position); now 0.9x at F = 1, 1.0x at 3, 1.1x at 4
// (bench/README.md). First the maximum ignoring NaN and whether there is a NaN, kRows rows at a
// time with independent accumulators (straight code that vectorises), folded in halves; then a
// scan for the first element equal to that maximum (or the first NaN). The value written is
// that element's own, so of -0 and +0 the first one wins, as in the one-pass kernel.
template <class T, int64_t F>
void max_two_pass(const T* x, int64_t first, int64_t count, T* acc, int64_t* arg) {
  using Mask = rel_t<T>;  // an all-ones / zero lane mask as wide as T, so that the ORs vectorise
  constexpr int64_t kRows = F == 1 ? 4 : 8;  // F = 1: one 16-byte vector of floats, a short fold
  T best[kRows * F];
  Mask nan[kRows * F];
  for (int64_t j = 0; j < kRows * F; ++j) {
    best[j] = -std::numeric_limits<T>::infinity();
    nan[j] = 0;
  }
  const T* rows = x + first * F;
  int64_t k = 0;
  for (; k + kRows <= count; k += kRows) {
    const T* block = rows + k * F;
    for (int64_t j = 0; j < kRows * F; ++j) {
      best[j] = block[j] > best[j] ? block[j] : best[j];
      nan[j] |= -static_cast<Mask>(block[j] != block[j]);
    }
  }
  for (; k < count; ++k) {
    for (int64_t f = 0; f < F; ++f) {
      const T v = rows[k * F + f];
      best[f] = v > best[f] ? v : best[f];
      nan[f] |= -static_cast<Mask>(v != v);
    }
  }
  // Fold the kRows partial results in halves (straight code too) into the first row of each.
  for (int64_t half = kRows / 2; half >= 1; half /= 2) {
    for (int64_t j = 0; j < half * F; ++j) {
      best[j] = best[j + half * F] > best[j] ? best[j + half * F] : best[j];
      nan[j] |= nan[j + half * F];
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    const T m = best[f];
    const bool any_nan = nan[f];
    int64_t e = 0;
    if (any_nan) {
      while (rows[e * F + f] == rows[e * F + f]) ++e;
    } else {
      while (rows[e * F + f] != m) ++e;
    }
    acc[f] = rows[e * F + f];
    arg[f] = first + e;
  }
}

// Accumulates segment s with F features (an int64_t, or an integral_constant for the small F
// that dispatch_features singles out) into acc/arg [F]; max uses rel [F] as scratch.
template <class T, Reduce R, class Features>
void accumulate(const SegmentReduceArgs& a, Features F, int64_t s, acc_t<T>* acc, int64_t* arg,
                rel_t<acc_t<T>>* rel) {
  using A = acc_t<T>;
  using Red = Reducer<R, A>;
  const T* src = static_cast<const T*>(a.src);
  const int64_t first = a.ptr[s], count = a.ptr[s + 1] - first;
  auto row_of = [&](int64_t e) { return a.perm ? a.perm[e] : e; };
  if constexpr (R == Reduce::max && !std::is_integral_v<Features> && std::is_same_v<T, A>) {
    if (count > 0 && !a.perm) return max_two_pass<T, Features::value>(src, first, count, acc, arg);
  }
  if constexpr (R == Reduce::max) {
    if (count > 0 && count <= std::numeric_limits<rel_t<A>>::max()) {
      // The first row starts the maximum, so the update of the others has no "empty yet" case
      // and compiles to vectorised selects instead of branches.
      const T* x = src + row_of(first) * F;
      for (int64_t f = 0; f < F; ++f) {
        acc[f] = Acc<T>::load(x[f]);
        rel[f] = 0;
      }
      for (int64_t k = 1; k < count; ++k) {
        x = src + row_of(first + k) * F;
        const rel_t<A> position = static_cast<rel_t<A>>(k);
        for (int64_t f = 0; f < F; ++f) Red::update_started(acc[f], rel[f], Acc<T>::load(x[f]), position);
      }
      for (int64_t f = 0; f < F; ++f) arg[f] = row_of(first + rel[f]);
      return;
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    acc[f] = Red::init();
    arg[f] = kNoArg;
  }
  for (int64_t e = first; e < first + count; ++e) {
    int64_t row = row_of(e);
    const T* x = src + row * F;
    for (int64_t f = 0; f < F; ++f) Red::update(acc[f], arg[f], Acc<T>::load(x[f]), row);
  }
}

// Reduces segments [s_begin, s_end) into out (and arg for max), with accumulators acc/arg/rel [F].
template <class T, Reduce R, class Features>
void reduce_block(const SegmentReduceArgs& a, Features F, int64_t s_begin, int64_t s_end, acc_t<T>* acc,
                  int64_t* arg, rel_t<acc_t<T>>* rel) {
  using Red = Reducer<R, acc_t<T>>;
  T* out = static_cast<T*>(a.out);
  for (int64_t s = s_begin; s < s_end; ++s) {
    accumulate<T, R>(a, F, s, acc, arg, rel);
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
        std::vector<rel_t<A>> rel(F);
        reduce_block<T, R>(a, F, s_begin, s_end, acc.data(), arg.data(), rel.data());
      } else {
        A acc[decltype(F)::value];
        int64_t arg[decltype(F)::value];
        rel_t<A> rel[decltype(F)::value];
        reduce_block<T, R>(a, F, s_begin, s_end, acc, arg, rel);
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

// The accumulators of output rows [begin, end), `width` values each, set to `init`: those rows
// of out themselves where T accumulates in T (float32, float64), so a scatter needs no second
// output-sized buffer; a buffer of acc_t<T> beside them for bf16, which the caller stores into
// out when it is done (kInPlace false).
template <class T>
class RowAccumulators {
 public:
  static constexpr bool kInPlace = std::is_same_v<T, acc_t<T>>;

  RowAccumulators(T* out, int64_t begin, int64_t end, int64_t width, acc_t<T> init) {
    if constexpr (kInPlace) {
      data_ = out + begin * width;
      std::fill(data_, data_ + (end - begin) * width, init);
    } else {
      buffer_.assign((end - begin) * width, init);
      data_ = buffer_.data();
    }
  }
  acc_t<T>* data() { return data_; }

 private:
  std::vector<acc_t<T>> buffer_;
  acc_t<T>* data_;
};

// Returns how many rows had an index in [0, dim_size): the others were skipped.
template <class T, Reduce R, class Index>
int64_t scatter_rows(const ScatterReduceArgs& a, const Index* index, int num_threads) {
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
        RowAccumulators<T> acc(out, k_begin, k_end, F, Red::init());
        std::vector<int64_t> count(kCounts ? k_end - k_begin : 0, 0);
        int64_t unused_arg = kNoArg;  // sum and mean keep no argument
        int64_t mine = 0;  // counted locally: the threads' accepted[] entries share a cache line
        for (int64_t e = 0; e < a.num_src; ++e) {
          int64_t k = index[e];
          if (k < k_begin || k >= k_end) continue;
          ++mine;
          if constexpr (kCounts) ++count[k - k_begin];
          const T* x = src + e * F;
          A* y = acc.data() + (k - k_begin) * F;
          for (int64_t f = 0; f < F; ++f) Red::update(y[f], unused_arg, Acc<T>::load(x[f]), e);
        }
        if constexpr (kCounts || !RowAccumulators<T>::kInPlace) {
          for (int64_t k = k_begin; k < k_end; ++k) {
            const A* y = acc.data() + (k - k_begin) * F;
            for (int64_t f = 0; f < F; ++f)  // (an empty row's sum is its initial 0)
              out[k * F + f] = Acc<T>::store(kCounts ? Red::finish(y[f], count[k - k_begin]) : y[f]);
          }
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

// Checks the y_index entries of segment s, if there is a y_index.
void check_y_index(const SegmentBilinearArgs& a, int64_t s) {
  if (!a.y_index) return;
  const int64_t begin = a.ptr[s], end = a.ptr[s + 1];
  // A branch-free scan first (it runs for every segment of every call); the out-of-line
  // check_index that names the entry only once one is bad.
  const bool bad = visit_index(a.y_index, [&](auto index) {
    bool any = false;
    for (int64_t e = begin; e < end; ++e)
      any |= static_cast<uint64_t>(int64_t{index[e]}) >= static_cast<uint64_t>(a.num_y_rows);
    return any;
  });
  if (!bad) return;
  for (int64_t e = begin; e < end; ++e) check_index(a.y_index[e], e, a.num_y_rows, "y_index", "the rows of y");
}

}  // namespace

// The bilinear kernels are compute-bound (the 32-slab batch has 5 M quadruplets), so they are
// built twice: for the baseline ISA, and for AVX2 + FMA (8 float lanes, fused multiply-adds),
// chosen at run time by the CPU (bench/README.md, "AVX2 + FMA build"). Only GCC's target pragma is used;
// other compilers build the baseline copy alone.
namespace baseline {
namespace {
constexpr int kVectorBytes = 16;
#include "reductions/segment_bilinear_cpu.inc"
}  // namespace
}  // namespace baseline

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define JMP_EXT_AVX2_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {
constexpr int kVectorBytes = 32;
#include "reductions/segment_bilinear_cpu.inc"
}  // namespace
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {
// Whether segment_outer / segment_contract run their AVX2 build: where the CPU has AVX2 and FMA,
// unless JMP_EXT_CPU_ISA=baseline. Decided once.
bool avx2_chosen() {
#ifdef JMP_EXT_AVX2_KERNELS
  static const bool chosen = [] {
    const char* forced = std::getenv("JMP_EXT_CPU_ISA");
    const bool baseline = forced && std::strcmp(forced, "baseline") == 0;
    JMP_CHECK(!forced || !*forced || baseline, "JMP_EXT_CPU_ISA must be unset, empty or 'baseline', got '",
              forced, "'");
    return !baseline && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return chosen;
#else
  return false;
#endif
}
}  // namespace

const char* bilinear_isa() { return avx2_chosen() ? "avx2" : "baseline"; }

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
    dispatch_reduce(a.reduce, [&](auto r) {
      visit_index(a.index, [&](auto index) {
        accepted = scatter_rows<decltype(t), r()>(a, index, num_threads);
      });
    });
  });
  if (accepted != a.num_src) {
    for (int64_t e = 0; e < a.num_src; ++e) check_index(a.index[e], e, a.dim_size, "index", "dim_size");
  }
}

void gather(const RowCopy& c, IndexArray index_array, int64_t num_index, int64_t num_src_rows,
            int num_threads) {
  visit_index(index_array, [&](auto index) {
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
#ifdef JMP_EXT_AVX2_KERNELS
  if (avx2_chosen()) return avx2::run_segment_outer(a, num_threads);
#endif
  baseline::run_segment_outer(a, num_threads);
}

void segment_contract(const SegmentBilinearArgs& a, int num_threads) {
  check_ptr(a.ptr, a.num_segments, a.num_src);
#ifdef JMP_EXT_AVX2_KERNELS
  if (avx2_chosen()) return avx2::run_segment_contract(a, num_threads);
#endif
  baseline::run_segment_contract(a, num_threads);
}

}  // namespace jmp_ext::reductions::cpu
