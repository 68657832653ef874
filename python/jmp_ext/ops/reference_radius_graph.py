"""Brute-force twin of radius_graph, in plain torch and float64, for tests.

Every pair of atoms of a system times every lattice shift that can reach the cutoff: quadratic
in the number of atoms and cubic in the number of images, so for small systems only. Same
semantics as jmp_ext.ops.radius_graph (0 < d <= cutoff; order by target, distance, source,
shift; strict or tolerant max_neighbors), written independently of the cell-list kernel.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def _shifts(pos: Tensor, cell: Tensor, pbc: Tensor, cutoff: float) -> Tensor:
    """[M, 3] int64: every shift S that can bring some pair within the cutoff.

    A pair needs |v| <= cutoff + diameter for v = S @ A (A: the periodic rows), and
    S = v @ pinv(A), so |S_k| <= (cutoff + diameter) * |pinv(A)[:, k]|.
    """
    axes = [k for k in range(3) if bool(pbc[k])]
    bounds = [0, 0, 0]
    if axes:
        columns = torch.linalg.pinv(cell[axes]).norm(dim=0)
        diameter = float((pos.max(0).values - pos.min(0).values).norm()) if len(pos) else 0.0
        for axis, column in zip(axes, columns.tolist()):
            bounds[axis] = math.floor((cutoff + diameter) * column) + 1
    ranges = [range(-b, b + 1) for b in bounds]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.int64)


def radius_graph(
    pos: Tensor,
    cutoff: float,
    *,
    natoms=None,
    cell: Tensor | None = None,
    pbc: Tensor | None = None,
    max_neighbors: int | None = None,
    degeneracy_tolerance: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(edge_index [2, E] int64, cell_offsets [E, 3] int32, distance [E] float64)."""
    pos = pos.detach().to(torch.float64)
    natoms = [len(pos)] if natoms is None else [int(n) for n in natoms]
    if cell is None:
        cell = torch.zeros(len(natoms), 3, 3, dtype=torch.float64)
    cell = cell.detach().to(torch.float64).reshape(len(natoms), 3, 3)
    if pbc is None:
        pbc = torch.full((len(natoms), 3), bool(cell.abs().sum() > 0))
    pbc = torch.as_tensor(pbc).reshape(-1, 3).expand(len(natoms), 3)
    edges = []  # (target, distance, source, shift) tuples
    first = 0
    for b, n in enumerate(natoms):
        p = pos[first : first + n]
        shifts = _shifts(p, cell[b], pbc[b], cutoff)
        # D[s, i, j] = p[j] - p[i] + S_s @ cell.
        d = p[None, None, :, :] - p[None, :, None, :] + (shifts.to(torch.float64) @ cell[b])[
            :, None, None, :
        ]
        d2 = (d * d).sum(-1)
        keep = (d2 > 0) & (d2 <= cutoff * cutoff)
        for s, i, j in keep.nonzero().tolist():
            distance = math.sqrt(float(d2[s, i, j]))
            edges.append((first + i, distance, first + j, tuple(shifts[s].tolist())))
        first += n
    edges.sort()
    if max_neighbors is not None:
        kept, by_target = [], itertools.groupby(edges, key=lambda e: e[0])
        for _, group in by_target:
            group = list(group)
            if degeneracy_tolerance is None or len(group) <= max_neighbors:
                kept += group[:max_neighbors]
            else:
                bound = group[max_neighbors][1] ** 2 + degeneracy_tolerance
                kept += [e for e in group if e[1] ** 2 <= bound]
        edges = kept
    edge_index = torch.tensor([[e[2] for e in edges], [e[0] for e in edges]], dtype=torch.int64)
    cell_offsets = torch.tensor([e[3] for e in edges], dtype=torch.int32).reshape(-1, 3)
    distance = torch.tensor([e[1] for e in edges], dtype=torch.float64)
    return edge_index.reshape(2, -1), cell_offsets, distance
