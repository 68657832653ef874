"""The share of a global batch each DDP rank trains on.

The global batches come from jmp_ext.data's TemperatureSampler + AtomBalancedBatchSampler built
for one process (so they do not depend on the number of ranks); every rank then takes its part of
each global batch, split by atom count the way JMP's BalancedBatchSampler does. A 2-rank step
therefore sees exactly the structures of a 1-rank step.
"""

from __future__ import annotations

import numpy as np


def split_across_ranks(batch: list[int], natoms: np.ndarray, rank: int, world_size: int) -> list[int]:
    """This rank's structures of `batch` (indices into natoms): greedy longest-processing-time
    split by atom count, every rank getting at least one structure (ties -> lower rank).
    Needs len(batch) >= world_size."""
    if world_size == 1:
        return batch
    if len(batch) < world_size:
        raise ValueError(f"a batch of {len(batch)} structures cannot be split over {world_size} ranks")
    sizes = [int(natoms[i]) for i in batch]
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted(range(len(batch)), key=lambda k: (-sizes[k], k)):
        r = min(range(world_size), key=lambda r: (bool(share[r]), load[r], r))  # empty ranks first
        share[r].append(k)
        load[r] += sizes[k]
    return [batch[k] for k in sorted(share[rank])]
