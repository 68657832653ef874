"""Triplets, mixed triplets and quadruplets: jmp_ext's kernels against the pure-torch twin.

Run (1 and 2 threads are parameters of every benchmark):

    PYTHONPATH=python pytest bench/bench_interaction_indices.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-json=bench/.benchmarks/indices.json

Batches (built once per session, not timed):
  - slabs: 32 OC20-like Pt(111) 4x4x4 slabs + CO (66 atoms each, rattled), 12 A cutoff, top-k per
    target k = 30 (main, then symmetrised as JMP does), 20 (a2ee2a), 8 (qint, edges touching
    surface or adsorbate atoms only, tags 1/2).
  - molecules: 64 small molecules of ASE's g2 set (non-periodic, tag 2), same cutoffs and k.
The timed "all" step is what GemNet-OC does per batch, and what the original's 0.98 s covers:
symmetrising the main graph (jmp_ext.graphs.symmetrize), then triplets of main, the two mixed
triplets (a2e, e2a) and the quadruplets. jmp_ext runs with int64 outputs (the API's default) and
with int32 ones (what jmp_ext.graphs builds for the model). The twin
(jmp_ext.ops.reference_interaction_indices) is the best pure-torch formulation of the same
algorithm; both produce identical outputs (checked here). The write floor allocates and fills
tensors of the outputs' sizes and dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.collections import g2
from ase.neighborlist import neighbor_list

import jmp_ext.ops as ops
from jmp_ext.graphs import symmetrize
from jmp_ext.ops import reference_interaction_indices as twin

CUTOFF = 12.0
K_MAIN, K_A2EE2A, K_QINT = 30, 20, 8
NUM_SLABS, NUM_MOLECULES = 32, 64


# ---- batch construction (setup, not timed) ----


def _slab(rng: np.random.Generator) -> Atoms:
    """Pt(111) 4x4x4 + CO on top, OC20 tags: 0 subsurface, 1 surface, 2 adsorbate."""
    slab = fcc111("Pt", size=(4, 4, 4), vacuum=10.0)
    layer = slab.get_tags()  # ASE: 1 = top layer ... 4 = bottom
    add_adsorbate(slab, molecule("CO"), 2.0, "ontop")
    tags = np.concatenate([np.where(layer <= 2, 1, 0), [2, 2]])
    slab.set_tags(tags)
    slab.pbc = True
    slab.rattle(0.05, seed=int(rng.integers(1 << 31)))
    return slab


def _molecules(rng: np.random.Generator) -> list[Atoms]:
    names = sorted(n for n in g2.names if len(g2[n]) >= 6)
    picked = rng.choice(names, NUM_MOLECULES)
    molecules = [g2[str(n)] for n in picked]
    for atoms in molecules:  # JMP tags molecules 2 (qint keeps them)
        atoms.set_tags(2)
    return molecules


def _top_k(source, target, distance, cell_offset, k):
    """Per target, the k nearest sources (ties by input order), as JMP's max-neighbour mask."""
    order = torch.sort(distance, stable=True).indices
    order = order[torch.sort(target[order], stable=True).indices]
    t_sorted = target[order]
    rank = torch.arange(len(order)) - torch.searchsorted(t_sorted, t_sorted)
    keep = order[rank < k]
    return source[keep], target[keep], distance[keep], cell_offset[keep]


def _graph(s, t, off):
    return {"edge_index": torch.stack([s, t]), "cell_offset": off.to(torch.int32)}


def _batch(structures: list[Atoms]) -> tuple[int, dict]:
    """(num_atoms, {"main", "a2ee2a", "qint"}) graphs of a batch, atoms numbered consecutively."""
    parts = {name: [] for name in ("main", "a2ee2a", "qint")}
    first = 0
    for atoms in structures:
        i, j, d, shift = neighbor_list("ijdS", atoms, CUTOFF)
        # ASE: j is the neighbour (source) of centre i (target), at pos[j] + shift @ cell.
        s, t = torch.from_numpy(j) + first, torch.from_numpy(i) + first
        d, shift = torch.from_numpy(d), torch.from_numpy(shift)
        main = _top_k(s, t, d, shift, K_MAIN)
        parts["main"].append(main)
        parts["a2ee2a"].append(_top_k(*main, K_A2EE2A))
        tags = torch.from_numpy(atoms.get_tags())
        qs, qt, qd, qoff = _top_k(*main, K_QINT)
        touches = (tags[qs - first] > 0) | (tags[qt - first] > 0)
        parts["qint"].append((qs[touches], qt[touches], qd[touches], qoff[touches]))
        first += len(atoms)
    graphs = {}
    for name, chunks in parts.items():
        s, t, _, off = (torch.cat(x) for x in zip(*chunks))
        graphs[name] = _graph(s, t, off)
    graphs["main_one_way"] = graphs["main"]
    graphs["main"] = symmetrize(graphs["main"])[0]
    return first, graphs


@pytest.fixture(scope="module", params=["slabs", "molecules"])
def batch(request):
    rng = np.random.default_rng(0)
    if request.param == "slabs":
        structures = [_slab(rng) for _ in range(NUM_SLABS)]
    else:
        structures = _molecules(rng)
    num_atoms, graphs = _batch(structures)
    return request.param, num_atoms, graphs


# ---- the timed steps ----


def _all(lib, n, g, **index):
    """GemNet-OC's index work per batch: symmetrise main, then triplets, a2e and e2a mixed
    triplets, quadruplets."""
    main = symmetrize(g["main_one_way"])[0]
    return (lib.triplets(main, n, **index), lib.mixed_triplets(g["a2ee2a"], main, n, **index),
            lib.mixed_triplets(main, g["a2ee2a"], n, **index), lib.quadruplets(main, g["qint"], n, **index))


STEPS = {
    "triplets": lambda lib, n, g, **index: lib.triplets(g["main"], n, **index),
    "mixed_triplets": lambda lib, n, g, **index: (lib.mixed_triplets(g["a2ee2a"], g["main"], n, **index),
                                                  lib.mixed_triplets(g["main"], g["a2ee2a"], n, **index)),
    "quadruplets": lambda lib, n, g, **index: lib.quadruplets(g["main"], g["qint"], n, **index),
    "all": _all,
}


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    items = result.values() if isinstance(result, dict) else result
    return [t for item in items for t in _flatten(item)]


def _write_floor(sizes: list[int], dtype: torch.dtype):
    """Allocate and fill outputs of these sizes: the memory-bound floor of any implementation
    (every op allocates its outputs)."""
    return [torch.empty(n, dtype=dtype).fill_(1) for n in sizes]


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
@pytest.mark.parametrize("impl", ["jmp_ext", "torch_twin", "write_floor"])
@pytest.mark.parametrize("step", list(STEPS))
def test_indices(benchmark, batch, threads, step, impl, index_dtype):
    name, num_atoms, graphs = batch
    if impl == "torch_twin" and index_dtype == "int32":
        pytest.skip("the twin writes int64, as the original")
    index_dtype = getattr(torch, index_dtype)
    benchmark.group = f"indices {name} {step} {threads}thr"
    fn = STEPS[step]
    index = {"index_dtype": index_dtype}
    if impl == "write_floor":
        sizes = [t.numel() for t in _flatten(fn(ops, num_atoms, graphs, **index))]
        benchmark.pedantic(_write_floor, args=(sizes, index_dtype), rounds=3, warmup_rounds=1)
        benchmark.extra_info["output_bytes"] = index_dtype.itemsize * sum(sizes)
        return
    lib, kwargs = (ops, index) if impl == "jmp_ext" else (twin, {})
    result = benchmark.pedantic(fn, args=(lib, num_atoms, graphs), kwargs=kwargs, rounds=3, warmup_rounds=1)
    if impl == "torch_twin":  # the two compute the same indices, in the same order
        for a, b in zip(_flatten(result), _flatten(fn(ops, num_atoms, graphs)), strict=True):
            assert torch.equal(a, b)
    sizes = {"edges_main": graphs["main"]["edge_index"].shape[1],
             "edges_a2ee2a": graphs["a2ee2a"]["edge_index"].shape[1],
             "edges_qint": graphs["qint"]["edge_index"].shape[1], "atoms": num_atoms}
    if step == "all":
        sizes.update(triplets=len(result[0]["out"]), quadruplets=len(result[3]["out"]))
    benchmark.extra_info.update(sizes)
