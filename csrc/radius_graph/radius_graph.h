// Batched radius graph (neighbour list) under periodic boundary conditions.
//
// For a batch of systems (atoms concatenated, system b owns atoms [ptr[b], ptr[b+1])), every
// pair (target i, source j, integer shift S) of the same system with
//   0 < d <= cutoff,  d = |r_j - r_i + S . cell|
// is an edge, S being zero on non-periodic axes. This is ASE's neighbor_list('ijS') except that
// the cutoff is inclusive (ASE: d < cutoff) and pairs at distance zero are never edges (ASE drops
// only (i, i, 0)). Output order: by target, then distance, then source, then shift
// (lexicographic), computed in double precision whatever the input dtype. With max_neighbors = k
// a target keeps its first k edges in that order; with a tolerance t >= 0 as well, it keeps every
// edge with d^2 <= d_(k+1)^2 + t (fairchem's get_max_neighbors_mask with
// enforce_max_neighbors_strictly=False; t in Angstrom^2).
//
// Two passes, each over targets in parallel: count (edges per target; the prefix sum sizes the
// output), then fill (each target writes its sorted edges to its own range). Results are
// bitwise identical for any thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "radius_graph/cell_list.h"

namespace jmp_ext::radius_graph {

enum class Dtype : int32_t { kFloat32 = 0, kFloat64 = 1 };

struct Input {
  const void* pos = nullptr;    // [num_atoms, 3] float32 or float64 (dtype)
  Dtype dtype = Dtype::kFloat64;
  int64_t num_atoms = 0;
  const int64_t* ptr = nullptr;  // [num_systems + 1] first atom of every system, ptr[B] = N
  int64_t num_systems = 0;
  const double* cell = nullptr;  // [num_systems, 3, 3] rows are lattice vectors
  const bool* pbc = nullptr;     // [num_systems, 3]
  double cutoff = 0;             // Angstrom, > 0
  int64_t max_neighbors = -1;    // k > 0, or -1 for no cap
  double tolerance = -1;         // >= 0: fairchem's tolerant cap (Angstrom^2); < 0: strict
  int64_t max_edges = 0;         // InvalidInput when the graph would have more edges
};

struct Output {
  int64_t* edge_index = nullptr;  // [2, E]: row 0 sources, row 1 targets
  int32_t* cell_offsets = nullptr;  // [E, 3]
  void* distance = nullptr;       // [E] in the input dtype
};

namespace cpu {

// The cell lists of a batch and its edge counts: construct (validates and counts), read
// num_edges(), allocate, then fill().
class RadiusGraph {
 public:
  RadiusGraph(const Input& input, int num_threads);
  int64_t num_edges() const { return offsets_.back(); }
  void fill(const Output& output, int num_threads) const;

 private:
  template <class Visit>
  void neighbors(int64_t target, Visit&& visit) const;

  Input input_;
  std::vector<Frame> frames_;
  std::vector<int64_t> system_of_;     // [N] system of every atom
  std::vector<Placed> placed_;         // [N] by original index
  std::vector<int64_t> bin_start_;     // [bins + 1]
  std::vector<Vec3> sorted_pos_;       // [N] atoms sorted by bin
  std::vector<int64_t> sorted_index_;  // [N]
  std::vector<int32_t> sorted_shift_;  // [N, 3]
  std::vector<int64_t> offsets_;       // [N + 1] first edge of every target
};

}  // namespace cpu
}  // namespace jmp_ext::radius_graph
