// GemNet-OC interaction indices: triplets, mixed triplets and quadruplets of edges.
//
// Semantics are those of GemNet-OC's interaction_indices.py (fairchem / JMP), see
// python/jmp_ext/ops/interaction_indices.py for the user-facing description. Every op is
// built the same way, so that its output has an exact size and a fixed order:
//   1. the input graph's edges are grouped by target (TargetCsr, a stable counting sort: inside a
//      target, edges are ordered by (source atom, edge index)),
//   2. a counting pass gives the number of pairs of every output edge; a prefix sum gives the
//      output offsets (CSR by output edge) and the total, which the caller allocates,
//   3. a filling pass writes each output edge's pairs to its own range, in CSR order.
// Output edges are disjoint work items, so results are bitwise identical for any thread count.
//
// Conventions: edge e goes from source[e] (neighbour) to target[e] (centre);
// cell_offset[3e..3e+2] is the integer lattice shift of the source image.
// Graphs, CSR pointers and offsets are int64; counts are checked for overflow (InvalidInput).
// The indices an op writes are of type Index, int32_t or int64_t: the caller picks int32 only
// when the edge counts and the totals of the counting passes fit it.
#pragma once

#include <cstdint>

#include "common/hd.h"

#ifdef JMP_EXT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace jmp_ext::interaction_indices {

// A read-only view of one graph's edges.
struct Graph {
  const int64_t* source = nullptr;       // [num_edges]
  const int64_t* target = nullptr;       // [num_edges]
  const int32_t* cell_offset = nullptr;  // [num_edges, 3]
  int64_t num_edges = 0;
};

// Which pairs (in edge, out edge) a triplet op enumerates, and which it drops.
enum class Pairing : int32_t {
  // Triplets of one graph: in b->a, out c->a; drop in == out (edge identity, so two images of
  // the same atom pair are different edges).
  kSameGraph = 0,
  // Mixed triplets (to_outedge=False): in b->a, out c->a; drop b == c with equal offsets.
  kSharedTarget = 1,
  // Mixed triplets (to_outedge=True): in d->b, out b->a; drop d == a with off_db + off_ba == 0.
  kInTargetIsOutSource = 2,
};

// a + sign_b * b + sign_c * c == 0 in all three components (c may be null), summed in int64:
// offsets near the int32 limits would overflow int32 (undefined), and could wrap to 0.
JMP_HD bool net_shift_is_zero(const int32_t* a, const int32_t* b, int sign_b,
                              const int32_t* c = nullptr, int sign_c = 0) {
  for (int k = 0; k < 3; ++k) {
    int64_t sum = int64_t{a[k]} + int64_t{sign_b} * b[k] + (c ? int64_t{sign_c} * c[k] : 0);
    if (sum != 0) return false;
  }
  return true;
}

// True when the pair (in edge i, out edge o) closes on itself and is not a triplet.
JMP_HD bool drops_pair(Pairing pairing, const Graph& in, int64_t i, const Graph& out, int64_t o) {
  switch (pairing) {
    case Pairing::kSameGraph:
      return i == o;
    case Pairing::kSharedTarget:
      return in.source[i] == out.source[o] &&
             net_shift_is_zero(out.cell_offset + 3 * o, in.cell_offset + 3 * i, -1);
    case Pairing::kInTargetIsOutSource:
      return in.source[i] == out.target[o] &&
             net_shift_is_zero(out.cell_offset + 3 * o, in.cell_offset + 3 * i, 1);
  }
  return false;
}

// True when quadruplet d->b->a<-c closes (c == d as atoms, off_db + off_ba - off_ca == 0).
JMP_HD bool drops_quad(const Graph& main, const Graph& qint, int64_t db, int64_t ba, int64_t ca) {
  return main.source[db] == main.source[ca] &&
         net_shift_is_zero(main.cell_offset + 3 * db, qint.cell_offset + 3 * ba, 1,
                           main.cell_offset + 3 * ca, -1);
}

// Edges grouped by target: those of atom a are order[ptr[a] .. ptr[a+1]).
struct TargetCsr {
  int64_t* ptr = nullptr;    // [num_atoms + 1]
  int64_t* order = nullptr;  // [num_edges]
};

// Triplets of (in, out) edge pairs, the output as a CSR over out edges.
template <class Index>
struct TripletArgs {
  Graph in, out;
  Pairing pairing = Pairing::kSameGraph;
  int64_t num_atoms = 0;
  const char* out_name = "out";      // names the out graph in error messages (host only)
  const int64_t* in_ptr = nullptr;    // TargetCsr of `in`
  const int64_t* in_order = nullptr;
  int64_t* offsets = nullptr;         // [out.num_edges + 1], written by the counting pass
  Index* idx_in = nullptr;            // [T] in edge of each triplet
  Index* idx_out = nullptr;           // [T] out edge, ascending
  Index* out_agg = nullptr;           // [T] rank among the triplets of its out edge
};

// Quadruplets d->b->a<-c from an input triplet (d->b main, b->a qint) and an output triplet
// (b->a qint, c->a main), as produced by the two triplet ops with their offsets.
template <class Index>
struct QuadArgs {
  Graph main, qint;
  const int64_t* tin_ptr = nullptr;    // [qint.num_edges + 1] triplet_in CSR by qint edge b->a
  const Index* tin_in = nullptr;       // [T_in] main edge d->b of each input triplet
  const int64_t* tout_ptr = nullptr;   // [main.num_edges + 1] triplet_out CSR by main edge c->a
  const Index* tout_in = nullptr;      // [T_out] qint edge b->a of each output triplet
  int64_t* candidates = nullptr;       // [T_out] scratch, written by the counting pass
  int64_t* offsets = nullptr;          // [main.num_edges + 1], written by the counting pass
  Index* out = nullptr;                // [Q] main edge c->a, ascending
  Index* trip_out_to_quad = nullptr;   // [Q] index into triplet_out
  Index* trip_in_to_quad = nullptr;    // [Q] index into triplet_in
  Index* out_agg = nullptr;            // [Q] rank among the quadruplets of its out edge
};

// ---- per-output-edge work, shared by the CPU loops and the CUDA kernels ----
//
// The in edges paired with an out edge are a TargetCsr range, sorted by source atom, and only
// those with one particular source atom can close on the out edge and be dropped. So each
// range is searched for that atom's sub-range (a branch-free binary search) and only the
// sub-range is tested; everything else is kept without a look and written as long runs of
// plain sequential stores. This holds for the quadruplets too: an input-triplet range (the in
// edges d->b of one qint edge b->a) is a TargetCsr range of the main graph at b.

// The atom whose in-edges are paired with out edge e (the CSR row to read).
JMP_HD int64_t pivot_atom(Pairing pairing, const Graph& out, int64_t e) {
  return pairing == Pairing::kInTargetIsOutSource ? out.source[e] : out.target[e];
}

// The source atom of the in edges that drops_pair may reject for out edge e.
JMP_HD int64_t droppable_source(Pairing pairing, const Graph& out, int64_t e) {
  return pairing == Pairing::kInTargetIsOutSource ? out.target[e] : out.source[e];
}

// First k in [begin, end) with source(k) >= atom, for source non-decreasing on [begin, end).
template <class Source>
JMP_HD int64_t lower_bound_of(int64_t begin, int64_t end, int64_t atom, Source source) {
  if (begin == end) return begin;
  int64_t base = begin, n = end - begin;
  while (n > 1) {
    int64_t half = n / 2;
    base = source(base + half) < atom ? base + half : base;
    n -= half;
  }
  return base + (source(base) < atom);
}

// Calls keep(run_begin, run_end) on each maximal run of [begin, end) free of items that drop(k)
// rejects, in order, and returns the number of items kept. Only the candidates are tested: the
// items from `candidates` (= lower_bound_of(begin, end, atom, source)) on with source(k) == atom.
template <class Source, class Drop, class Keep>
JMP_HD int64_t for_each_kept_run(int64_t begin, int64_t end, int64_t candidates, int64_t atom,
                                 Source source, Drop drop, Keep keep) {
  int64_t run = begin, kept = 0;
  for (int64_t k = candidates; k < end && source(k) == atom; ++k) {
    if (!drop(k)) continue;
    if (k > run) keep(run, k);
    kept += k - run;
    run = k + 1;
  }
  if (end > run) keep(run, end);
  return kept + (end - run);
}

// Runs for_each_kept_run over the in edges of out edge o.
template <class Index, class Keep>
JMP_HD int64_t for_each_triplet_run(const TripletArgs<Index>& args, int64_t o, Keep keep) {
  const int64_t atom = pivot_atom(args.pairing, args.out, o);
  const int64_t begin = args.in_ptr[atom], end = args.in_ptr[atom + 1];
  const int64_t source_atom = droppable_source(args.pairing, args.out, o);
  const int64_t* order = args.in_order;
  auto source = [&](int64_t k) { return args.in.source[order[k]]; };
  return for_each_kept_run(
      begin, end, lower_bound_of(begin, end, source_atom, source), source_atom, source,
      [&](int64_t k) { return drops_pair(args.pairing, args.in, order[k], args.out, o); }, keep);
}

// Number of triplets of out edge o, or -1 when o's atoms are not in [0, num_atoms).
template <class Index>
JMP_HD int64_t count_triplets_of(const TripletArgs<Index>& args, int64_t o) {
  int64_t s = args.out.source[o], t = args.out.target[o];
  if (s < 0 || s >= args.num_atoms || t < 0 || t >= args.num_atoms) return -1;
  return for_each_triplet_run(args, o, [](int64_t, int64_t) {});
}

// Writes the triplets of out edge o to [offsets[o], offsets[o+1]), in the TargetCsr order.
template <class Index>
JMP_HD void fill_triplets_of(const TripletArgs<Index>& args, int64_t o) {
  const int64_t first = args.offsets[o];
  int64_t rank = 0;
  for_each_triplet_run(args, o, [&](int64_t begin, int64_t end) {
    // Index-typed counters, so that the vectorised stores use Index-wide lanes.
    Index* __restrict__ idx_in = args.idx_in + first + rank;
    Index* __restrict__ idx_out = args.idx_out + first + rank;
    Index* __restrict__ out_agg = args.out_agg + first + rank;
    const int64_t* order = args.in_order + begin;
    const Index n = static_cast<Index>(end - begin), r = static_cast<Index>(rank), out = static_cast<Index>(o);
    for (Index m = 0; m < n; ++m) {
      idx_in[m] = static_cast<Index>(order[m]);
      idx_out[m] = out;
      out_agg[m] = r + m;
    }
    rank += n;
  });
}

// Runs for_each_kept_run over the input triplets of output triplet t (qint edge ba) for main
// edge ca: the input triplets d->b->a with d == c are the candidates of drops_quad. The
// counting pass searches for them and records where they start in args.candidates[t], which
// the filling pass reads back (`counting`: search and record, else read).
template <class Index, class Keep>
JMP_HD int64_t for_each_quadruplet_run(const QuadArgs<Index>& args, int64_t ca, int64_t t,
                                       bool counting, Keep keep) {
  const int64_t ba = args.tout_in[t], begin = args.tin_ptr[ba], end = args.tin_ptr[ba + 1];
  const int64_t c = args.main.source[ca];
  const Index* tin_in = args.tin_in;
  auto source = [&](int64_t j) { return args.main.source[tin_in[j]]; };
  int64_t candidates;
  if (counting) {
    candidates = lower_bound_of(begin, end, c, source);
    args.candidates[t] = candidates;
  } else {
    candidates = args.candidates[t];
  }
  return for_each_kept_run(
      begin, end, candidates, c, source,
      [&](int64_t j) { return drops_quad(args.main, args.qint, tin_in[j], ba, ca); }, keep);
}

// Number of quadruplets of main edge c->a (= ca).
template <class Index>
JMP_HD int64_t count_quadruplets_of(const QuadArgs<Index>& args, int64_t ca) {
  int64_t n = 0;
  for (int64_t t = args.tout_ptr[ca]; t < args.tout_ptr[ca + 1]; ++t)
    n += for_each_quadruplet_run(args, ca, t, true, [](int64_t, int64_t) {});
  return n;
}

// Writes the quadruplets of main edge ca, ordered by (output triplet, input triplet).
template <class Index>
JMP_HD void fill_quadruplets_of(const QuadArgs<Index>& args, int64_t ca) {
  const int64_t first = args.offsets[ca];
  int64_t rank = 0;
  for (int64_t t = args.tout_ptr[ca]; t < args.tout_ptr[ca + 1]; ++t) {
    for_each_quadruplet_run(args, ca, t, false, [&](int64_t begin, int64_t end) {
      Index* __restrict__ out = args.out + first + rank;
      Index* __restrict__ trip_out_to_quad = args.trip_out_to_quad + first + rank;
      Index* __restrict__ trip_in_to_quad = args.trip_in_to_quad + first + rank;
      Index* __restrict__ out_agg = args.out_agg + first + rank;
      const Index n = static_cast<Index>(end - begin), r = static_cast<Index>(rank);
      const Index edge = static_cast<Index>(ca), triplet = static_cast<Index>(t), in = static_cast<Index>(begin);
      for (Index m = 0; m < n; ++m) {
        out[m] = edge;
        trip_out_to_quad[m] = triplet;
        trip_in_to_quad[m] = in + m;
        out_agg[m] = r + m;
      }
      rank += n;
    });
  }
}

namespace cpu {
// Validates 0 <= source, target < num_atoms (InvalidInput naming `name`) and fills csr.
// scratch: [num_atoms + 1 + num_edges] int64.
// (Serial: a two-pass counting sort, O(num_atoms + E), is memory-bound and short.)
void target_csr(const Graph& graph, int64_t num_atoms, const char* name, TargetCsr csr,
                int64_t* scratch);
// Counting pass + prefix sum into args.offsets; returns the number of triplets.
// (Instantiated for Index = int32_t and int64_t.)
template <class Index>
int64_t count_triplets(const TripletArgs<Index>& args, int num_threads);
template <class Index>
void fill_triplets(const TripletArgs<Index>& args, int num_threads);
template <class Index>
int64_t count_quadruplets(const QuadArgs<Index>& args, int num_threads);
template <class Index>
void fill_quadruplets(const QuadArgs<Index>& args, int num_threads);
}  // namespace cpu

#ifdef JMP_EXT_WITH_CUDA
namespace cuda {
// The per-edge passes on the GPU: device pointers, work queued on `stream`, no synchronisation.
// The TargetCsr (a stable sort) and the prefix sum are torch.sort / torch.cumsum on the GPU, done
// by the caller (python/jmp_ext/ops/interaction_indices.py), which also reads back the total.
// count_* write the count of out edge o to offsets[o + 1] (-1 when o has an atom index outside
// [0, num_atoms)); fill_* expect offsets to hold the exclusive prefix sum.
// (Instantiated for Index = int32_t and int64_t.)
template <class Index>
void count_triplets(const TripletArgs<Index>& args, cudaStream_t stream);
template <class Index>
void fill_triplets(const TripletArgs<Index>& args, cudaStream_t stream);
template <class Index>
void count_quadruplets(const QuadArgs<Index>& args, cudaStream_t stream);
template <class Index>
void fill_quadruplets(const QuadArgs<Index>& args, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace jmp_ext::interaction_indices
