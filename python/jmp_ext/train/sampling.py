"""The share of a global batch each DDP rank trains on.

The global batches come from jmp_ext.data's TemperatureSampler + AtomBalancedBatchSampler built
for one process (so they do not depend on the number of ranks); every rank then takes its part of
each global batch, split by atom count the way JMP's BalancedBatchSampler does. A 2-rank step
therefore sees exactly the structures of a 1-rank step. (A rank left without a structure, by a
global batch of fewer structures than ranks, trains on a stand-in that counts for nothing:
is_stand_in, and Trainer.train_step.)
"""

from __future__ import annotations

import numpy as np


def split_across_ranks(batch: list[int], natoms: np.ndarray, rank: int, world_size: int) -> list[int]:
    """This rank's structures of `batch` (indices into natoms): greedy longest-processing-time
    split by atom count, every rank getting at least one structure while there are enough
    (ties -> lower rank); ranks beyond len(batch) get none."""
    if world_size == 1:
        return batch
    sizes = [int(natoms[i]) for i in batch]
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted(range(len(batch)), key=lambda k: (-sizes[k], k)):
        r = min(range(world_size), key=lambda r: (bool(share[r]), load[r], r))  # empty ranks first
        share[r].append(k)
        load[r] += sizes[k]
    return [batch[k] for k in sorted(share[rank])]


def is_stand_in(batch: list[int], rank: int) -> bool:
    """Whether split_across_ranks leaves `rank` without a structure of the global `batch` (the
    first len(batch) ranks get one each): the rank then trains a stand-in, the batch's smallest
    structure, whose loss counts zero."""
    return len(batch) <= rank
