// CPU backend of the interaction indices: serial stable counting sorts for the TargetCsr (O(E+N),
// a small part of the cost), then counting and filling passes split over output edges with the
// deterministic parallel_for.
#include <algorithm>

#include "common/check.h"
#include "common/parallel.h"
#include "interaction_indices/interaction_indices.h"

namespace jmp_ext::interaction_indices::cpu {

namespace {

// Output edges are cheap work items (a few dozen pairs each): below this many per thread,
// starting a thread costs more than it saves.
constexpr int64_t kGrain = 2048;

// counts in offsets[1..n] -> exclusive prefix sum in offsets[0..n]; returns the total.
int64_t prefix_sum(int64_t* offsets, int64_t n, const char* what) {
  offsets[0] = 0;
  for (int64_t k = 1; k <= n; ++k) {
    JMP_CHECK(!__builtin_add_overflow(offsets[k - 1], offsets[k], &offsets[k]), "the number of ",
              what, " overflows int64");
  }
  return offsets[n];
}

}  // namespace

void target_csr(const Graph& graph, int64_t num_atoms, const char* name, TargetCsr csr,
                int64_t* scratch) {
  const int64_t E = graph.num_edges;
  for (int64_t e = 0; e < E; ++e) {
    int64_t s = graph.source[e], t = graph.target[e];
    JMP_CHECK(s >= 0 && s < num_atoms && t >= 0 && t < num_atoms, name, ": edge ", e, " (", s,
              " -> ", t, ") has an atom index outside [0, num_atoms = ", num_atoms, ")");
  }
  // Radix sort by (target, source), each pass a stable counting sort, so that ties keep edge
  // order: first by source into `by_source`, then by target into csr.order.
  int64_t* start = scratch;                   // [num_atoms + 1] cursors
  int64_t* by_source = scratch + num_atoms + 1;  // [E]
  std::fill(start, start + num_atoms + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++start[graph.source[e] + 1];
  for (int64_t a = 0; a < num_atoms; ++a) start[a + 1] += start[a];
  for (int64_t e = 0; e < E; ++e) by_source[start[graph.source[e]]++] = e;

  int64_t* ptr = csr.ptr;
  std::fill(ptr, ptr + num_atoms + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++ptr[graph.target[e] + 1];
  for (int64_t a = 0; a < num_atoms; ++a) ptr[a + 1] += ptr[a];
  std::copy(ptr, ptr + num_atoms, start);
  for (int64_t k = 0; k < E; ++k) csr.order[start[graph.target[by_source[k]]]++] = by_source[k];
}

template <class Index>
int64_t count_triplets(const TripletArgs<Index>& args, int num_threads) {
  const int64_t E = args.out.num_edges;
  parallel_for(E, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) args.offsets[o + 1] = count_triplets_of(args, o);
  });
  for (int64_t o = 0; o < E; ++o) {
    JMP_CHECK(args.offsets[o + 1] >= 0, args.out_name, ": edge ", o, " (", args.out.source[o],
              " -> ", args.out.target[o], ") has an atom index outside [0, num_atoms = ",
              args.num_atoms, ")");
  }
  return prefix_sum(args.offsets, E, "triplets");
}

template <class Index>
void fill_triplets(const TripletArgs<Index>& args, int num_threads) {
  parallel_for(args.out.num_edges, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) fill_triplets_of(args, o);
  });
}

template <class Index>
int64_t count_quadruplets(const QuadArgs<Index>& args, int num_threads) {
  const int64_t E = args.main.num_edges;
  parallel_for(E, num_threads, kGrain / 16, [&](int64_t begin, int64_t end) {
    for (int64_t ca = begin; ca < end; ++ca) args.offsets[ca + 1] = count_quadruplets_of(args, ca);
  });
  return prefix_sum(args.offsets, E, "quadruplets");
}

template <class Index>
void fill_quadruplets(const QuadArgs<Index>& args, int num_threads) {
  parallel_for(args.main.num_edges, num_threads, kGrain / 16, [&](int64_t begin, int64_t end) {
    for (int64_t ca = begin; ca < end; ++ca) fill_quadruplets_of(args, ca);
  });
}

#define JMP_EXT_INSTANTIATE(Index)                                                     \
  template int64_t count_triplets(const TripletArgs<Index>&, int);                   \
  template void fill_triplets(const TripletArgs<Index>&, int);                       \
  template int64_t count_quadruplets(const QuadArgs<Index>&, int);                   \
  template void fill_quadruplets(const QuadArgs<Index>&, int);
JMP_EXT_INSTANTIATE(int32_t)
JMP_EXT_INSTANTIATE(int64_t)
#undef JMP_EXT_INSTANTIATE

}  // namespace jmp_ext::interaction_indices::cpu
