// 3-vectors and 3x3 matrices in double precision, shared by the CPU and CUDA kernels.
//
// Cells follow ASE: the rows of a cell matrix are the lattice vectors, positions are row
// vectors, so a fractional coordinate f maps to r = f . H and back with f = r . H^-1.
#pragma once

#include <cmath>

#include "common/hd.h"

namespace jmp_ext {

// Aggregates without default member initialisers, so that CUDA __shared__ variables may hold
// them; Vec3{} is zero.
struct Vec3 {
  double x, y, z;
};

JMP_HD Vec3 operator+(Vec3 a, Vec3 b) { return {a.x + b.x, a.y + b.y, a.z + b.z}; }
JMP_HD Vec3 operator-(Vec3 a, Vec3 b) { return {a.x - b.x, a.y - b.y, a.z - b.z}; }
JMP_HD Vec3 operator*(double s, Vec3 a) { return {s * a.x, s * a.y, s * a.z}; }
JMP_HD double dot(Vec3 a, Vec3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }
JMP_HD Vec3 cross(Vec3 a, Vec3 b) {
  return {a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x};
}
JMP_HD double norm(Vec3 a) { return sqrt(dot(a, a)); }
// False when a component is NaN or infinite (x - x is 0 exactly for finite x).
JMP_HD bool is_finite(Vec3 a) { return a.x - a.x == 0 && a.y - a.y == 0 && a.z - a.z == 0; }
JMP_HD double component(Vec3 a, int k) { return k == 0 ? a.x : (k == 1 ? a.y : a.z); }

// A 3x3 matrix stored as its three rows.
struct Mat3 {
  Vec3 row[3];
};

JMP_HD double det(const Mat3& m) { return dot(m.row[0], cross(m.row[1], m.row[2])); }

// The inverse of m (whose determinant must not be zero): inverse.row[k] is column k of the
// adjugate over the determinant, so that v . m . inverse == v for row vectors.
JMP_HD Mat3 inverse(const Mat3& m) {
  Vec3 c0 = cross(m.row[1], m.row[2]), c1 = cross(m.row[2], m.row[0]);
  Vec3 c2 = cross(m.row[0], m.row[1]);
  double s = 1.0 / dot(m.row[0], c0);
  // Columns of the inverse are c0, c1, c2 scaled; store them as rows of the transpose.
  return {{{s * c0.x, s * c1.x, s * c2.x}, {s * c0.y, s * c1.y, s * c2.y},
           {s * c0.z, s * c1.z, s * c2.z}}};
}

// Row vector times matrix: v . m = sum_k v_k m.row[k].
JMP_HD Vec3 mul(Vec3 v, const Mat3& m) {
  return v.x * m.row[0] + v.y * m.row[1] + v.z * m.row[2];
}

// Distance between the two lattice planes spanned by the rows other than k: |det| / |a x b|.
JMP_HD double face_distance(const Mat3& m, int k) {
  return fabs(det(m)) / norm(cross(m.row[(k + 1) % 3], m.row[(k + 2) % 3]));
}

}  // namespace jmp_ext
