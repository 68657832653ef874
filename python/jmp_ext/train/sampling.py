"""Which structures make each step's batch: temperature sampling over datasets, batches capped by
structures and atoms, and an atom-balanced split of every global batch across DDP ranks.

Everything is a pure function of (seed, epoch), identical on every rank, so a run resumes
mid-epoch by recomputing the epoch's batches and skipping the ones already done, and a 2-rank run
sees exactly the global batches of a 1-rank run.
"""

from __future__ import annotations

import numpy as np


def temperature_counts(sizes: list[int], temperature: float) -> list[int]:
    """Entries drawn from each dataset per epoch: p_i ∝ N_i^(1/T); the largest dataset is used once
    (JMP's expanded datasets: smaller ones are repeated up to their share)."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if (sizes_arr <= 0).any():
        raise ValueError(f"every dataset needs at least one entry, got sizes {sizes}")
    p = sizes_arr ** (1.0 / temperature)
    p /= p.sum()
    largest = int(np.argmax(sizes_arr / p))  # the dataset whose share needs the fewest total draws
    total = sizes_arr[largest] / p[largest]
    return [int(round(total * pi)) for pi in p]


class TemperatureBatches:
    """Global batches of (dataset, index) pairs for one epoch, split across ranks by atom count.

    natoms: per dataset, int array [N_i] of atom counts (from metadata). A batch closes when it
    has batch_size structures or the next structure would exceed max_atoms (0 = no cap)."""

    def __init__(self, natoms: list[np.ndarray], temperature: float, batch_size: int, max_atoms: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < world_size:
            raise ValueError(f"the global batch ({batch_size} structures) must be at least the number of ranks ({world_size})")
        too_big = [(d, int(n.max())) for d, n in enumerate(natoms) if max_atoms and len(n) and n.max() > max_atoms]
        if too_big:
            raise ValueError(f"data.max_atoms={max_atoms} is smaller than a structure of dataset {too_big[0][0]} "
                             f"({too_big[0][1]} atoms)")
        self.natoms = [np.asarray(n, dtype=np.int64) for n in natoms]
        self.counts = temperature_counts([len(n) for n in natoms], temperature)
        self.batch_size, self.max_atoms = batch_size, max_atoms
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._cache: tuple[int, list] | None = None

    def global_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        items = []
        for d, (n, count) in enumerate(zip(self.natoms, self.counts)):
            reps = -(-count // len(n))
            idx = np.concatenate([rng.permutation(len(n)) for _ in range(reps)])[:count]
            items.extend((d, int(i)) for i in idx)
        order = rng.permutation(len(items))
        batches, current, atoms = [], [], 0
        for k in order:
            d, i = items[k]
            n = int(self.natoms[d][i])
            if current and (len(current) == self.batch_size or (self.max_atoms and atoms + n > self.max_atoms)):
                batches.append(current)
                current, atoms = [], 0
            current.append((d, i))
            atoms += n
        if len(current) >= self.world_size:
            batches.append(current)
        batches = [b for b in batches if len(b) >= self.world_size]
        self._cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        """Steps per epoch (the batch count of epoch 0; later epochs differ by at most a few)."""
        return len(self.global_batches(0))

    def local(self, batch: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """This rank's share: greedy longest-processing-time split by atom count (ties -> lower rank)."""
        if self.world_size == 1:
            return batch
        sizes = [int(self.natoms[d][i]) for d, i in batch]
        load = [0] * self.world_size
        share: list[list[int]] = [[] for _ in range(self.world_size)]
        for k in sorted(range(len(batch)), key=lambda k: (-sizes[k], k)):
            r = min(range(self.world_size), key=lambda r: (bool(share[r]), load[r], r))  # empty ranks first
            share[r].append(k)
            load[r] += sizes[k]
        return [batch[k] for k in sorted(share[self.rank])]
