"""jmp_ext.ops.radius_graph against ASE's neighbor_list (the oracle for the pair set), the
brute-force twin (order and max_neighbors), float64 recomputation (distances), gradcheck
(edge_vectors), and every bad input the op must reject."""

import importlib
import math
import os
import re

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list

from jmp_ext.ops import edge_vectors, radius_graph, reference_radius_graph as reference

DTYPES = [torch.float32, torch.float64]


# ---- random batches ----


def _random_cell(rng, lengths, shear):
    cell = np.diag(lengths) + rng.uniform(-shear, shear, (3, 3)) * np.mean(lengths)
    if rng.random() < 0.3:  # left-handed cells too
        cell[0] *= -1
    return cell


def _random_system(rng, kind):
    """(positions [n, 3], cell given to radius_graph, cell given to ASE, pbc [3]) float64."""
    n = int(rng.integers(1, 12))
    if kind == "molecule":
        pos = rng.uniform(0, 6, (n, 3))
        return pos, None, np.zeros((3, 3)), np.zeros(3, bool)
    pbc = {
        "bulk": [True] * 3,
        "skewed": [True] * 3,
        "tiny": [True] * 3,
        "slab": [True, True, False],
        "wire": [False, True, False],
    }[kind]
    pbc = np.array(pbc)
    if kind == "tiny":
        n = int(rng.integers(1, 3))
        cell = _random_cell(rng, rng.uniform(1.2, 2.5, 3), 0.2)
    elif kind == "skewed":
        cell = _random_cell(rng, rng.uniform(3, 7, 3), 0.2)
        cell[1] += cell[0] * rng.uniform(1.5, 3)  # strongly sheared, ~20 degrees
    else:
        cell = _random_cell(rng, rng.uniform(2.5, 7, 3), 0.3)
    if abs(np.linalg.det(cell)) < 0.05 * np.prod(np.linalg.norm(cell, axis=1)):
        return _random_system(rng, kind)
    # Unwrapped positions: up to half a cell outside on periodic axes.
    frac = rng.uniform(-0.5, 1.5, (n, 3))
    pos = frac @ cell
    ours = cell.copy()
    ours[~pbc] = 0 if rng.random() < 0.5 else ours[~pbc]  # open-axis rows are ignored
    return pos, ours, cell, pbc


def _ase_pairs(pos, cell, pbc, cutoff):
    i, j, s = neighbor_list("ijS", Atoms(positions=pos, cell=cell, pbc=pbc), cutoff)
    return set(zip(i.tolist(), j.tolist(), map(tuple, s.tolist())))


def _safe_cutoff(rng, systems, low, high):
    """A cutoff with no pair within 1e-6 of it, so that ASE's d < rc and our d <= rc agree."""
    while True:
        cutoff = float(rng.uniform(low, high))
        if all(
            _ase_pairs(p, c, b, cutoff * (1 - 1e-6)) == _ase_pairs(p, c, b, cutoff * (1 + 1e-6))
            for p, _, c, b in systems
        ):
            return cutoff


def _random_batch(seed, kinds=("bulk", "skewed", "tiny", "slab", "wire", "molecule")):
    rng = np.random.default_rng(seed)
    systems = [_random_system(rng, kinds[int(rng.integers(len(kinds)))]) for _ in range(4)]
    cutoff = _safe_cutoff(rng, systems, 1.5, 5.0)
    return systems, cutoff


def _batch_tensors(systems, dtype):
    pos = torch.tensor(np.concatenate([s[0] for s in systems]), dtype=dtype)
    natoms = torch.tensor([len(s[0]) for s in systems])
    cell = torch.tensor(
        np.stack([s[1] if s[1] is not None else np.zeros((3, 3)) for s in systems]), dtype=dtype
    )
    pbc = torch.tensor(np.stack([s[3] for s in systems]))
    return pos, natoms, cell, pbc


def _triples(edge_index, cell_offsets, first=0):
    """The (target i, source j, shift S) set in ASE's index convention."""
    return set(
        zip(
            (edge_index[1] - first).tolist(),
            (edge_index[0] - first).tolist(),
            map(tuple, cell_offsets.tolist()),
        )
    )


def _assert_sorted(edge_index, cell_offsets, distance):
    keys = list(
        zip(
            edge_index[1].tolist(),
            distance.double().tolist(),
            edge_index[0].tolist(),
            map(tuple, cell_offsets.tolist()),
        )
    )
    assert keys == sorted(keys)


def _float64_distance(pos, cell, natoms, edge_index, cell_offsets):
    """|pos[j] - pos[i] + S @ cell| in float64, by plain indexing (independent of edge_vectors)."""
    pos, cell = pos.double(), cell.double()
    system = torch.repeat_interleave(torch.arange(len(natoms)), natoms)[edge_index[1]]
    d = pos[edge_index[0]] - pos[edge_index[1]]
    d = d + (cell_offsets.double()[:, :, None] * cell[system]).sum(1)
    return d.norm(dim=1)


# ---- the pair set ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(24))
def test_matches_ase_on_random_batches(seed, dtype):
    systems, cutoff = _random_batch(seed)
    pos, natoms, cell, pbc = _batch_tensors(systems, dtype)
    edge_index, cell_offsets, distance = radius_graph(
        pos, cutoff, natoms=natoms, cell=cell, pbc=pbc
    )
    assert edge_index.dtype == torch.int64 and cell_offsets.dtype == torch.int32
    assert distance.dtype == dtype
    first = 0
    for p, _, ase_cell, b in systems:
        # ASE sees the positions radius_graph saw (rounded to dtype).
        p = torch.tensor(p, dtype=dtype).double().numpy()
        mask = (edge_index[1] >= first) & (edge_index[1] < first + len(p))
        assert (edge_index[0][mask] >= first).all() and (edge_index[0][mask] < first + len(p)).all()
        ours = _triples(edge_index[:, mask], cell_offsets[mask], first)
        assert ours == _ase_pairs(p, ase_cell, b, cutoff)
        first += len(p)
    assert not cell_offsets[:, ~pbc.any(0)].any() if len(cell_offsets) else True
    _assert_sorted(edge_index, cell_offsets, distance)
    expected = _float64_distance(pos, cell, natoms, edge_index, cell_offsets)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(distance.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("cutoff", [6.0, 12.0])
def test_one_atom_cell_much_smaller_than_cutoff(cutoff):
    """fcc primitive cell (1 atom, 2.55 A): hundreds of images of the atom itself."""
    atoms = bulk("Cu", "fcc", a=3.61)
    atoms.positions += [[5.3, -7.1, 2.2]]  # far outside its cell
    edge_index, cell_offsets, distance = radius_graph(
        torch.tensor(atoms.positions), cutoff, cell=torch.tensor(atoms.cell.array)
    )
    ase = _ase_pairs(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    assert len(ase) > 50 and _triples(edge_index, cell_offsets) == ase


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cutoff", [6.0, 12.0])
def test_perfect_crystal_with_exact_ties(cutoff, dtype):
    """Bulk fcc Cu against ASE at cutoffs between shells. Whole shells of equal distances (up to
    72 neighbours, equal or a few ulps apart) must still come out in (distance, source, shift)
    order."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 2, 2))
    edge_index, cell_offsets, distance = radius_graph(
        torch.tensor(atoms.positions, dtype=dtype), cutoff, cell=torch.tensor(atoms.cell.array, dtype=dtype)
    )
    assert _triples(edge_index, cell_offsets) == _ase_pairs(
        atoms.positions, atoms.cell.array, atoms.pbc, cutoff
    )
    _assert_sorted(edge_index, cell_offsets, distance)


def test_cutoff_is_inclusive_and_zero_distance_is_not_an_edge():
    # Atoms on integer coordinates, cutoff exactly 1: the 1 A pairs are edges (ASE: d < rc).
    pos = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [3, 0, 0]], dtype=torch.float64)
    edge_index, cell_offsets, distance = radius_graph(pos, 1.0)
    assert sorted(zip(edge_index[1].tolist(), edge_index[0].tolist())) == [
        (0, 1), (0, 2), (1, 0), (2, 0)
    ]  # fmt: skip
    assert (distance == 1).all()


def test_molecules_without_cell_and_defaults():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 5, (9, 3))
    cutoff = _safe_cutoff(rng, [(p, None, np.zeros((3, 3)), np.zeros(3, bool))], 2, 4)
    edge_index, cell_offsets, _ = radius_graph(torch.tensor(p), cutoff)
    assert not cell_offsets.any()
    assert _triples(edge_index, cell_offsets) == _ase_pairs(p, np.zeros((3, 3)), False, cutoff)


def _brute_force_pairs(pos, cutoff):
    d = torch.cdist(pos.double(), pos.double())
    return {(int(j), int(i)) for i, j in ((d <= cutoff) & (d > 0)).nonzero().tolist()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_systems_and_huge_cutoffs(dtype, device):
    """An open axis whose extent is rounding noise (a ring rotated by a matrix) or a cutoff far
    wider than the system once overflowed the bin search range and gave no edges at all."""
    angle = torch.arange(6, dtype=torch.float64) * (math.pi / 3)
    ring = torch.stack([1.4 * angle.cos(), torch.zeros(6, dtype=torch.float64), 1.4 * angle.sin()], 1)
    ring[:, 1] = torch.tensor([0.0, 1.5e-16, -1e-16, 0.0, 2e-16, 0.0])
    for pos, cutoff in ((ring, 3.0), (torch.rand(5, 3, dtype=torch.float64) * 3, 1e10)):
        pos = pos.to(dtype)
        edge_index, _, _ = radius_graph(pos.to(device), cutoff)
        assert set(map(tuple, edge_index.T.tolist())) == _brute_force_pairs(pos, cutoff)
    # A periodic sheet (open z) whose two atoms differ in z by 1e-9 A: ASE is the oracle.
    a = 2.46
    cell = np.array([[a, 0, 0], [a / 2, a * math.sqrt(3) / 2, 0], [0, 0, 20.0]])
    sheet = np.array([[0, 0, 0], [a / 2, a / (2 * math.sqrt(3)), 1e-9]])
    pbc = np.array([True, True, False])
    edge_index, cell_offsets, _ = radius_graph(
        torch.tensor(sheet, dtype=dtype, device=device), 3.0, cell=torch.tensor(cell, dtype=dtype, device=device),
        pbc=torch.tensor(pbc, device=device),
    )
    assert _triples(edge_index.cpu(), cell_offsets.cpu()) == _ase_pairs(sheet, cell, pbc, 3.0)
    assert edge_index.shape[1] == 24


def test_empty_and_single_atom_systems():
    empty = torch.zeros(0, 3)
    edge_index, cell_offsets, distance = radius_graph(empty, 3.0)
    assert edge_index.shape == (2, 0) and cell_offsets.shape == (0, 3) and distance.shape == (0,)
    # A batch with an empty system, a lone molecule atom and a lone periodic atom.
    pos = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64)
    cell = torch.stack([torch.zeros(3, 3), torch.zeros(3, 3), 2.0 * torch.eye(3)]).double()
    pbc = torch.tensor([[False] * 3, [False] * 3, [True] * 3])
    edge_index, cell_offsets, distance = radius_graph(
        pos, 2.5, natoms=[0, 1, 1], cell=cell, pbc=pbc
    )
    # Only the periodic atom has edges: its 6 images at 2 A and 12 at 2.83 > 2.5 are not.
    assert (edge_index == 1).all() and len(distance) == 6
    torch.testing.assert_close(distance, torch.full((6,), 2.0, dtype=torch.float64))


# ---- order, determinism, float32 vs float64 ----


def test_matches_brute_force_twin_bitwise():
    for seed in range(6):
        systems, cutoff = _random_batch(100 + seed)
        pos, natoms, cell, pbc = _batch_tensors(systems, torch.float64)
        ours = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc)
        ref = reference.radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        torch.testing.assert_close(ours[2], ref[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_large_batches_search_twice_and_agree_with_small_ones(seed):
    """Small graphs are searched once, large ones (over ~1M expected edges) count and then fill:
    the same systems must get bitwise the same edges either way. 10k atoms of Cu at 6 A push a
    batch onto the two-pass path; the random systems after it are then compared with
    themselves alone (single pass), whose pairs the other tests check against ASE. The counting
    pass of the two-pass path decides most pairs without their exact distance, so the batch
    includes pairs exactly at the cutoff and at distance zero."""
    rng = np.random.default_rng(200 + seed)
    kinds = ("bulk", "skewed", "tiny", "slab", "wire", "molecule")
    small = [_random_system(rng, kind) for kind in kinds]
    # Pairs exactly at the cutoff (fcc with a = cutoff, unrattled), just beyond it and at
    # distance zero.
    edge = bulk("Cu", "fcc", a=6.0, cubic=True)
    small.append((edge.positions, edge.cell.array, edge.cell.array, edge.pbc))
    twins = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 0.0, 6.00000001]])
    small.append((twins, None, np.zeros((3, 3)), np.zeros(3, bool)))
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((14, 14, 13))
    big.rattle(0.05, seed=seed)
    cutoff = 6.0
    pos, natoms, cell, pbc = _batch_tensors(small, torch.float64)
    alone = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc)
    n = len(big)
    batched = radius_graph(
        torch.cat([torch.tensor(big.positions), pos]),
        cutoff,
        natoms=torch.cat([torch.tensor([n]), natoms]),
        cell=torch.cat([torch.tensor(big.cell.array)[None], cell]),
        pbc=torch.cat([torch.tensor(big.pbc)[None], pbc]),
    )
    count = alone[0].shape[1]
    assert count > 0 and batched[0].shape[1] > 500_000 + count
    assert torch.equal(batched[0][:, -count:] - n, alone[0])
    assert torch.equal(batched[1][-count:], alone[1])
    assert torch.equal(batched[2][-count:], alone[2])


def test_deterministic_across_thread_counts():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    atoms.rattle(0.1, seed=3)
    args = (torch.tensor(atoms.positions), 5.0)
    kwargs = {"cell": torch.tensor(atoms.cell.array), "max_neighbors": 30}
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results.append(radius_graph(*args, **kwargs))
            results.append(radius_graph(*args, **kwargs))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_float32_and_float64_find_the_same_pairs():
    systems, cutoff = _random_batch(7)
    out = {}
    for dtype in DTYPES:
        pos, natoms, cell, pbc = _batch_tensors(systems, dtype)
        # Same input values in both dtypes: positions rounded to float32 once.
        pos, cell = pos.float().to(dtype), cell.float().to(dtype)
        out[dtype] = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc)
    assert torch.equal(out[torch.float32][0], out[torch.float64][0])
    assert torch.equal(out[torch.float32][1], out[torch.float64][1])
    torch.testing.assert_close(out[torch.float32][2], out[torch.float64][2].float())


def test_non_contiguous_inputs_give_the_same_graph():
    systems, cutoff = _random_batch(11)
    pos, natoms, cell, pbc = _batch_tensors(systems, torch.float64)
    pos_t = pos.T.contiguous().T  # same values, column-major
    cell_t = cell.transpose(1, 2).contiguous().transpose(1, 2)
    a = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc)
    b = radius_graph(pos_t, cutoff, natoms=natoms, cell=cell_t, pbc=pbc)
    assert not pos_t.is_contiguous()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- max_neighbors ----


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 8])
def test_max_neighbors_strict_matches_brute_force(seed, k):
    systems, cutoff = _random_batch(200 + seed)
    pos, natoms, cell, pbc = _batch_tensors(systems, torch.float64)
    ours = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc, max_neighbors=k)
    ref = reference.radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc, max_neighbors=k)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert torch.bincount(ours[0][1], minlength=len(pos)).max() <= k


@pytest.mark.parametrize("k", [2**61, 2**62, 2**63 - 1, 2**63, 2**70])
def test_max_neighbors_larger_than_any_degree_is_no_cap(k):
    """(k and max_edges beyond int64 were a pybind TypeError: "incompatible function arguments")"""
    systems, cutoff = _random_batch(0)
    pos, natoms, cell, pbc = _batch_tensors(systems, torch.float64)
    for n in (2, 3, len(pos)):  # (the reserve estimate k * atoms once overflowed)
        uncapped = radius_graph(pos[:n], cutoff, cell=cell[:1], pbc=pbc[:1])
        capped = radius_graph(pos[:n], cutoff, cell=cell[:1], pbc=pbc[:1], max_neighbors=k, max_edges=k)
        for a, b in zip(capped, uncapped):
            assert torch.equal(a, b)


def test_max_neighbors_breaks_exact_ties_by_source_then_shift():
    # Simple cubic on integer coordinates: distances are exact, so ties are exact ties.
    cell = torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    pos = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    for k in (1, 2, 5, 7):
        ours = radius_graph(pos, 2.0, cell=cell, max_neighbors=k)
        ref = reference.radius_graph(pos, 2.0, cell=cell, max_neighbors=k)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    # Atom 0 has 6 neighbours at 1 A: atoms 1, 2, 3, each through shifts 0 and -1 on its axis.
    ei, off, _ = radius_graph(pos, 1.0, cell=cell, max_neighbors=3)
    assert ei[0, :3].tolist() == [1, 1, 2] and off[:2, 0].tolist() == [-1, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side, cutoff", [(1.0, 20.0), (0.05, 3.3)])
def test_a_strict_cap_over_thousands_of_neighbours_keeps_the_first_k(dtype, side, cutoff):
    """A strict cap gathered every neighbour of a target before keeping k: a 0.01 Å cell at 3 Å
    (4.5e8 each) was an out-of-memory kill (a sanitizer audit). Past 2 max(k, 4096) gathered it
    keeps the k first, and the result is the uncapped graph's k first edges of each target, the
    exact ties of a cubic cell's images broken as always (source, then shift): ~67k neighbours a
    target (searched once), and 2.4M (counted, then filled)."""
    cell = side * torch.eye(3, dtype=dtype)
    pos = side * torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=dtype)
    full = radius_graph(pos, cutoff, cell=cell)
    target = full[0][1]
    assert torch.bincount(target).min() > 2 * 4096
    rank = torch.arange(target.numel()) - torch.searchsorted(target, target)  # (sorted by target)
    for k in (1, 7, 5000, 9000):
        edge_index, cell_offsets, distance = radius_graph(pos, cutoff, cell=cell, max_neighbors=k)
        keep = rank < k
        assert torch.equal(edge_index, full[0][:, keep]) and torch.equal(cell_offsets, full[1][keep])
        assert torch.equal(distance, full[2][keep])


def test_a_strict_cap_holds_o_of_k_edges_a_target_in_memory():
    """Two atoms in a 0.03 Å cell at 3 Å: 8.4e6 neighbours a target, which the capped search
    gathered in full (0.5 GB; 14 GB in a 0.01 Å cell) before keeping k = 30."""
    import subprocess
    import sys

    code = ("import resource, torch\n"
            "from jmp_ext.ops import radius_graph\n"
            "pos, cell = 0.03 * torch.tensor([[0.0, 0, 0], [0.5, 0.5, 0.5]], dtype=torch.float64), 0.03 * torch.eye(3)\n"
            "radius_graph(pos, 0.1, cell=cell.double(), max_neighbors=30)\n"  # (the extension's own memory first)
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "edge_index = radius_graph(pos, 3.0, cell=cell.double(), max_neighbors=30)[0]\n"
            "print(edge_index.shape[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    edges, grown_kb = map(int, done.stdout.split())
    assert edges == 60 and grown_kb < 64 * 1024, grown_kb


def test_positions_and_cutoffs_near_the_float64_limits():
    """UBSan (float-cast-overflow): an open axis spanning +-1.7e308 overflowed its extent, and a
    cutoff of 1e300 its cube, each to a bin or bucket of inf * 0 = NaN cast to an integer
    (undefined; x86 gave bin 0, which happened to be right). The graphs match brute force."""
    far = torch.tensor([[1.7e308, -1.7e308, 0.0], [-1.7e308, 1.7e308, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    huge = (torch.rand(40, 3, generator=generator, dtype=torch.float64) - 0.5) * 1e200
    for pos, cutoff in ((far, 1.0), (huge, 1e300)):
        ours, ref = radius_graph(pos, cutoff), reference.radius_graph(pos, cutoff)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert radius_graph(huge, 1e300)[0].shape[1] == 40 * 39  # (> 32 a target: the bucketed sort)


@pytest.mark.parametrize("seed", range(4))
def test_max_neighbors_tolerant_matches_brute_force(seed):
    systems, cutoff = _random_batch(300 + seed)
    pos, natoms, cell, pbc = _batch_tensors(systems, torch.float64)
    for k, tol in ((2, 0.01), (4, 0.5), (6, 0.0)):
        kwargs = dict(natoms=natoms, cell=cell, pbc=pbc, max_neighbors=k, degeneracy_tolerance=tol)
        ours = radius_graph(pos, cutoff, **kwargs)
        ref = reference.radius_graph(pos, cutoff, **kwargs)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_max_neighbors_tolerant_keeps_degenerate_shells():
    # Simple cubic: 6 neighbours at 1 A, 12 at sqrt(2). k=4 strict keeps 4; tolerant keeps the
    # whole first shell (d^2 <= d_5^2 + 0.01 = 1.01).
    cell = 3.0 * torch.eye(3, dtype=torch.float64)
    pos = torch.tensor([[0.0, 0, 0]], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pos = grid.double()
    strict = radius_graph(pos, 1.5, cell=cell, max_neighbors=4)[0]
    tolerant = radius_graph(pos, 1.5, cell=cell, max_neighbors=4, degeneracy_tolerance=0.01)[0]
    assert torch.bincount(strict[1]).tolist() == [4] * 27
    assert torch.bincount(tolerant[1]).tolist() == [6] * 27


# ---- gradients ----


def test_edge_vectors_gradcheck_wrt_pos_and_cell():
    systems, cutoff = _random_batch(5, kinds=("bulk", "slab", "skewed"))
    pos, natoms, cell, pbc = _batch_tensors(systems[:2], torch.float64)
    edge_index, cell_offsets, _ = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc)
    batch = torch.repeat_interleave(torch.arange(len(natoms)), natoms)

    def distances(p, c):
        return edge_vectors(p, edge_index, cell_offsets, c, batch).norm(dim=-1)

    torch.autograd.gradcheck(
        distances, (pos.clone().requires_grad_(), cell.clone().requires_grad_())
    )


def test_edge_vectors_gradients_are_bitwise_reproducible_across_thread_counts():
    """Forces and stress are gradients through edge_vectors: in float32 they must not change
    from call to call or with the thread count (indexing's backward, an accumulating
    index_put, adds in a varying order on several threads)."""
    systems = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((5, 5, 4)) for _ in range(2)]
    for seed, atoms in enumerate(systems):
        atoms.rattle(0.1, seed=seed)
    pos, natoms, cell, pbc = _batch_tensors([(a.positions, a.cell.array, None, a.pbc) for a in systems], torch.float32)
    edge_index, cell_offsets, _ = radius_graph(pos, 6.0, natoms=natoms, cell=cell, pbc=pbc)
    batch = torch.repeat_interleave(torch.arange(len(natoms)), natoms)
    weights = torch.randn(edge_index.shape[1], 3, generator=torch.Generator().manual_seed(0))

    def gradients():
        p, c = pos.clone().requires_grad_(), cell.clone().requires_grad_()
        (edge_vectors(p, edge_index, cell_offsets, c, batch) * weights).sum().backward()
        return p.grad, c.grad

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 2, 2):
            torch.set_num_threads(threads)
            results.append(gradients())
    finally:
        torch.set_num_threads(before)
    assert edge_index.shape[1] > 50_000
    for pos_grad, cell_grad in results[1:]:
        assert torch.equal(pos_grad, results[0][0]) and torch.equal(cell_grad, results[0][1])


def test_edge_vectors_needs_batch_for_several_cells():
    pos = torch.zeros(2, 3)
    cells = torch.stack([torch.eye(3), 2 * torch.eye(3)])
    edges, offsets = torch.tensor([[0], [1]]), torch.tensor([[1, 0, 0]])
    with pytest.raises(ValueError, match="2 cells need batch"):
        edge_vectors(pos, edges, offsets, cells)
    assert edge_vectors(pos, edges, offsets, cells, torch.tensor([0, 1])).tolist() == [[2.0, 0.0, 0.0]]


def test_radius_graph_distance_is_differentiable():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=0)
    pos = torch.tensor(atoms.positions, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, requires_grad=True)
    edge_index, cell_offsets, distance = radius_graph(pos, 4.0, cell=cell)
    plain = radius_graph(pos.detach(), 4.0, cell=cell.detach())[2]
    torch.testing.assert_close(distance.detach(), plain, rtol=1e-12, atol=1e-12)
    # Pair energy sum(d^2): dE/dpos_i = sum over edges of 2 D (with sign), computed by hand.
    (distance**2).sum().backward()
    vectors = edge_vectors(pos.detach(), edge_index, cell_offsets, cell.detach())
    expected = torch.zeros_like(pos).index_add_(0, edge_index[0], 2 * vectors)
    expected.index_add_(0, edge_index[1], -2 * vectors)
    torch.testing.assert_close(pos.grad, expected)
    # Uniform strain eps scales every D by (1 + eps): dE/d(cell) . cell = sum 2 d^2.
    torch.testing.assert_close(
        (cell.grad * cell.detach()).sum() + (pos.grad * pos.detach()).sum(),
        2 * (distance.detach() ** 2).sum(),
    )


def test_opcheck():
    systems, cutoff = _random_batch(1)
    pos, natoms, cell, pbc = _batch_tensors(systems, torch.float64)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), natoms.cumsum(0)])
    torch.library.opcheck(
        torch.ops.jmp_ext.radius_graph.default,
        (pos, cutoff, ptr, cell, pbc, 5, -1.0, 1 << 20),
        test_utils=("test_schema", "test_faketensor"),
    )


# ---- bad input ----


def _one_system():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    return torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_positions(bad):
    pos, cell = _one_system()
    pos[2, 1] = bad
    with pytest.raises(ValueError, match=r"pos\[2\] is not finite"):
        radius_graph(pos, 3.0, cell=cell)
    with pytest.raises(ValueError, match=r"pos\[2\] is not finite"):
        radius_graph(pos, 3.0)  # molecules too


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (torch.zeros(3, 3), [True, True, True]),
        (torch.diag(torch.tensor([3.0, 0.0, 3.0])), [True, True, True]),
        (torch.tensor([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3]]), [True, True, False]),  # collinear
        (torch.tensor([[3.0, 0, 0], [0, 3, 0], [3, 3, 0]]), [True, True, True]),  # coplanar
        (torch.zeros(3, 3), [False, False, True]),
    ],
)
def test_rejects_singular_cells_on_periodic_axes(cell, pbc):
    pos, _ = _one_system()
    with pytest.raises(ValueError, match="singular or degenerate"):
        radius_graph(pos, 3.0, cell=cell.double(), pbc=torch.tensor(pbc))


def test_open_axes_ignore_the_cell_row():
    pos, cell = _one_system()
    cell[2] = torch.nan  # a slab's third row is not used
    pbc = torch.tensor([True, True, False])
    edge_index, cell_offsets, _ = radius_graph(pos, 3.0, cell=cell, pbc=pbc)
    assert edge_index.shape[1] > 0 and not cell_offsets[:, 2].any()
    # Nor do the differentiable distances (0 * NaN is NaN); that row's gradient is 0.
    differentiable = cell.clone().requires_grad_()
    _, _, distance = radius_graph(pos.clone().requires_grad_(), 3.0, cell=differentiable, pbc=pbc)
    assert torch.isfinite(distance).all()
    distance.sum().backward()
    assert torch.isfinite(differentiable.grad).all() and not differentiable.grad[2].any()
    cell[0, 0] = torch.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        radius_graph(pos, 3.0, cell=cell, pbc=pbc)


@pytest.mark.parametrize("cutoff", [0.0, -1.0, math.nan, math.inf])
def test_rejects_bad_cutoff(cutoff):
    pos, cell = _one_system()
    with pytest.raises(ValueError, match="cutoff must be finite and > 0"):
        radius_graph(pos, cutoff, cell=cell)


def test_rejects_wrong_shapes_and_dtypes():
    pos, cell = _one_system()
    with pytest.raises(ValueError, match=r"pos must be a \[N, 3\]"):
        radius_graph(pos[:, :2], 3.0)
    for dtype in (torch.int64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="float32 or float64"):
            radius_graph(pos.to(dtype), 3.0)
    with pytest.raises(TypeError, match="cell is torch.float32 but pos is torch.float64"):
        radius_graph(pos, 3.0, cell=cell.float())
    with pytest.raises(ValueError, match=r"cell must have shape \[B, 3, 3\]"):
        radius_graph(pos, 3.0, natoms=[2, 2], cell=cell)
    with pytest.raises(ValueError, match=r"pbc must have shape"):
        radius_graph(pos, 3.0, cell=cell, pbc=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="pbc must be a bool tensor"):
        radius_graph(pos, 3.0, cell=cell, pbc=torch.ones(3))
    with pytest.raises(TypeError, match="cutoff must be a number"):
        radius_graph(pos, "3", cell=cell)


def test_rejects_natoms_that_do_not_add_up():
    pos, cell = _one_system()
    with pytest.raises(ValueError, match="natoms adds up to 5 atoms but pos has 4 rows"):
        radius_graph(pos, 3.0, natoms=[2, 3])
    with pytest.raises(ValueError, match="negative"):
        radius_graph(pos, 3.0, natoms=torch.tensor([5, -1]))
    with pytest.raises(TypeError, match="natoms must be a 1-D integer tensor"):
        radius_graph(pos, 3.0, natoms=torch.tensor([4.0]))
    with pytest.raises(TypeError, match="natoms"):
        radius_graph(pos, 3.0, natoms=[4.0])


def test_rejects_pbc_without_cell_and_bad_caps():
    pos, cell = _one_system()
    with pytest.raises(ValueError, match="no cell was given"):
        radius_graph(pos, 3.0, pbc=torch.tensor([True, False, False]))
    # An ASE molecule's zero cell without pbc: the default (periodic) is what the message names.
    cells = torch.stack([cell, torch.zeros_like(cell)])
    with pytest.raises(ValueError, match=r"cell\[1\] is all zeros, but without pbc every axis of a given cell is "
                                         r"periodic: pass pbc \(False for a molecule\)"):
        radius_graph(torch.cat([pos, pos]), 3.0, natoms=[len(pos), len(pos)], cell=cells)
    assert radius_graph(pos, 3.0, cell=torch.zeros_like(cell), pbc=torch.tensor([False] * 3))[0].shape[1] > 0
    with pytest.raises(ValueError, match="max_neighbors must be an int >= 1"):
        radius_graph(pos, 3.0, max_neighbors=0)
    with pytest.raises(ValueError, match="needs max_neighbors"):
        radius_graph(pos, 3.0, degeneracy_tolerance=0.01)
    with pytest.raises(ValueError, match="degeneracy_tolerance must be finite"):
        radius_graph(pos, 3.0, max_neighbors=3, degeneracy_tolerance=-1.0)


def test_rejects_mixed_devices():
    pos, cell = _one_system()
    with pytest.raises(ValueError, match="pos is on cpu but cell is on meta"):
        radius_graph(pos, 3.0, cell=cell.to("meta"))


def test_output_bound_says_how_many_edges():
    pos, cell = _one_system()
    full = radius_graph(pos, 5.0, cell=cell)[0].shape[1]
    with pytest.raises(ValueError, match=f"would have {full} edges, more than max_edges = 10"):
        radius_graph(pos, 5.0, cell=cell, max_edges=10)
    assert radius_graph(pos, 5.0, cell=cell, max_edges=full)[0].shape[1] == full


@pytest.mark.parametrize("copies, cutoff, max_edges", [(1, 1000.0, 1000), (40, 150.0, 10**5)])
def test_hopeless_search_is_refused_before_it_starts(device, copies, cutoff, max_edges):
    """1000 Å around a 1-atom 2.5 Å cell: ~5e8 edges; refused at once, with an estimate. The
    guard is on the whole batch: at 150 Å with a cap on the neighbours (where the candidate
    pairs, not the expected edges, decide) one such cell is searched, 40 of them together are
    refused before the search."""
    atoms = bulk("Cu", "fcc", a=3.61)
    pos = torch.tensor(np.tile(atoms.positions, (copies, 1)), device=device)
    cell = torch.tensor(np.stack([atoms.cell.array] * copies), device=device)
    with pytest.raises(ValueError, match=r"would have roughly .* edges") as error:
        radius_graph(pos, cutoff, natoms=[1] * copies, cell=cell, max_edges=max_edges)
    estimate = float(re.search(r"roughly (\S+) edges", str(error.value)).group(1))
    assert 1e7 < estimate < 1e9, estimate
    assert "skewed" not in str(error.value)  # (fcc's primitive cell: its vectors' lengths give 1.41x its volume)
    if copies > 1:
        with pytest.raises(ValueError, match=r"would have roughly .* edges"):
            radius_graph(pos, cutoff, natoms=[1] * copies, cell=cell, max_edges=max_edges, max_neighbors=12)
        assert radius_graph(pos[:1], cutoff, cell=cell[0], max_edges=max_edges, max_neighbors=12)[0].shape[1] == 12
    if device.type == "cuda":  # the CPU's message, to its last printed digit
        with pytest.raises(ValueError) as on_cpu:
            radius_graph(pos.cpu(), cutoff, natoms=[1] * copies, cell=cell.cpu(), max_edges=max_edges)
        assert str(error.value) == str(on_cpu.value)


def test_an_uncapped_graph_far_over_max_edges_is_refused_from_its_estimate(device):
    """One atom in a 2 Å cell at 212 Å: ~5e6 edges. Without a cap on the neighbours, a graph
    expected at more than 4x max_edges is refused from the estimate, before the search that
    would count it (at 1600 Å that search took 33 s before its refusal); with max_neighbors
    the search runs, and its output is small."""
    pos = torch.zeros(1, 3, dtype=torch.float64, device=device)
    cell = 2.0 * torch.eye(3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"would have roughly \S+ edges \(searching") as error:
        radius_graph(pos, 212.0, cell=cell, max_edges=5 * 10**5)
    estimate = float(re.search(r"roughly (\S+) edges", str(error.value)).group(1))
    lattice_points = 4 / 3 * math.pi * 106**3  # (within 106 cell lengths, about)
    assert 0.9 < estimate / lattice_points < 1.2
    edge_index, _, distance = radius_graph(pos, 212.0, cell=cell, max_edges=5 * 10**5, max_neighbors=10)
    assert edge_index.shape[1] == 10 and distance[:6].eq(2.0).all() and distance[6:].gt(2.0).all()


def test_a_dilute_system_is_not_refused_for_its_estimates_floor(device):
    """In a dilute gas the estimate keeps ~0.3 edges per atom whatever the density (a bin spans
    many cutoffs, and the estimate's sphere gains half a bin): 4e6 atoms with 2e3 edges were
    refused with max_edges = 1e4 (a review). The guard's bound grows by the atom count."""
    generator = torch.Generator().manual_seed(0)
    pos = (torch.rand(4 * 10**6, 3, generator=generator, dtype=torch.float64) * 4000.0).to(device)
    cell = 4000.0 * torch.eye(3, dtype=torch.float64, device=device)
    edge_index = radius_graph(pos, 1.0, cell=cell, max_edges=10**4)[0]
    assert 0 < edge_index.shape[1] < 10**4


def test_a_skewed_cell_is_named_when_its_search_looks_hopeless(device):
    """The same 1000-atom lattice in a basis 1-3 degrees from flat: its search covers the cell's
    face distances, and was refused as a graph of 1.6e10 edges (it has 30 per atom) with advice
    that did not fit. The message names the cell and the reduction that gives the same graph."""
    from ase.build import niggli_reduce

    atoms = bulk("Si", cubic=True).repeat(5)
    atoms.rattle(0.25, seed=0)
    skewed = atoms.copy()
    skewed.set_cell(np.array([[1, 0, 0], [40, 1, 0], [0, 30, 1]]) @ atoms.cell.array, scale_atoms=False)
    pos, cell = (torch.tensor(x, device=device) for x in (skewed.positions, skewed.cell.array))
    with pytest.raises(ValueError, match=r"would have roughly .* edges .*\. The search may be costly because of "
                                         r"skewed cells, .*: cell\[0\] \(1\.2e\+03x\); a reduced basis of the "
                                         r"same lattice gives the same graph, and quickly: "
                                         r"ase.build.niggli_reduce\(atoms\)"):
        radius_graph(pos, 12.0, cell=cell, max_neighbors=30)
    niggli_reduce(skewed)
    reduced = radius_graph(torch.tensor(skewed.positions, device=device), 12.0,
                           cell=torch.tensor(skewed.cell.array, device=device), max_neighbors=30)
    cubic = radius_graph(torch.tensor(atoms.positions, device=device), 12.0,
                         cell=torch.tensor(atoms.cell.array, device=device), max_neighbors=30)
    torch.testing.assert_close(reduced[2], cubic[2], rtol=0, atol=1e-9)  # (the same distances, target by target)


def test_the_registered_op_checks_its_inputs():
    """torch.ops.jmp_ext.radius_graph skips radius_graph()'s checks: a cell for 1 system with a
    ptr of 200000 was read past its end (and pbc printed as garbage), pos [N, 1] too."""
    pos, cell = _one_system()
    ptr = torch.tensor([0, pos.shape[0]])
    op = torch.ops.jmp_ext.radius_graph
    pbc = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"cell must have shape \[B, 3, 3\] = \[2, 3, 3\]"):
        op(pos, 3.0, torch.tensor([0, 1, pos.shape[0]]), cell[None], pbc, -1, -1.0, 2**28)
    with pytest.raises(ValueError, match=r"pos must be a \[N, 3\] tensor"):
        op(pos[:, :1], 3.0, ptr, cell[None], pbc, -1, -1.0, 2**28)
    with pytest.raises(ValueError, match=r"ptr must be an integer \[B \+ 1\] tensor"):
        op(pos, 3.0, ptr.double(), cell[None], pbc, -1, -1.0, 2**28)
    assert torch.equal(op(pos, 3.0, ptr, cell[None], pbc, -1, -1.0, 2**28)[0], radius_graph(pos, 3.0, cell=cell)[0])


@pytest.mark.parametrize("cutoff, ptr, k, tolerance, max_edges, message", [
    (0.0, [0, 4], -1, -1.0, 2**28, r"cutoff must be finite and > 0 \(at least 1e-30 Angstrom\), got 0"),
    (math.nan, [0, 4], -1, -1.0, 2**28, r"cutoff must be finite and > 0 \(at least 1e-30 Angstrom\), got nan"),
    # (1e-200 squared underflows to 0: atoms 5e-201 apart made no edge)
    (1e-200, [0, 4], -1, -1.0, 2**28, r"cutoff must be finite and > 0 \(at least 1e-30 Angstrom\), got 1e-200"),
    (3.0, [1, 5], -1, -1.0, 2**28, r"natoms must add up to the number of atoms 4"),
    (3.0, [0, 3], -1, -1.0, 2**28, r"natoms must add up to the number of atoms 4"),
    (3.0, [0, 3, 2, 4], -1, -1.0, 2**28, r"natoms\[1\] is negative"),
    (3.0, [0, 4], 0, -1.0, 2**28, r"max_neighbors must be positive, got 0"),
    (3.0, [0, 4], -1, -1.0, -1, r"max_edges must be >= 0"),
    # (a NaN tolerance took every edge of a target with more than k neighbours, silently)
    (3.0, [0, 4], 2, math.nan, 2**28, r"degeneracy_tolerance must be finite, got nan"),
    (3.0, [0, 4], 2, math.inf, 2**28, r"degeneracy_tolerance must be finite, got inf"),
])
def test_the_op_checks_sizes_and_scalars_before_choosing_a_backend(cutoff, ptr, k, tolerance, max_edges, message):
    """The CUDA kernels trust ptr, the cutoff and k (a ptr of [1, N + 1] was read, and its bins
    written, past their ends; a zero cutoff gave an empty graph): the op checks them on the host
    for every device. A meta tensor, which no backend runs, shows it (a valid call reaches the
    dispatch), and the CPU gives the same messages."""
    from jmp_ext.ops.radius_graph import _radius_graph_impl

    num_systems = len(ptr) - 1
    for device in ("meta", "cpu"):
        pos = torch.zeros(4, 3, dtype=torch.float64, device=device)
        cell = (5 * torch.eye(3, dtype=torch.float64, device=device)).expand(num_systems, 3, 3)
        pbc = torch.ones(num_systems, 3, dtype=torch.bool, device=device)
        with pytest.raises(ValueError, match=message):
            _radius_graph_impl(pos, cutoff, torch.tensor(ptr), cell, pbc, k, tolerance, max_edges)
    pos = torch.zeros(4, 3, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="runs on CPU or CUDA tensors, got meta"):
        _radius_graph_impl(pos, 3.0, torch.tensor([0, 4]), torch.zeros(1, 3, 3, dtype=torch.float64, device="meta"),
                           torch.zeros(1, 3, dtype=torch.bool, device="meta"), -1, -1.0, 2**28)


def _bad_batch():
    """Three Cu cells, each with something wrong: [what to break, on which system]."""
    pos, cell = _one_system()
    return torch.cat([pos, pos, pos]), torch.stack([cell, cell, cell])


@pytest.mark.parametrize("faults", [
    [("nan_cell", 1), ("nan_pos", 2)],
    [("nan_pos", 0), ("singular", 1)],
    [("far", 1), ("nan_pos", 1)],
    [("nan_pos", 1), ("far", 2)],
    [("singular", 2), ("nan_cell", 1)],
    [("singular", 0)],
])
def test_cuda_errors_read_as_the_cpu_reports_them(faults):
    """The CUDA kernels flag the first offender of each kind at once; the host turns those
    flags into the message the CPU kernel, checking system by system, gives for the same
    batch. The flags are set here as the kernels would (lowest atom or system per slot)."""
    rg = importlib.import_module("jmp_ext.ops.radius_graph")  # (the package's radius_graph is the function)

    pos, cell = _bad_batch()
    pbc = torch.tensor([[True, True, True], [True, False, True], [True, True, True]])
    errors = [rg._NO_ERROR] * 7
    for fault, b in faults:
        atom = 4 * b + 1 + (fault == "far")  # (the far atom after the NaN one of its system)
        slot = {"nan_cell": rg._NON_FINITE_CELL, "singular": rg._SINGULAR_CELL,
                "nan_pos": rg._NON_FINITE_POSITION, "far": rg._TOO_FAR}[fault]
        if fault == "nan_cell":
            cell[b, 0, 1] = math.nan
        elif fault == "singular":
            cell[b, 2] = 0
        elif fault == "nan_pos":
            pos[atom, 2] = math.nan
        else:
            pos[atom, 0] = 1e12
        index = b if fault in ("nan_cell", "singular") else atom
        errors[slot] = index if errors[slot] == rg._NO_ERROR else min(errors[slot], index)
    with pytest.raises(ValueError) as on_cpu:
        radius_graph(pos, 3.0, natoms=[4, 4, 4], cell=cell, pbc=pbc)
    with pytest.raises(ValueError) as from_flags:
        rg._raise_cuda_errors(errors, torch.tensor([0, 4, 8, 12]), 3.0, pbc, 2**28)
    cpu_message = str(on_cpu.value)
    if "cells away" in cpu_message:  # (the CPU can say how far; the flag cannot)
        cpu_message = re.sub(r"lies .* cells away from its cell along axis \d", "lies more than 1e9 cells away "
                             "from its cell", cpu_message)
    assert str(from_flags.value) == cpu_message


def test_cuda_error_flags_of_a_hopeless_search_hold_the_cpu_estimates():
    """The guard stores its estimates as the bits of doubles: printed as the CPU prints them,
    to the last digit, whatever their size (an int slot truncated them, and an infinite
    estimate read as 9.2e18)."""
    rg = importlib.import_module("jmp_ext.ops.radius_graph")  # (the package's radius_graph is the function)

    for candidates, edges in [(5.02655e8 + 0.4, 1.23456789e8), (3.7e22, 2.5e21)]:
        errors = [rg._NO_ERROR] * 7
        errors[rg._HOPELESS] = int(np.float64(candidates).view(np.int64))
        errors[rg._HOPELESS_EDGES] = int(np.float64(edges).view(np.int64))
        with pytest.raises(ValueError, match=re.escape(f"roughly {edges:g} edges (searching {candidates:g} candidate")):
            rg._raise_cuda_errors(errors, torch.tensor([0, 1]), 3.0, torch.ones(1, 3, dtype=torch.bool), 10)


def test_positions_absurdly_far_outside_the_cell():
    pos, cell = _one_system()
    pos[0, 0] = 1e12
    with pytest.raises(ValueError, match=r"pos\[0\] lies .* cells away"):
        radius_graph(pos, 3.0, cell=cell)


@pytest.mark.parametrize("pbc, cutoff", [([True, False, False], 2.16e9), ([True, False, False], 1e12),
                                         ([True, True, False], 3e9)])
@pytest.mark.parametrize("max_edges", [None, 2**62])
def test_a_cutoff_that_would_overflow_the_int32_shifts_is_refused(device, pbc, cutoff, max_edges):
    """A 1 Å axis searched to 2e9 Å: the bin numbers and the shifts are int32, and wrapped into
    one wrong edge (offset -2^31) or none. max_edges does not protect a 1-D search (~4e9 edges
    pass its 16x margin), nor a caller who raised it."""
    pos = torch.zeros(1, 3, dtype=torch.float64, device=device)
    cell = torch.diag(torch.tensor([1.0, 1.0, 10.0], dtype=torch.float64, device=device))
    kwargs = {} if max_edges is None else {"max_edges": max_edges}
    with pytest.raises(ValueError, match=r"the cutoff .* is far too large for cell\[0\]: its periodic images "
                                         r"would overflow the int32 lattice shifts"):
        radius_graph(pos, cutoff, cell=cell, pbc=torch.tensor(pbc, device=device), **kwargs)


def test_clustered_atoms_do_not_keep_edges_beyond_the_one_pass_limit(tmp_path):
    """6000 atoms within 1 Å of each other in a 60 Å cell: the uniform-density estimate (~1e5
    edges) picks the one-pass search, which kept every edge up to max_edges in every thread's
    chunk (here ~1 GB each). It now gives up at 2^24 kept edges and counts instead."""
    script = tmp_path / "clustered.py"
    script.write_text(
        "import resource, re, torch\n"
        "from jmp_ext.ops import radius_graph\n"
        "torch.set_num_threads(2)\n"
        "pos = torch.rand(6000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
        "cell = 60.0 * torch.eye(3, dtype=torch.float64)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "try:\n"
        "    radius_graph(pos, 6.0, cell=cell, max_edges=2**25)\n"
        "except ValueError as e:\n"
        "    print(re.search(r'would have (\\d+) edges', str(e)).group(1))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    import subprocess
    import sys

    before, edges, after = map(int, subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                                   check=True).stdout.split())
    assert edges == 6000 * 5999  # every pair, counted exactly
    assert after - before < 800, f"peak RSS grew by {after - before} MB"  # 2^24 kept edges: 512 MB


# ---- CUDA against CPU (run on a GPU machine; skipped here) ----


def _assert_same_graph(cuda_out, cpu_out):
    # Both builds compute distances without fused multiply-adds (CMakeLists.txt), so they agree
    # to the bit, and so do the order (by distance bits at equal distance shells) and the cap.
    for cuda, cpu in zip(cuda_out, cpu_out):
        assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(8))
def test_cuda_matches_cpu_on_random_batches(seed, dtype):
    systems, cutoff = _random_batch(seed)
    pos, natoms, cell, pbc = _batch_tensors(systems, dtype)
    for kwargs in ({}, {"max_neighbors": 3}, {"max_neighbors": 2, "degeneracy_tolerance": 0.3}):
        cpu = radius_graph(pos, cutoff, natoms=natoms, cell=cell, pbc=pbc, **kwargs)
        cuda = radius_graph(
            pos.cuda(), cutoff, natoms=natoms.cuda(), cell=cell.cuda(), pbc=pbc.cuda(), **kwargs
        )
        assert cuda[0].is_cuda and cuda[2].dtype == dtype
        _assert_same_graph(cuda, cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("cutoff, k", [(6.0, None), (12.0, 30), (6.0, 10)])
def test_cuda_matches_cpu_on_bulk_and_tiny_cells(cutoff, k):
    """Perfect primitive cells put many images at one distance: the order among them (and what a
    cap keeps) follows the last bits, which a fused multiply-add would change (bcc Fe, diamond Si)."""
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((5, 5, 5))
    big.rattle(0.05, seed=0)
    crystals = [big, bulk("Cu", "fcc", a=3.61), bulk("Fe", "bcc", a=2.87), bulk("Si", "diamond", a=5.43)]
    pos = torch.tensor(np.concatenate([c.positions for c in crystals]))
    cell = torch.tensor(np.stack([c.cell.array for c in crystals]))
    natoms = [len(c) for c in crystals]
    cpu = radius_graph(pos, cutoff, natoms=natoms, cell=cell, max_neighbors=k)
    cuda = radius_graph(pos.cuda(), cutoff, natoms=natoms, cell=cell.cuda(), max_neighbors=k)
    _assert_same_graph(cuda, cpu)


@pytest.mark.cuda
def test_cuda_empty_inputs_and_errors():
    out = radius_graph(torch.zeros(0, 3, device="cuda"), 3.0)
    assert out[0].shape == (2, 0) and out[0].is_cuda
    pos, cell = _one_system()
    bad = pos.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"pos\[2\] is not finite"):
        radius_graph(bad.cuda(), 3.0, cell=cell.cuda())
    with pytest.raises(ValueError, match="singular or degenerate"):
        radius_graph(pos.cuda(), 3.0, cell=torch.zeros(3, 3, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="more than max_edges = 10"):
        radius_graph(pos.cuda(), 5.0, cell=cell.cuda(), max_edges=10)
