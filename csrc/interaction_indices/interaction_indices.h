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
// All indices are int64; counts are checked for overflow (InvalidInput).
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

// a + sign_b * b + sign_c * c == 0 in all three components (c may be null).
JMP_HD bool net_shift_is_zero(const int32_t* a, const int32_t* b, int sign_b,
                              const int32_t* c = nullptr, int sign_c = 0) {
  for (int k = 0; k < 3; ++k)
    if (a[k] + sign_b * b[k] + (c ? sign_c * c[k] : 0) != 0) return false;
  return true;
}

// The atom whose in-edges are paired with out edge e (the CSR row to read).
JMP_HD int64_t pivot_atom(Pairing pairing, const Graph& out, int64_t e) {
  return pairing == Pairing::kInTargetIsOutSource ? out.source[e] : out.target[e];
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
struct TripletArgs {
  Graph in, out;
  Pairing pairing = Pairing::kSameGraph;
  int64_t num_atoms = 0;
  const char* out_name = "out";      // names the out graph in error messages (host only)
  const int64_t* in_ptr = nullptr;    // TargetCsr of `in`
  const int64_t* in_order = nullptr;
  int64_t* offsets = nullptr;         // [out.num_edges + 1], written by the counting pass
  int64_t* idx_in = nullptr;          // [T] in edge of each triplet
  int64_t* idx_out = nullptr;         // [T] out edge, ascending
  int64_t* out_agg = nullptr;         // [T] rank among the triplets of its out edge
};

// Quadruplets d->b->a<-c from an input triplet (d->b main, b->a qint) and an output triplet
// (b->a qint, c->a main), as produced by the two triplet ops with their offsets.
struct QuadArgs {
  Graph main, qint;
  const int64_t* tin_ptr = nullptr;    // [qint.num_edges + 1] triplet_in CSR by qint edge b->a
  const int64_t* tin_in = nullptr;     // [T_in] main edge d->b of each input triplet
  const int64_t* tout_ptr = nullptr;   // [main.num_edges + 1] triplet_out CSR by main edge c->a
  const int64_t* tout_in = nullptr;    // [T_out] qint edge b->a of each output triplet
  int64_t* offsets = nullptr;          // [main.num_edges + 1], written by the counting pass
  int64_t* out = nullptr;              // [Q] main edge c->a, ascending
  int64_t* trip_out_to_quad = nullptr; // [Q] index into triplet_out
  int64_t* trip_in_to_quad = nullptr;  // [Q] index into triplet_in
  int64_t* out_agg = nullptr;          // [Q] rank among the quadruplets of its out edge
};

// ---- per-output-edge work, shared by the CPU loops and the CUDA kernels ----

// Number of triplets of out edge o, or -1 when o's atoms are not in [0, num_atoms).
JMP_HD int64_t count_triplets_of(const TripletArgs& args, int64_t o) {
  int64_t s = args.out.source[o], t = args.out.target[o];
  if (s < 0 || s >= args.num_atoms || t < 0 || t >= args.num_atoms) return -1;
  int64_t atom = pivot_atom(args.pairing, args.out, o);
  int64_t n = 0;
  for (int64_t k = args.in_ptr[atom]; k < args.in_ptr[atom + 1]; ++k)
    n += !drops_pair(args.pairing, args.in, args.in_order[k], args.out, o);
  return n;
}

// Writes the triplets of out edge o to [offsets[o], offsets[o+1]), in the TargetCsr order.
JMP_HD void fill_triplets_of(const TripletArgs& args, int64_t o) {
  int64_t atom = pivot_atom(args.pairing, args.out, o);
  int64_t first = args.offsets[o], pos = first;
  for (int64_t k = args.in_ptr[atom]; k < args.in_ptr[atom + 1]; ++k) {
    int64_t i = args.in_order[k];
    if (drops_pair(args.pairing, args.in, i, args.out, o)) continue;
    args.idx_in[pos] = i;
    args.idx_out[pos] = o;
    args.out_agg[pos] = pos - first;
    ++pos;
  }
}

// Number of quadruplets of main edge c->a (= ca).
JMP_HD int64_t count_quadruplets_of(const QuadArgs& args, int64_t ca) {
  int64_t n = 0;
  for (int64_t t = args.tout_ptr[ca]; t < args.tout_ptr[ca + 1]; ++t) {
    int64_t ba = args.tout_in[t];
    for (int64_t j = args.tin_ptr[ba]; j < args.tin_ptr[ba + 1]; ++j)
      n += !drops_quad(args.main, args.qint, args.tin_in[j], ba, ca);
  }
  return n;
}

// Writes the quadruplets of main edge ca, ordered by (output triplet, input triplet).
JMP_HD void fill_quadruplets_of(const QuadArgs& args, int64_t ca) {
  int64_t first = args.offsets[ca], pos = first;
  for (int64_t t = args.tout_ptr[ca]; t < args.tout_ptr[ca + 1]; ++t) {
    int64_t ba = args.tout_in[t];
    for (int64_t j = args.tin_ptr[ba]; j < args.tin_ptr[ba + 1]; ++j) {
      if (drops_quad(args.main, args.qint, args.tin_in[j], ba, ca)) continue;
      args.out[pos] = ca;
      args.trip_out_to_quad[pos] = t;
      args.trip_in_to_quad[pos] = j;
      args.out_agg[pos] = pos - first;
      ++pos;
    }
  }
}

namespace cpu {
// Validates 0 <= source, target < num_atoms (InvalidInput naming `name`) and fills csr.
// scratch: [num_atoms + 1 + num_edges] int64.
void target_csr(const Graph& graph, int64_t num_atoms, const char* name, TargetCsr csr,
                int64_t* scratch, int num_threads);
// Counting pass + prefix sum into args.offsets; returns the number of triplets.
int64_t count_triplets(const TripletArgs& args, int num_threads);
void fill_triplets(const TripletArgs& args, int num_threads);
int64_t count_quadruplets(const QuadArgs& args, int num_threads);
void fill_quadruplets(const QuadArgs& args, int num_threads);
}  // namespace cpu

#ifdef JMP_EXT_WITH_CUDA
namespace cuda {
// The per-edge passes on the GPU: device pointers, work queued on `stream`, no synchronisation.
// The TargetCsr (a stable sort) and the prefix sum are torch.sort / torch.cumsum on the GPU, done
// by the caller (python/jmp_ext/ops/interaction_indices.py), which also reads back the total.
// count_* write the count of out edge o to offsets[o + 1] (-1 when o has an atom index outside
// [0, num_atoms)); fill_* expect offsets to hold the exclusive prefix sum.
void count_triplets(const TripletArgs& args, cudaStream_t stream);
void fill_triplets(const TripletArgs& args, cudaStream_t stream);
void count_quadruplets(const QuadArgs& args, cudaStream_t stream);
void fill_quadruplets(const QuadArgs& args, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace jmp_ext::interaction_indices
