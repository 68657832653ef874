"""Test helpers for the trainer: tiny datasets and a brute-force radius graph."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def brute_radius_graph(pos, cutoff, *, natoms=None, cell=None, pbc=None, max_neighbors=None):
    """jmp_ext.ops.radius_graph by checking every pair and periodic image (float64, small systems):
    (edge_index [2, E] (source, target), cell_offsets [E, 3], distance [E]) sorted by target, distance."""
    natoms = natoms if natoms is not None else torch.tensor([pos.shape[0]])
    src, dst, offs, dists = [], [], [], []
    start = 0
    for b, n in enumerate(natoms.tolist()):
        p = pos[start:start + n].double()
        c = cell[b].double() if cell is not None else torch.zeros(3, 3, dtype=torch.float64)
        per = pbc[b].tolist() if (pbc is not None and cell is not None) else [False] * 3
        reps = []
        for d in range(3):
            if per[d]:
                normal = torch.linalg.cross(c[(d + 1) % 3], c[(d + 2) % 3])
                height = abs(torch.dot(c[d], normal).item()) / torch.linalg.vector_norm(normal).item()
                m = math.ceil(cutoff / height)
                reps.append(range(-m, m + 1))
            else:
                reps.append(range(0, 1))
        for off in itertools.product(*reps):
            shift = torch.tensor(off, dtype=torch.float64) @ c
            d = torch.cdist(p + shift, p)  # [source, target]
            mask = d <= cutoff
            if off == (0, 0, 0):
                mask.fill_diagonal_(False)
            s, t = mask.nonzero(as_tuple=True)
            src.append(s + start)
            dst.append(t + start)
            dists.append(d[s, t])
            offs.append(torch.tensor(off, dtype=torch.int32).expand(s.numel(), 3))
        start += n
    src, dst, dist, off = torch.cat(src), torch.cat(dst), torch.cat(dists), torch.cat(offs)
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    src, dst, dist, off = src[order], dst[order], dist[order], off[order]
    if max_neighbors is not None:
        first = torch.searchsorted(dst, dst)  # index of the first edge of each target
        keep = torch.arange(dst.numel()) - first < max_neighbors
        src, dst, dist, off = src[keep], dst[keep], dist[keep], off[keep]
    return torch.stack([src, dst]), off, dist.to(pos.dtype)


def write_molecules(path, count: int, seed: int, elements: str = "CHNO", periodic: bool = False) -> str:
    """A small EMT-labelled dataset (energy, forces) of rattled molecules, with its stats.json."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    from jmp_ext.data import DatasetWriter, LmdbDataset, compute_stats, save_stats

    rng = np.random.default_rng(seed)
    names = ["H2O", "NH3", "CH4", "CO2", "HCN", "H2CO", "CH3OH", "C2H4"]
    with DatasetWriter(path, overwrite=True) as writer:
        for k in range(count):
            atoms = molecule(names[k % len(names)])
            atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
            if periodic:
                atoms.cell = np.eye(3) * 6.0
                atoms.pbc = True
            atoms.calc = EMT()
            n = len(atoms)
            writer.add({"pos": atoms.positions.copy(), "atomic_numbers": atoms.numbers.copy(),
                        "cell": atoms.cell.array.copy(), "pbc": atoms.pbc.copy(), "tags": np.full(n, 2),
                        "fixed": np.zeros(n, bool), "energy": np.array(atoms.get_potential_energy()),
                        "forces": atoms.get_forces()})
    save_stats(path, compute_stats(LmdbDataset(path)))
    return str(path)
