"""Samplers: JMP's temperature sampling over datasets and atom-balanced, DDP-aware batching.

Both are deterministic functions of (seed, epoch) and resumable mid-epoch through
state_dict()/load_state_dict(). Typical pretraining use:

    data = MultiDataset([LmdbDataset(p) for p in paths])
    order = TemperatureSampler(data.sizes, temperature=2.0, seed=0)
    batches = AtomBalancedBatchSampler(data.natoms, max_atoms=512, sampler=order,
                                       rank=rank, world_size=world_size, seed=0)
    loader = DataLoader(data, batch_sampler=batches, collate_fn=collate, num_workers=4)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class TemperatureSampler(Sampler[int]):
    """Indices into the concatenation of several datasets, dataset i drawn with probability
    p_i ∝ N_i^(1/T) (JMP: T = 2 for pretraining, T = 1 for validation, i.e. proportional).

    Each epoch takes round(p_i * num_samples) entries of dataset i: a fresh permutation of it,
    repeated when it needs more entries than it has (small datasets are upsampled), cut when it
    needs fewer (to none when p_i * num_samples rounds to 0). The combined list is then
    shuffled. By default an epoch is JMP's (its merged_dataset): the largest dataset once, the
    others expanded to their ratios to it, so num_samples = max N_i / its p_i (sum N_i for T = 1).

    Args:
        sizes: N_i, the number of entries of every dataset, in concatenation order.
        temperature: T > 0.
        num_samples: entries per epoch (default: JMP's epoch, above).
        seed: base seed; epoch e uses (seed, e).
    """

    def __init__(self, sizes: Sequence[int], temperature: float = 2.0,
                 num_samples: int | None = None, seed: int = 0):
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes <= 0).any():
            raise ValueError(f"sizes must be positive dataset lengths, got {sizes.tolist()}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        weights = sizes.astype(np.float64) ** (1.0 / temperature)
        self.probabilities = weights / weights.sum()
        largest = int(np.argmax(sizes))
        self.num_samples = int(num_samples or round(sizes[largest] / self.probabilities[largest]))
        self.counts = np.round(self.probabilities * self.num_samples).astype(np.int64)
        if not self.counts.any():
            raise ValueError(f"num_samples={self.num_samples} rounds to no samples from any of the "
                             f"{len(sizes)} datasets; use at least {len(sizes)}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> np.ndarray:
        """The global indices of one epoch, in sampling order."""
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for size, offset, count in zip(self.sizes, self.offsets, self.counts):
            if count == 0:  # a small dataset's share of a small num_samples can round to 0
                continue
            # Fresh permutations, one per repeat, drawn in one call (a loop of permutation()
            # draws the same; it took seconds an epoch to upsample a dataset of a few entries).
            repeats = -(-count // size)
            local = rng.permuted(np.tile(np.arange(size), (repeats, 1)), axis=1).reshape(-1)[:count]
            parts.append(offset + local)
        merged = np.concatenate(parts)
        return merged[rng.permutation(len(merged))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch).tolist())

    def __len__(self) -> int:
        return int(self.counts.sum())


class AtomBalancedBatchSampler(Sampler[list[int]]):
    """Batches of indices with at most `max_atoms` atoms and/or `max_structures` structures,
    split over DDP ranks; yields the batches of this rank.

    Each epoch, the order (a seeded permutation, or the given `sampler`'s indices) is packed
    greedily into batches; a structure larger than max_atoms becomes a batch of its own. Batches
    are dealt round-robin to the ranks, and every rank gets the same number of batches (the
    list is padded by repeating its first batches, or cut with drop_last) so DDP never waits on
    a rank that ran out.

    Args:
        natoms: int [M], atom count of every entry (LmdbDataset.natoms).
        max_atoms, max_structures: caps per batch (at least one must be set).
        sampler: optional index sampler (e.g. TemperatureSampler) with set_epoch; default: a
            permutation of range(M) (or range(M) in order with shuffle=False).
        rank, world_size: this process's place in DDP.
        seed: base seed; epoch e uses (seed, e).

    Resuming: state_dict() holds the epoch and `position`, the number of batches this sampler
    has handed out this epoch. A DataLoader prefetches batches, so for an exact resume a trainer
    should save the number of batches it actually consumed as position.
    """

    def __init__(self, natoms: Sequence[int], *, max_atoms: int | None = None,
                 max_structures: int | None = None, sampler: Sampler[int] | None = None,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = False):
        if max_atoms is None and max_structures is None:
            raise ValueError("set max_atoms and/or max_structures")
        for name, cap in (("max_atoms", max_atoms), ("max_structures", max_structures)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be positive, got {cap}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.natoms = np.asarray(natoms, dtype=np.int64)
        if self.natoms.ndim != 1 or len(self.natoms) == 0:
            raise ValueError(f"natoms must be a non-empty 1-D array, got shape {self.natoms.shape}")
        self.max_atoms = max_atoms
        self.max_structures = max_structures
        self.sampler = sampler
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (a no-op for the current epoch, so a resumed position survives)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            order = np.fromiter(self.sampler, dtype=np.int64)
        elif self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.natoms))
        else:
            order = np.arange(len(self.natoms))
        batches = self._pack(order)
        if self.drop_last:
            batches = batches[:len(batches) - len(batches) % self.world_size]
        elif len(batches) % self.world_size:
            missing = self.world_size - len(batches) % self.world_size
            batches += [batches[k % len(batches)] for k in range(missing)]
        mine = batches[self.rank::self.world_size]
        self._cache = (epoch, mine)
        return mine

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        max_atoms = self.max_atoms or np.iinfo(np.int64).max
        max_structures = self.max_structures or len(order)
        batches, batch, atoms = [], [], 0
        for index, n in zip(order.tolist(), self.natoms[order].tolist()):
            if batch and (atoms + n > max_atoms or len(batch) == max_structures):
                batches.append(batch)
                batch, atoms = [], 0
            batch.append(index)
            atoms += n
        if batch:
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the saved sampler used seed {state['seed']}, this one {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
