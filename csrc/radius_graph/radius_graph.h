// Batched radius graph (neighbour list) under periodic boundary conditions.
//
// For a batch of systems (atoms concatenated, system b owns atoms [ptr[b], ptr[b+1])), every
// pair (target i, source j, integer shift S) of the same system with
//   0 < d <= cutoff,  d = |r_j - r_i + S . cell|
// is an edge, S being zero on non-periodic axes. This is ASE's neighbor_list('ijS') except that
// the cutoff is inclusive (ASE: d < cutoff) and pairs at distance zero are never edges (ASE drops
// only (i, i, 0)). Distances are computed in double precision whatever the input dtype and
// returned rounded to it. Output order: by target, then returned distance, then source, then
// shift (lexicographic). With max_neighbors = k a target keeps its first k edges in that order;
// with a tolerance t >= 0 as well, it keeps every edge with d^2 <= d_(k+1)^2 + t (fairchem's
// get_max_neighbors_mask with enforce_max_neighbors_strictly=False; t in Angstrom^2).
//
// Two passes, each over targets in parallel: count (edges per target; the prefix sum sizes the
// output), then fill (each target writes its sorted edges to its own range). Small graphs
// without the tolerant cap keep the edges found while counting and search only once. Results
// are bitwise identical for any thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "common/float_dtype.h"
#include "radius_graph/cell_list.h"

#ifdef JMP_EXT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace jmp_ext::radius_graph {

using Dtype = FloatDtype;

struct Input {
  const void* pos = nullptr;    // [num_atoms, 3] float32 or float64 (dtype)
  Dtype dtype = Dtype::f64;
  int64_t num_atoms = 0;
  const int64_t* ptr = nullptr;  // [num_systems + 1] first atom of every system, ptr[B] = N
  int64_t num_systems = 0;
  const double* cell = nullptr;  // [num_systems, 3, 3] rows are lattice vectors
  const bool* pbc = nullptr;     // [num_systems, 3]
  double cutoff = 0;             // Angstrom, > 0
  int64_t max_neighbors = -1;    // k > 0, or -1 for no cap
  double tolerance = -1;         // >= 0: fairchem's tolerant cap (Angstrom^2); < 0: strict
  int64_t max_edges = 0;         // InvalidInput when the graph would have more edges
  // CPU: advise fresh large buffers (the edge stash, the outputs) to use huge pages
  // (common/huge_pages.h); the caller turns it off when its allocator keeps freed memory.
  bool advise_huge_pages = false;
};

struct Output {
  int64_t* edge_index = nullptr;  // [2, E]: row 0 sources, row 1 targets
  int32_t* cell_offsets = nullptr;  // [E, 3]
  void* distance = nullptr;       // [E] in the input dtype
};

// Refuses a negative size, a cutoff that is not finite and > 0, a max_neighbors that is neither
// -1 nor > 0, a tolerance that is NaN or +inf (any negative one means strict), a negative
// max_edges and a ptr that does not run from 0 to num_atoms without decreasing. Reads ptr:
// host memory (the CUDA path checks its host copy before any launch).
void check_input(const Input& input);

namespace cpu {

// The cell lists of a batch and its edge counts: construct (validates and counts), read
// num_edges(), allocate, then fill().
struct Candidate;

class RadiusGraph {
 public:
  RadiusGraph(const Input& input, int num_threads);
  ~RadiusGraph();
  int64_t num_edges() const { return offsets_.back(); }
  void fill(const Output& output, int num_threads) const;

 private:
  // The sorted, capped edges of targets [begin, end), found while counting (small graphs).
  struct Chunk {
    int64_t begin, end;
    std::vector<Candidate> edges;
  };

  template <class Visit>
  void neighbors(int64_t target, Visit&& visit) const;
  CellList cell_list() const;
  // Every edge of a target, unsorted; under a strict cap k, in systems marked in prune_, a
  // superset of its k first.
  void find(int64_t target, std::vector<Candidate>& found) const;
  void count(int num_threads);
  // The one-pass search for small graphs; false (nothing kept) when the graph is not small.
  bool collect(int num_threads, double estimated_edges);
  void write(const Output& out, int64_t target, const Candidate* edges) const;

  Input input_;
  std::vector<Frame> frames_;
  std::vector<int64_t> system_of_;     // [N] system of every atom
  std::vector<char> prune_;            // [B] find cuts a target's edges back to k as it goes
  std::vector<Placed> placed_;         // [N] by original index
  std::vector<int64_t> bin_start_;     // [bins + 1]
  // Atoms sorted by bin (see CellList).
  std::vector<Vec3> sorted_wrapped_, sorted_position_;
  std::vector<int64_t> sorted_index_;
  std::vector<int32_t> sorted_shift_;
  std::vector<int64_t> offsets_;       // [N + 1] first edge of every target
  double extent_ = 0;                 // max |r| + |wrapped| over atoms
  std::vector<Chunk> stash_;           // by begin; empty when fill() searches again
};

}  // namespace cpu

// Error slots of the CUDA path (first offending atom or system; kNoError when none; for a
// hopeless search, the batch's candidate pairs and expected edges as the CPU prints them). The
// host reads them with the edge count, in the single synchronisation of a call.
enum CudaError : int32_t {
  kNonFinitePosition = 0,  // atom
  kNonFiniteCell = 1,      // system
  kSingularCell = 2,       // system
  kTooFarOutside = 3,      // atom
  kUnsearchable = 4,       // system whose periodic images would overflow the int32 shifts
  kHopelessSearch = 5,     // candidate pairs of the batch's search (the bits of a double)
  kHopelessEdges = 6,      // rough edge count of the batch (the bits of a double)
  kNumCudaErrors = 7,
};
constexpr unsigned long long kNoError = ~0ull;

// Buffers of the CUDA path, all allocated by the caller (torch), sized from N and B only.
// bins_cap = 2 N + B bounds the bins of a batch (make_bins keeps at most max(1, 2 n) bins per
// system); system b's bins start at 2 ptr[b] + b.
struct Workspace {
  const int64_t* batch = nullptr;  // [N] system of every atom
  Frame* frames = nullptr;         // [B]
  Placed* placed = nullptr;        // [N]
  int64_t* bin_start = nullptr;    // [bins_cap + 1], zeroed: counts at [bin + 1], then scanned
  int64_t* cursor = nullptr;       // [bins_cap] copy of the scanned bin_start
  Vec3* wrapped = nullptr;         // [N] atoms sorted by bin (order inside a bin arbitrary)
  Vec3* position = nullptr;        // [N]
  int64_t* index = nullptr;        // [N]
  int32_t* shift = nullptr;        // [N, 3]
  int64_t* offsets = nullptr;      // [N + 1], zeroed: counts at [i + 1], then scanned
  double* top = nullptr;           // [N, k + 1] tolerant cap only: nearest distances
  unsigned long long* errors = nullptr;  // [kNumCudaErrors], set to kNoError
};

#ifdef JMP_EXT_WITH_CUDA
// One call = bin, (scan bin_start), count, (scan offsets, read total and errors: the one host
// synchronisation), fill. Every step is a kernel launch on `stream`; nothing here syncs.
namespace cuda {
void bin(const Input& input, const Workspace& ws, cudaStream_t stream);
void count(const Input& input, const Workspace& ws, cudaStream_t stream);
// num_edges: offsets[N], which the caller read in its synchronisation.
void fill(const Input& input, const Workspace& ws, const Output& output, int64_t num_edges,
          cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace jmp_ext::radius_graph
