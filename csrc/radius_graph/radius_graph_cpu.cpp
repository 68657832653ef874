// CPU radius graph: cell lists built serially in O(N + bins), then a count pass and a fill pass
// in parallel over targets, or for small graphs one pass that keeps the edges (see
// radius_graph.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "common/check.h"
#include "common/huge_pages.h"
#include "common/parallel.h"
#include "radius_graph/radius_graph.h"

namespace jmp_ext::radius_graph {

void check_input(const Input& in) {
  JMP_CHECK(in.num_atoms >= 0 && in.num_systems >= 0, "radius_graph: negative sizes");
  // (below ~1e-154 the squared cutoff underflows to 0 and the graph would come back empty)
  JMP_CHECK(std::isfinite(in.cutoff) && in.cutoff >= 1e-30,
            "radius_graph: cutoff must be finite and > 0 (at least 1e-30 Angstrom), got ", in.cutoff);
  JMP_CHECK(in.max_neighbors == -1 || in.max_neighbors > 0,
            "radius_graph: max_neighbors must be positive, got ", in.max_neighbors);
  // (a NaN would compare false everywhere: every target over k neighbours would lose them all)
  JMP_CHECK(in.tolerance < 0 || std::isfinite(in.tolerance),
            "radius_graph: degeneracy_tolerance must be finite, got ", in.tolerance);
  JMP_CHECK(in.max_edges >= 0, "radius_graph: max_edges must be >= 0");
  JMP_CHECK(in.ptr[0] == 0 && in.ptr[in.num_systems] == in.num_atoms,
            "radius_graph: natoms must add up to the number of atoms ", in.num_atoms);
  for (int64_t b = 0; b < in.num_systems; ++b)
    JMP_CHECK(in.ptr[b + 1] >= in.ptr[b], "radius_graph: natoms[", b, "] is negative");
}

namespace cpu {

// An edge being collected for one target; ordered by (distance, source, shift).
struct Candidate {
  double distance;
  int64_t source;
  int32_t shift[3];
  int32_t bucket;

  bool operator<(const Candidate& o) const {
    if (distance != o.distance) return distance < o.distance;
    if (source != o.source) return source < o.source;
    for (int k = 0; k < 3; ++k)
      if (shift[k] != o.shift[k]) return shift[k] < o.shift[k];
    return false;
  }
};

namespace {

constexpr int64_t kGrain = 64;  // targets per task, at least
// Under a strict cap k, find cuts a target's edges back to its k first once 2 max(k, this) are
// gathered, in systems expected to have more than half this many neighbours a target: far above
// the ~600 of a 12 A cutoff in matter, whose searches keep the cheaper loop without the count.
constexpr int64_t kPruneFloor = 4096;
// Graphs expected to have at most this many edges are searched once (their edges, 32 bytes
// each, at most 128 MB, are kept between counting and filling) rather than twice. The estimate
// runs ~2x high for bulk matter, so cu_10k_6A (0.8 M edges) is searched once: 20-25% faster
// than twice.
constexpr double kCollectEdges = 1 << 22;
// ...but they are not kept beyond this many (512 MB), whatever the estimate said.
constexpr int64_t kCollectLimit = int64_t{1} << 24;

Vec3 load(const Input& in, int64_t i) {
  return in.dtype == Dtype::f32 ? load_position(static_cast<const float*>(in.pos), i)
                                : load_position(static_cast<const double*>(in.pos), i);
}

Mat3 load_cell(const Input& in, int64_t b) {
  const double* c = in.cell + 9 * b;
  return {{{c[0], c[1], c[2]}, {c[3], c[4], c[5]}, {c[6], c[7], c[8]}}};
}

double edge_distance(double d2, Dtype dtype) {
  return dtype == Dtype::f32 ? radius_graph::edge_distance<float>(d2)
                             : radius_graph::edge_distance<double>(d2);
}

// Sorts one target's edges in expected linear time: a counting sort into as many buckets as
// edges, uniform in (d / cutoff)^3 (so uniform for bulk matter, where the number of neighbours
// grows as d^3), then a sort inside each bucket (sort_bucket). std::sort alone costs ~5x more
// at a 12 A cutoff (~600 neighbours, log n unpredictable branches each).
class EdgeSorter {
 public:
  std::vector<Candidate> found;

  // The first `count` edges of `found` in order (count <= found.size()).
  const Candidate* first(int64_t count, double cutoff) {
    const int64_t n = static_cast<int64_t>(found.size());
    if (n <= kSmall) {
      insertion_sort(found.data(), found.data() + n);
      return found.data();
    }
    // (buckets are int32 to keep a Candidate at 32 bytes: 2^31 of them would be 68 GB)
    JMP_CHECK(n <= std::numeric_limits<int32_t>::max(), "radius_graph: an atom has ", n,
              " neighbours within the cutoff, more than the 2^31 - 1 a target's sort can order");
    start_.assign(n + 1, 0);
    const double scale = static_cast<double>(n) / (cutoff * cutoff * cutoff);
    for (Candidate& c : found) {
      // Compared before the cast, which is undefined for NaN and out-of-range values: a cutoff
      // whose cube overflows has scale 0, and a d whose cube does gives inf * 0. The buckets
      // stay in distance order (0 for the finite cubes, the last for the rest).
      const double u = c.distance * c.distance * c.distance * scale;
      c.bucket = static_cast<int32_t>(u < static_cast<double>(n) ? static_cast<int64_t>(u) : n - 1);
      ++start_[c.bucket + 1];
    }
    for (int64_t b = 0; b < n; ++b) start_[b + 1] += start_[b];
    sorted_.resize(n);
    next_.assign(start_.begin(), start_.end() - 1);
    for (const Candidate& c : found) sorted_[next_[c.bucket]++] = c;
    // Buckets are in distance order: sort inside them until `count` edges are in place.
    for (int64_t b = 0; b < n && start_[b] < count; ++b) {
      sort_bucket(sorted_.data() + start_[b], sorted_.data() + start_[b + 1]);
    }
    return sorted_.data();
  }

 private:
  static constexpr int64_t kSmall = 32;
  std::vector<Candidate> sorted_, spill_;
  std::vector<int64_t> start_, next_;

  // A crystal's shell of equidistant neighbours lands in one bucket whole, and its distances
  // differ only in their last bits (they are computed through different images), so a
  // comparison sort of it costs m log m unpredictable branches. A large bucket is split again
  // by a counting sort uniform in the bits of its distances (positive doubles order as their
  // bit patterns), until the parts are small or tie exactly (then source and shift decide).
  void sort_bucket(Candidate* begin, Candidate* end) {
    const int64_t m = end - begin;
    if (m <= kSmall) {
      insertion_sort(begin, end);
      return;
    }
    uint64_t lo = std::numeric_limits<uint64_t>::max(), hi = 0;
    for (const Candidate* c = begin; c != end; ++c) {
      lo = std::min(lo, bits(c->distance));
      hi = std::max(hi, bits(c->distance));
    }
    if (lo == hi) {
      std::sort(begin, end);
      return;
    }
    const double scale = static_cast<double>(m) / (static_cast<double>(hi - lo) + 1.0);
    std::vector<int64_t> start(m + 1, 0);
    for (Candidate* c = begin; c != end; ++c) {
      int64_t b = static_cast<int64_t>(static_cast<double>(bits(c->distance) - lo) * scale);
      c->bucket = static_cast<int32_t>(b < m ? b : m - 1);
      ++start[c->bucket + 1];
    }
    for (int64_t b = 0; b < m; ++b) start[b + 1] += start[b];
    spill_.assign(begin, end);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (const Candidate& c : spill_) begin[next[c.bucket]++] = c;
    for (int64_t b = 0; b < m; ++b) sort_bucket(begin + start[b], begin + start[b + 1]);
  }

  // Few edges (a molecule's target): insertion sort, keyed on the distance first.
  static void insertion_sort(Candidate* begin, Candidate* end) {
    for (Candidate* i = begin + 1; i < end; ++i) {
      Candidate c = *i;
      Candidate* j = i;
      for (; j > begin && c < j[-1]; --j) *j = j[-1];
      *j = c;
    }
  }

  static uint64_t bits(double d) {
    uint64_t u;
    std::memcpy(&u, &d, sizeof u);
    return u;
  }
};

}  // namespace

template <class Visit>
void RadiusGraph::neighbors(int64_t target, Visit&& visit) const {
  double cutoff2 = input_.cutoff * input_.cutoff;
  for_each_neighbor(frames_[system_of_[target]], placed_[target], cutoff2, cell_list(), visit);
}

void RadiusGraph::find(int64_t target, std::vector<Candidate>& found) const {
  found.clear();
  auto gather = [&](int64_t j, const int32_t* shift, double d2) {
    found.push_back({edge_distance(d2, input_.dtype), j, {shift[0], shift[1], shift[2]}, 0});
  };
  if (!prune_[system_of_[target]]) {
    neighbors(target, gather);
    return;
  }
  // A strict cap (max_neighbors = k, no tolerance) needs only the k first edges in the output
  // order: past 2 max(k, kPruneFloor) gathered, the k first are kept, so a target with 4.5e8
  // neighbours (a 0.01 A cell at 3 A) holds O(k) of them, not 14 GB (an out-of-memory kill).
  const int64_t k = input_.max_neighbors;
  const size_t prune_at = 2 * static_cast<size_t>(std::max(k, kPruneFloor));
  size_t room = prune_at;  // edges to gather before the next cut
  neighbors(target, [&](int64_t j, const int32_t* shift, double d2) {
    gather(j, shift, d2);
    if (--room == 0) {
      std::nth_element(found.begin(), found.begin() + k, found.end());
      found.resize(static_cast<size_t>(k));
      room = prune_at - static_cast<size_t>(k);
    }
  });
}

CellList RadiusGraph::cell_list() const {
  return {bin_start_.data(), sorted_wrapped_.data(), sorted_position_.data(),
          sorted_index_.data(), sorted_shift_.data()};
}

RadiusGraph::RadiusGraph(const Input& input, int num_threads) : input_(input) {
  check_input(input);
  const int64_t n = input.num_atoms, num_systems = input.num_systems;

  // Frames, then the extent of every system on its non-periodic axes.
  frames_.resize(num_systems);
  prune_.resize(num_systems);
  system_of_.resize(n);
  std::vector<double> lo(3 * num_systems, INFINITY), hi(3 * num_systems, -INFINITY);
  for (int64_t b = 0; b < num_systems; ++b) {
    Frame& frame = frames_[b];
    FrameStatus status = make_basis(load_cell(input, b), input.pbc + 3 * b, frame);
    JMP_CHECK(status != FrameStatus::kNonFiniteCell,
              "radius_graph: cell[", b, "] has a NaN or infinite entry on a periodic axis");
    JMP_CHECK(status != FrameStatus::kSingularCell, "radius_graph: cell[", b,
              "] is singular or degenerate on its periodic axes (pbc=[", input.pbc[3 * b], ", ",
              input.pbc[3 * b + 1], ", ", input.pbc[3 * b + 2],
              "]): its lattice vectors there must be non-zero and linearly independent");
    for (int64_t i = input.ptr[b]; i < input.ptr[b + 1]; ++i) {
      system_of_[i] = b;
      Vec3 r = load(input, i);
      JMP_CHECK(is_finite(r),
                "radius_graph: pos[", i, "] is not finite (NaN or inf)");
      Vec3 f = fractional(frame, r);
      for (int k = 0; k < 3; ++k) {
        double fk = component(f, k);
        // Shifts are int32: positions more than ~1e9 cells away are surely a units error.
        JMP_CHECK(!frame.periodic[k] || std::fabs(fk) < 1e9, "radius_graph: pos[", i,
                  "] lies ", fk, " cells away from its cell along axis ", k);
        lo[3 * b + k] = std::min(lo[3 * b + k], fk);
        hi[3 * b + k] = std::max(hi[3 * b + k], fk);
      }
    }
  }

  // Bins, and a guard against searches that could not finish (tiny cells, huge cutoffs).
  int64_t num_bins = 0;
  double candidates = 0, estimated_edges = 0;
  for (int64_t b = 0; b < num_systems; ++b) {
    Frame& frame = frames_[b];
    int64_t atoms = input.ptr[b + 1] - input.ptr[b];
    make_bins(frame, &lo[3 * b], &hi[3 * b], input.cutoff, atoms);
    frame.first_bin = num_bins;
    search_cost(frame, atoms, frame.candidates, frame.edges);
    JMP_CHECK(std::isfinite(frame.candidates), "radius_graph: the cutoff ", input.cutoff,
              " is far too large for cell[", b, "]: its periodic images would overflow the int32 ",
              "lattice shifts; use a smaller cutoff or a larger cell");
    // (the estimate is of uniform density, which periodic images have: a system of more
    // neighbours than that has them from its own atoms, at most N a target)
    prune_[b] = input.max_neighbors > 0 && input.tolerance < 0 &&
                frame.edges > static_cast<double>(kPruneFloor / 2) * static_cast<double>(atoms);
    candidates += frame.candidates;
    estimated_edges += frame.edges;
    num_bins += int64_t{frame.nbins[0]} * frame.nbins[1] * frame.nbins[2];
  }
  JMP_CHECK(!hopeless(candidates, estimated_edges, input.max_edges, input.max_neighbors > 0, n),
            "radius_graph: the graph would have roughly ", estimated_edges,
            " edges (searching ", candidates, " candidate pairs), more than max_edges = ",
            input.max_edges, "; use a smaller cutoff, larger cells or raise max_edges");

  // Place atoms, then a stable counting sort of atoms by bin.
  placed_.resize(n);
  parallel_for(n, num_threads, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) placed_[i] = place(frames_[system_of_[i]], load(input, i));
  });
  bin_start_.assign(num_bins + 1, 0);
  std::vector<int64_t> bin_of(n);
  double extent = 0;  // bounds the magnitude of every term of both forms of a pair's vector
  for (int64_t i = 0; i < n; ++i) {
    const Placed& p = placed_[i];
    extent = std::max(extent, norm(p.position) + norm(p.wrapped));
    bin_of[i] = bin_index(frames_[system_of_[i]], p.bin[0], p.bin[1], p.bin[2]);
    ++bin_start_[bin_of[i] + 1];
  }
  for (int64_t k = 0; k < num_bins; ++k) bin_start_[k + 1] += bin_start_[k];
  sorted_wrapped_.resize(n);
  sorted_position_.resize(n);
  sorted_index_.resize(n);
  sorted_shift_.resize(3 * n);
  {
    std::vector<int64_t> next(bin_start_.begin(), bin_start_.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t s = next[bin_of[i]]++;
      sorted_wrapped_[s] = placed_[i].wrapped;
      sorted_position_[s] = placed_[i].position;
      sorted_index_[s] = i;
      std::copy(placed_[i].shift, placed_[i].shift + 3, &sorted_shift_[3 * s]);
    }
  }

  extent_ = extent;
  offsets_.assign(n + 1, 0);
  bool collected = (input.max_neighbors < 0 || input.tolerance < 0) &&
                   estimated_edges <= kCollectEdges && collect(num_threads, estimated_edges);
  if (!collected) count(num_threads);
  for (int64_t i = 0; i < n; ++i) offsets_[i + 1] += offsets_[i];
  JMP_CHECK(offsets_[n] <= input.max_edges, "radius_graph: the graph would have ", offsets_[n],
            " edges, more than max_edges = ", input.max_edges,
            "; use a smaller cutoff or max_neighbors, or raise max_edges");
}

void RadiusGraph::count(int num_threads) {
  // Count pass: edges per target after the cap. Without the tolerant cap only the number of
  // edges matters, and the wrapped form decides it alone outside a band of half-width
  // `margin` around 0 and the cutoff, skipping the exact form for almost every pair. Both
  // forms sum a handful of doubles whose magnitudes are at most ~3 extent + cutoff, times
  // `skew` for the lattice terms of skewed cells (|S_k H_k| can exceed |S . H|), so they
  // differ by far less than margin (~1e-12 A for 100 A systems).
  const Input& input = input_;
  const int64_t n = input.num_atoms, k = input.max_neighbors;
  const double extent = extent_;
  double skew = 1;
  for (const Frame& f : frames_) {
    double sum = 0;
    for (int a = 0; a < 3; ++a)
      sum += norm(f.basis.row[a]) * norm(Vec3{component(f.inv.row[0], a),
                                              component(f.inv.row[1], a),
                                              component(f.inv.row[2], a)});
    skew = std::max(skew, sum);
  }
  const double cutoff = input.cutoff, cutoff2 = cutoff * cutoff;
  const double margin =
      256 * std::numeric_limits<double>::epsilon() * skew * (3 * extent + cutoff);
  const double sure_lo2 = 4 * margin * margin;
  const double sure_hi2 = margin < cutoff / 2 ? (cutoff - margin) * (cutoff - margin) * (1 - 1e-12)
                                              : 0.0;
  parallel_for(n, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<double> ds;
    for (int64_t i = begin; i < end; ++i) {
      int64_t count = 0;
      if (k < 0 || input.tolerance < 0) {
        const Frame& frame = frames_[system_of_[i]];
        const CellList cells = cell_list();
        for_each_candidate(frame, placed_[i], cutoff2 * (1 + kFilterMargin), cells,
                           [&](int64_t s, const int32_t* image, double w2) {
                             if (w2 > sure_lo2 && w2 < sure_hi2) {
                               ++count;
                             } else {
                               int32_t shift[3];
                               double d2 = exact_d2(frame, placed_[i], cells, s, image, shift);
                               count += d2 <= cutoff2 && d2 > 0;
                             }
                           });
        if (k > 0) count = std::min(count, k);
      } else {
        // Tolerant cap: keep d^2 <= d_(k+1)^2 + tolerance, so the (k+1)-th distance is needed.
        ds.clear();
        neighbors(i, [&](int64_t, const int32_t*, double d2) {
          ds.push_back(edge_distance(d2, input.dtype));
        });
        count = static_cast<int64_t>(ds.size());
        if (count > k) {
          std::nth_element(ds.begin(), ds.begin() + k, ds.end());
          double bound = ds[k] * ds[k] + input.tolerance;
          count = std::count_if(ds.begin(), ds.end(), [&](double d) { return d * d <= bound; });
        }
      }
      offsets_[i + 1] = count;
    }
  });
}

bool RadiusGraph::collect(int num_threads, double estimated_edges) {
  const int64_t n = input_.num_atoms, k = input_.max_neighbors;
  std::mutex mutex;
  // The estimate assumes uniform density; clustered atoms (fractional coordinates given as
  // Angstrom) can have orders of magnitude more edges. Past kCollectLimit kept edges, in all
  // chunks together, the edges are dropped and count() takes over, holding none.
  std::atomic<int64_t> kept{0};
  std::atomic<bool> abandoned{false};
  parallel_for(n, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    Chunk chunk{begin, end, {}};
    // Growing by doubling would copy the edges about twice more (and fault fresh pages in).
    double expected = estimated_edges * static_cast<double>(end - begin) / static_cast<double>(n);
    if (k > 0) expected = std::min(expected, static_cast<double>(k) * static_cast<double>(end - begin));
    chunk.edges.reserve(static_cast<size_t>(expected) + 64);
    if (input_.advise_huge_pages)
      advise_huge_pages(chunk.edges.data(), chunk.edges.capacity() * sizeof(Candidate));
    EdgeSorter sorter;
    for (int64_t i = begin; i < end && !abandoned.load(std::memory_order_relaxed); ++i) {
      find(i, sorter.found);
      int64_t count = static_cast<int64_t>(sorter.found.size());
      if (k > 0) count = std::min(count, k);
      offsets_[i + 1] = count;
      if (kept.fetch_add(count, std::memory_order_relaxed) + count > kCollectLimit) {
        abandoned.store(true, std::memory_order_relaxed);
        break;
      }
      const Candidate* sorted = sorter.first(count, input_.cutoff);
      chunk.edges.insert(chunk.edges.end(), sorted, sorted + count);
    }
    std::lock_guard<std::mutex> lock(mutex);
    stash_.push_back(std::move(chunk));
  });
  if (abandoned) {
    stash_.clear();
    stash_.shrink_to_fit();
    return false;
  }
  std::sort(stash_.begin(), stash_.end(),
            [](const Chunk& a, const Chunk& b) { return a.begin < b.begin; });
  return true;
}

RadiusGraph::~RadiusGraph() = default;

void RadiusGraph::write(const Output& out, int64_t target, const Candidate* edges) const {
  const int64_t first = offsets_[target], count = offsets_[target + 1] - first;
  const int64_t total = num_edges();
  for (int64_t e = 0; e < count; ++e) {
    const Candidate& c = edges[e];
    out.edge_index[first + e] = c.source;
    out.edge_index[total + first + e] = target;
    std::copy(c.shift, c.shift + 3, out.cell_offsets + 3 * (first + e));
    if (input_.dtype == Dtype::f32) {
      static_cast<float*>(out.distance)[first + e] = static_cast<float>(c.distance);
    } else {
      static_cast<double*>(out.distance)[first + e] = c.distance;
    }
  }
}

void RadiusGraph::fill(const Output& out, int num_threads) const {
  if (input_.advise_huge_pages) {
    const size_t total = static_cast<size_t>(num_edges());
    advise_huge_pages(out.edge_index, 2 * total * sizeof(int64_t));
    advise_huge_pages(out.cell_offsets, 3 * total * sizeof(int32_t));
    advise_huge_pages(out.distance, total * (input_.dtype == Dtype::f32 ? sizeof(float) : sizeof(double)));
  }
  if (!stash_.empty()) {
    parallel_for(static_cast<int64_t>(stash_.size()), num_threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = stash_[c];
        const Candidate* edges = chunk.edges.data();
        for (int64_t i = chunk.begin; i < chunk.end; ++i) {
          write(out, i, edges);
          edges += offsets_[i + 1] - offsets_[i];
        }
      }
    });
    return;
  }
  parallel_for(input_.num_atoms, num_threads, kGrain, [&](int64_t begin, int64_t end) {
    EdgeSorter sorter;
    for (int64_t i = begin; i < end; ++i) {
      find(i, sorter.found);
      int64_t count = offsets_[i + 1] - offsets_[i];
      if (count > static_cast<int64_t>(sorter.found.size()))
        throw Error("radius_graph: internal error, the fill pass found fewer edges than counted");
      write(out, i, sorter.first(count, input_.cutoff));
    }
  });
}

}  // namespace cpu
}  // namespace jmp_ext::radius_graph
