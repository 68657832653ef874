"""radius_graph on the CPU against vesin, matscipy and ASE, in the same run.

    pytest bench/bench_radius_graph.py --benchmark-enable --benchmark-only

Ours is one batched call per case; the others are called once per system (none has a batched
API). Every competitor returns the full (i, j, S, d) list; ours also sorts every target's
neighbours by distance, and in the OC20 case applies the k = 30 cap (the others do not, which
favours them). Thread counts: "1" pins everyone to one thread, "all" lets ours and vesin use every
core (matscipy and ASE are single-threaded). Slow competitors skip the largest cases.
"""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.neighborlist import neighbor_list as ase_neighbor_list

from jmp_ext.ops import radius_graph

vesin = pytest.importorskip("vesin")
matscipy_neighbours = pytest.importorskip("matscipy.neighbours")


# ---- cases: (list of ase.Atoms, cutoff, max_neighbors) ----


def _cu(repeat):
    return [bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)]


def _oc20_slabs(count=32, seed=0):
    """Slab + adsorbate systems like OC20's: 3-6 layer fcc(111) slabs, 15 A vacuum, a small
    adsorbate, pbc on all axes (as OC20 stores them), 70-200 atoms."""
    rng = np.random.default_rng(seed)
    systems = []
    for _ in range(count):
        metal = str(rng.choice(["Cu", "Pt", "Ag", "Pd", "Ni"]))
        size = (int(rng.integers(3, 5)), int(rng.integers(3, 5)), int(rng.integers(4, 9)))
        slab = fcc111(metal, size=size, vacuum=7.5)
        for _ in range(int(rng.integers(1, 4))):
            add_adsorbate(slab, str(rng.choice(["O", "C", "H", "N"])), 1.8,
                          position=tuple(rng.uniform(0, 5, 2)))  # fmt: skip
        slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
        slab.pbc = True
        systems.append(slab)
    return systems


def _molecules(count=32, seed=0):
    """Non-periodic molecules of 10-60 atoms at ~0.1 atoms / A^3 (QM9 to small drug size)."""
    rng = np.random.default_rng(seed)
    systems = []
    for _ in range(count):
        n = int(rng.integers(10, 61))
        radius = (3 * n / (4 * np.pi * 0.1)) ** (1 / 3)
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        pos = direction * radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3)
        # A box around the molecule only because matscipy needs a cell; pbc stays False.
        box = 2 * radius + 2
        systems.append(Atoms("C" * n, positions=pos + box / 2, cell=np.eye(3) * box, pbc=False))
    return systems


CASES = {
    "cu_1k_6A": (_cu((6, 6, 7)), 6.0, None),
    "cu_10k_6A": (_cu((14, 14, 13)), 6.0, None),
    "cu_100k_6A": (_cu((29, 29, 30)), 6.0, None),
    "cu_1k_12A": (_cu((6, 6, 7)), 12.0, None),
    "cu_10k_12A": (_cu((14, 14, 13)), 12.0, None),
    "oc20_32_slabs_12A_k30": (_oc20_slabs(), 12.0, 30),
    "tiny_cell_1atom_12A": ([bulk("Cu", "fcc", a=3.61)], 12.0, None),
    "molecules_32_6A": (_molecules(), 6.0, None),
}
# Competitors too slow for a case (seconds per call) skip it.
SKIP = {
    "ase": {"cu_100k_6A", "cu_10k_12A"},
    "matscipy": {"cu_100k_6A"},
}
ROUNDS = {"cu_100k_6A": 3, "cu_10k_12A": 3, "cu_1k_12A": 5}


# ---- the four libraries on one case ----


def _ours(systems, cutoff, k):
    pos = torch.tensor(np.concatenate([a.positions for a in systems]))
    natoms = [len(a) for a in systems]
    cell = torch.tensor(np.stack([a.cell.array for a in systems]))
    pbc = torch.tensor(np.stack([a.pbc for a in systems]))
    return lambda: radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc, max_neighbors=k)


def _vesin(systems, cutoff, threads):
    lists = [vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=threads)] * len(systems)

    def run():
        return [
            nl.compute(a.positions, a.cell.array, a.pbc, quantities="ijSd")
            for nl, a in zip(lists, systems)
        ]

    return run


def _per_system(fn, systems, cutoff):
    return lambda: [fn("ijSd", a, cutoff) for a in systems]


LIBRARIES = ["jmp_ext", "vesin", "matscipy", "ase"]


@pytest.mark.parametrize("threads", ["1", "all"])
@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("case", list(CASES))
def test_radius_graph(benchmark, case, library, threads):
    if case in SKIP.get(library, ()):
        pytest.skip(f"{library} takes too long on {case}")
    if threads == "all" and library in ("matscipy", "ase"):
        pytest.skip(f"{library} is single-threaded")
    systems, cutoff, k = CASES[case]
    count = 1 if threads == "1" else torch.get_num_threads()
    if library == "jmp_ext":
        run = _ours(systems, cutoff, k)
    elif library == "vesin":
        run = _vesin(systems, cutoff, count)
    elif library == "matscipy":
        run = _per_system(matscipy_neighbours.neighbour_list, systems, cutoff)
    else:
        run = _per_system(ase_neighbor_list, systems, cutoff)
    benchmark.group = f"{case} threads={threads}"
    benchmark.extra_info.update(atoms=sum(len(a) for a in systems), systems=len(systems))
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        run()  # warm up (first-call imports and allocations)
        benchmark.pedantic(run, rounds=ROUNDS.get(case, 10), iterations=1)
    finally:
        torch.set_num_threads(before)
