// The cell list of one system, in fractional coordinates, shared by the CPU and CUDA kernels.
//
// Every system gets a binning frame: a 3x3 matrix whose rows are the lattice vectors on its
// periodic axes and an orthonormal completion on the others (a molecule's frame is the identity,
// a slab's third row is the unit normal of its surface). Atoms are binned in fractional
// coordinates of that frame, which handles triclinic cells without special cases:
//   - periodic axes: coordinates are wrapped into [0, 1) and every atom remembers its integer
//     shift s (wrapped = r + s . H); a search range that leaves [0, n) wraps around and adds a
//     lattice image c, which covers cells smaller than the cutoff (many images per direction)
//     without replicating atoms,
//   - non-periodic axes: bins span the atoms' extent and the search range is clipped to it.
// Bins are about a third of the cutoff wide, so the searched volume is ~3.0x the cutoff sphere
// (~3.7x with half-cutoff bins, ~6.4x with cutoff-wide ones), with at most ~2 bins per atom per
// system. The search walks bins along the last axis as runs of consecutive atoms, so thinner
// bins cost few extra loop iterations.
//
// A pair (target i, source j seen through image c) has the vector
//   D = (w_j + c . H) - w_i = r_j - r_i + S . H,  S = c + s_j - s_i,
// which is ASE's convention for neighbor_list('ijS'): D = r[j] - r[i] + S . cell. The search
// uses the wrapped form (cheap); pairs that pass it are recomputed in the second form, which
// defines the distance (so i -> i through +S and -S tie exactly, as they should).
#pragma once

#include <cstdint>

#include "common/hd.h"
#include "common/vec3.h"

namespace jmp_ext::radius_graph {

// Why a system cannot be binned (host code turns these into messages).
enum class FrameStatus : int32_t { kOk = 0, kNonFiniteCell = 1, kSingularCell = 2 };

// Bins are this fraction of the cutoff wide (before the cap on the number of bins).
constexpr double kBinsPerCutoff = 3.0;
// Relative margin on the search range, so that rounding in fractional coordinates never loses
// a neighbour sitting exactly on a bin boundary.
constexpr double kReachMargin = 1e-9;
// Relative margin of the wrapped-coordinate pre-filter on d^2 (its rounding differs from the
// exact form's by ~1e-16 |w| / d).
constexpr double kFilterMargin = 1e-8;
// A periodic system whose lattice vectors span less than this fraction of the volume of the
// box of their lengths is treated as singular.
constexpr double kSingularTolerance = 1e-8;
// The largest search range on a periodic axis, in bins. Bin numbers are int32, and so is the
// output shift S = c + s_j - s_i with |s| < 1e9 (positions farther from their cell are
// refused): images c up to ~1e8 keep |S| < 2^31. Anything near it is a units error anyway.
constexpr double kMaxPeriodicReach = 1e8;

struct Frame {
  Mat3 basis;            // rows: lattice vectors (periodic axes), unit vectors (others)
  Mat3 inv;              // basis^-1: fractional = r . inv
  double lo[3];          // fractional coordinate of the first bin's lower edge
  double scale[3];       // bins per unit of fractional coordinate
  double reach[3];       // the cutoff, in bins, along each axis (with the margin)
  int32_t nbins[3];      // bins per axis
  int32_t periodic[3];   // 1 on periodic axes
  int64_t first_bin;     // index of this system's bin (0, 0, 0) in the batch's bin arrays
  double candidates;     // search_cost of this system: candidate pairs and expected edges,
  double edges;          // summed over the batch by the guard against hopeless searches
};

// The basis of a system's frame from its cell and pbc flags (rows of cell are lattice vectors).
JMP_HD FrameStatus make_basis(const Mat3& cell, const bool* pbc, Frame& frame) {
  int num_periodic = 0;
  for (int k = 0; k < 3; ++k) {
    frame.periodic[k] = pbc[k] ? 1 : 0;
    num_periodic += frame.periodic[k];
    frame.basis.row[k] = pbc[k] ? cell.row[k] : Vec3{};
  }
  for (int k = 0; k < 3; ++k) {
    if (!is_finite(frame.basis.row[k])) return FrameStatus::kNonFiniteCell;
  }
  Mat3& b = frame.basis;
  if (num_periodic == 0) {
    b = {{{1, 0, 0}, {0, 1, 0}, {0, 0, 1}}};
  } else if (num_periodic == 1) {
    int a = pbc[0] ? 0 : (pbc[1] ? 1 : 2);
    double length = norm(b.row[a]);
    if (!(length > 0)) return FrameStatus::kSingularCell;
    Vec3 u = (1.0 / length) * b.row[a];
    // Complete with the unit axis least aligned with u, made orthogonal to it.
    double ax = fabs(u.x), ay = fabs(u.y), az = fabs(u.z);
    Vec3 e = (ax <= ay && ax <= az) ? Vec3{1, 0, 0} : (ay <= az ? Vec3{0, 1, 0} : Vec3{0, 0, 1});
    Vec3 v = e - dot(e, u) * u;
    v = (1.0 / norm(v)) * v;
    b.row[(a + 1) % 3] = v;
    b.row[(a + 2) % 3] = cross(u, v);
  } else if (num_periodic == 2) {
    int c = !pbc[0] ? 0 : (!pbc[1] ? 1 : 2);
    Vec3 n = cross(b.row[(c + 1) % 3], b.row[(c + 2) % 3]);
    double length = norm(n);
    if (!(length > 0)) return FrameStatus::kSingularCell;
    b.row[c] = (1.0 / length) * n;
  }
  double volume = fabs(det(b));
  double box = norm(b.row[0]) * norm(b.row[1]) * norm(b.row[2]);
  if (!(volume > kSingularTolerance * box)) return FrameStatus::kSingularCell;
  frame.inv = inverse(b);
  return FrameStatus::kOk;
}

// Fractional coordinates of r in the frame.
JMP_HD Vec3 fractional(const Frame& frame, Vec3 r) { return mul(r, frame.inv); }

// Choose the bins of a system whose basis is set, given the range [lo, hi] of its atoms'
// fractional coordinates on non-periodic axes (ignored on periodic ones) and its atom count.
JMP_HD void make_bins(Frame& frame, const double* lo, const double* hi, double cutoff,
                      int64_t num_atoms) {
  double length[3], extent[3];  // per axis: binned extent in frame units and in Angstrom
  for (int k = 0; k < 3; ++k) {
    length[k] = frame.periodic[k] ? 1.0 : fmax(hi[k] - lo[k], 0.0);
    frame.lo[k] = frame.periodic[k] ? 0.0 : lo[k];
    extent[k] = length[k] * face_distance(frame.basis, k);
  }
  double max_bins = fmax(1.0, 2.0 * static_cast<double>(num_atoms));
  double width = cutoff / kBinsPerCutoff;
  double n[3], total = max_bins + 1;
  for (int attempt = 0; attempt < 64 && total > max_bins; ++attempt) {
    total = 1;
    for (int k = 0; k < 3; ++k) {
      n[k] = fmin(fmax(floor(extent[k] / width), 1.0), 1 << 20);
      total *= n[k];
    }
    width *= cbrt(total / max_bins) * 1.0001;
  }
  // The bin arrays are sized by this bound (CUDA workspace): never exceed it.
  if (total > max_bins) n[0] = n[1] = n[2] = 1;
  for (int k = 0; k < 3; ++k) {
    frame.nbins[k] = static_cast<int32_t>(n[k]);
    // A non-periodic axis with a single bin (a planar molecule, whose extent may be rounding
    // noise, or a cutoff wider than the system) needs no bin coordinate: scale n / length
    // would be huge there, and so would the reach.
    bool one_open_bin = !frame.periodic[k] && n[k] == 1.0;
    frame.scale[k] = length[k] > 0 && !one_open_bin ? n[k] / length[k] : 0.0;
    double reach = cutoff / face_distance(frame.basis, k) * frame.scale[k];
    frame.reach[k] = reach * (1 + kReachMargin) + kReachMargin;
  }
}

// Rough cost of a system's search, to refuse hopeless ones (a tiny cell with a huge cutoff)
// before starting them: candidate pairs examined, and edges expected at uniform density.
// Infinite when a periodic range exceeds kMaxPeriodicReach: the search cannot be done at all.
JMP_HD void search_cost(const Frame& frame, int64_t atoms, double& candidates, double& edges) {
  double stencil = 1, sphere = 4.18879020478639, bins = 1;  // 4/3 pi
  for (int k = 0; k < 3; ++k) {
    if (frame.periodic[k] && !(frame.reach[k] <= kMaxPeriodicReach)) {
      candidates = edges = INFINITY;
      return;
    }
  }
  for (int k = 0; k < 3; ++k) {
    double width = 2 * frame.reach[k] + 1;
    stencil *= frame.periodic[k] ? width : fmin(width, static_cast<double>(frame.nbins[k]));
    sphere *= frame.reach[k] + 0.5;
    bins *= frame.nbins[k];
  }
  candidates = static_cast<double>(atoms) * stencil * (static_cast<double>(atoms) / bins);
  edges = candidates * fmin(1.0, sphere / stencil);
}

// A search examining this many candidates is refused (it would exceed max_edges anyway:
// candidates are ~4x edges), and without a cap on the neighbours (capped: max_neighbors set)
// one whose expected edges exceed max_edges 4x, before searching for seconds to count them.
// The expected count is high by the half bin it adds to the cutoff's radius: <= 1.6x where
// bins are many, and in a dilute system (bins of many cutoffs) up to ~0.3 edges per atom
// whatever the density, which the atoms in the bound cover. Uneven density (slabs, clusters)
// makes it low.
JMP_HD bool hopeless(double candidates, double edges, int64_t max_edges, bool capped, int64_t atoms) {
  const double limit = static_cast<double>(max_edges);
  return candidates > 16.0 * limit + 1e8 ||
         (!capped && edges > 4.0 * limit + 1e6 + static_cast<double>(atoms));
}

// An atom placed in its system's cell list.
struct Placed {
  Vec3 position;     // r
  Vec3 wrapped;      // r + shift . H
  Vec3 bin_coord;    // fractional coordinate in bin units, relative to the first bin
  int32_t shift[3];  // integer lattice shift that wraps r into the cell (0 on open axes)
  int32_t bin[3];    // bin on each axis
};

JMP_HD Placed place(const Frame& frame, Vec3 r) {
  Placed p;
  Vec3 f = fractional(frame, r);
  Vec3 w = r;
  double u[3];
  for (int k = 0; k < 3; ++k) {
    double fk = component(f, k);
    p.shift[k] = 0;
    if (frame.periodic[k]) {
      double image = floor(fk);
      fk -= image;
      p.shift[k] = static_cast<int32_t>(-image);
      w = w - image * frame.basis.row[k];
    }
    u[k] = (fk - frame.lo[k]) * frame.scale[k];
    // Clamped before the cast, which is undefined for values out of int32's range and for NaN:
    // an open axis whose extent overflows (atoms at +-1e308) has scale 0 and u = inf * 0. (fmax
    // of NaN and 0 is 0.)
    p.bin[k] = static_cast<int32_t>(fmin(fmax(floor(u[k]), 0.0), frame.nbins[k] - 1.0));
  }
  p.position = r;
  p.wrapped = w;
  p.bin_coord = {u[0], u[1], u[2]};
  return p;
}

JMP_HD int64_t bin_index(const Frame& frame, int32_t b0, int32_t b1, int32_t b2) {
  return frame.first_bin + (static_cast<int64_t>(b0) * frame.nbins[1] + b1) * frame.nbins[2] + b2;
}

// The bins searched around a target along axis k: [first, last], in unwrapped bin numbers on
// periodic axes (bin b is bin b mod n of image floor(b / n)), clipped to [0, n) on open axes.
JMP_HD void search_range(const Frame& frame, const Placed& target, int k, int32_t& first,
                         int32_t& last) {
  double u = component(target.bin_coord, k);
  double lo = floor(u - frame.reach[k]), hi = floor(u + frame.reach[k]);
  if (!frame.periodic[k]) {  // clipped before the int32 cast, which must not overflow
    lo = fmax(lo, 0.0);
    hi = fmin(hi, static_cast<double>(frame.nbins[k] - 1));
  }
  first = static_cast<int32_t>(lo);
  last = static_cast<int32_t>(hi);
}

JMP_HD int32_t floor_div(int32_t a, int32_t n) { return a >= 0 ? a / n : -((-a + n - 1) / n); }

// A batch's atoms sorted by bin: CSR over bins (bin_start [bins + 1]) of wrapped positions,
// original positions, original indices and shifts.
struct CellList {
  const int64_t* bin_start;
  const Vec3* wrapped;
  const Vec3* position;
  const int64_t* index;
  const int32_t* shift;  // [N, 3]
};

// Calls visit(s, c, w2) for every atom s of the cell list (sorted position) seen through
// lattice image c whose squared distance to the target in the wrapped form, w2, is at most
// loose2, in a fixed order. w2 differs from the exact form's d2 only by rounding.
template <class Visit>
JMP_HD void for_each_candidate(const Frame& frame, const Placed& target, double loose2,
                               const CellList& cells, Visit&& visit) {
  int32_t first[3], last[3];
  for (int k = 0; k < 3; ++k) search_range(frame, target, k, first[k], last[k]);
  for (int32_t a = first[0]; a <= last[0]; ++a) {
    int32_t ca = floor_div(a, frame.nbins[0]);
    for (int32_t b = first[1]; b <= last[1]; ++b) {
      int32_t cb = floor_div(b, frame.nbins[1]);
      // Bins adjacent along the last axis are adjacent in the cell list, so the range
      // [first[2], last[2]] is one run of atoms per lattice image it touches (one or two
      // runs unless the cell is thinner than the cutoff), not one short loop per bin.
      for (int32_t c = first[2]; c <= last[2];) {
        int32_t cc = floor_div(c, frame.nbins[2]);
        int32_t image_last = (cc + 1) * frame.nbins[2] - 1;
        int32_t run_last = last[2] < image_last ? last[2] : image_last;
        // Image displacement minus the target: candidates are then one add and a dot away.
        Vec3 origin = static_cast<double>(ca) * frame.basis.row[0] +
                      static_cast<double>(cb) * frame.basis.row[1] +
                      static_cast<double>(cc) * frame.basis.row[2] - target.wrapped;
        int64_t bin = bin_index(frame, a - ca * frame.nbins[0], b - cb * frame.nbins[1],
                                c - cc * frame.nbins[2]);
        const int32_t image[3] = {ca, cb, cc};
        int64_t end = cells.bin_start[bin + (run_last - c) + 1];
        for (int64_t s = cells.bin_start[bin]; s < end; ++s) {
          Vec3 d = cells.wrapped[s] + origin;
          double w2 = dot(d, d);
          if (w2 <= loose2) visit(s, image, w2);
        }
        c = run_last + 1;
      }
    }
  }
}

// The exact form of candidate s seen through image c: sets its shift S and returns
// d2 = |r_j - r_i + S . H|^2 in double.
JMP_HD double exact_d2(const Frame& frame, const Placed& target, const CellList& cells,
                       int64_t s, const int32_t* image, int32_t* shift) {
  const int32_t* sj = cells.shift + 3 * s;
  for (int k = 0; k < 3; ++k) shift[k] = image[k] + sj[k] - target.shift[k];
  Vec3 exact = (cells.position[s] - target.position) +
               (static_cast<double>(shift[0]) * frame.basis.row[0] +
                static_cast<double>(shift[1]) * frame.basis.row[1] +
                static_cast<double>(shift[2]) * frame.basis.row[2]);
  return dot(exact, exact);
}

// Calls visit(j, S, d2) for every source j (original index) and shift S with
// 0 < d2 <= cutoff2, d2 = |r_j - r_i + S . H|^2 in double, in a fixed order.
template <class Visit>
JMP_HD void for_each_neighbor(const Frame& frame, const Placed& target, double cutoff2,
                              const CellList& cells, Visit&& visit) {
  // Without a periodic axis, wrapped positions are the positions and every image and shift is
  // zero, so the wrapped form subtracts the same doubles as the exact form: w2 is d2, bit for
  // bit (no fused multiply-adds: CMakeLists.txt).
  if (!(frame.periodic[0] || frame.periodic[1] || frame.periodic[2])) {
    const int32_t no_shift[3] = {0, 0, 0};
    for_each_candidate(frame, target, cutoff2, cells, [&](int64_t s, const int32_t*, double w2) {
      if (w2 > 0) visit(cells.index[s], no_shift, w2);
    });
    return;
  }
  for_each_candidate(frame, target, cutoff2 * (1 + kFilterMargin), cells,
                     [&](int64_t s, const int32_t* image, double) {
                       int32_t shift[3];
                       double d2 = exact_d2(frame, target, cells, s, image, shift);
                       if (d2 <= cutoff2 && d2 > 0) visit(cells.index[s], shift, d2);
                     });
}

// Position i of a [N, 3] array of T (float or double), in double.
template <class T>
JMP_HD Vec3 load_position(const T* pos, int64_t i) {
  return {static_cast<double>(pos[3 * i]), static_cast<double>(pos[3 * i + 1]),
          static_cast<double>(pos[3 * i + 2])};
}

// The distance an edge is returned with: sqrt(d2) rounded to the output dtype T, held in a
// double. Edges are ordered by it, so that the output is sorted by its own distance column
// even where two mathematically equal distances (i -> i through +S and -S) differ in d2's last
// bit; IEEE sqrt is correctly rounded, so CPU and CUDA agree.
template <class T>
JMP_HD double edge_distance(double d2) {
  return static_cast<double>(static_cast<T>(sqrt(d2)));
}

}  // namespace jmp_ext::radius_graph
