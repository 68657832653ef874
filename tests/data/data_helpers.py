"""Random structures for data tests."""

import numpy as np


def random_entry(rng: np.random.Generator, natoms: int | None = None, periodic: bool = True,
                 stress: bool = False, elements=(1, 6, 8, 29, 78)) -> dict:
    """One structure with every standard field and random labels (float64)."""
    n = int(natoms or rng.integers(1, 12))
    entry = {
        "pos": rng.normal(size=(n, 3)) * 3,
        "atomic_numbers": rng.choice(elements, size=n).astype(np.int64),
        "cell": np.diag(rng.uniform(5, 10, 3)) if periodic else np.zeros((3, 3)),
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
