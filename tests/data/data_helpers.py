"""Random structures for data tests."""

import numpy as np

from jmp_ext.data.format import MIN_PAIR_DISTANCE


def random_entry(rng: np.random.Generator, natoms: int | None = None, periodic: bool = True,
                 stress: bool = False, elements=(1, 6, 8, 29, 78)) -> dict:
    """One structure with every standard field and random labels (float64)."""
    n = int(natoms or rng.integers(1, 12))
    pos = rng.normal(size=(n, 3)) * 3
    atomic_numbers = rng.choice(elements, size=n).astype(np.int64)
    cell = np.diag(rng.uniform(5, 10, 3)) if periodic else np.zeros((3, 3))
    while _closest_pair(pos, cell.diagonal() if periodic else None) < MIN_PAIR_DISTANCE:  # (validation refuses them)
        pos = rng.normal(size=(n, 3)) * 3
    entry = {
        "pos": pos,
        "atomic_numbers": atomic_numbers,
        "cell": cell,
        "pbc": np.full(3, periodic),
        "tags": rng.integers(0, 3, n).astype(np.int64),
        "fixed": rng.random(n) < 0.3,
        "energy": np.float64(rng.normal() * 10),
        "forces": rng.normal(size=(n, 3)),
    }
    if stress:
        stress = rng.normal(size=(3, 3)) * 0.01
        entry["stress"] = (stress + stress.T) / 2
    return entry


def _closest_pair(pos: np.ndarray, box: np.ndarray | None) -> float:
    """The shortest distance between two atoms (minimum image in an orthorhombic box), inf for one atom."""
    diff = pos[:, None] - pos[None]
    if box is not None:
        diff -= box * np.round(diff / box)
    d = np.linalg.norm(diff, axis=-1)
    return float(d[~np.eye(len(pos), dtype=bool)].min()) if len(pos) > 1 else np.inf
