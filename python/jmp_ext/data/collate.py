"""Collation of structures into one flat batch (atoms concatenated, per-structure fields stacked)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from jmp_ext.data.format import ATOM_FIELDS


def collate(entries: Sequence[dict[str, torch.Tensor]], dtype: torch.dtype | None = None
            ) -> dict[str, torch.Tensor]:
    """Batch B structures (dicts from LmdbDataset) into flat tensors.

    Per-atom fields (pos [N,3], atomic_numbers [N], tags [N], fixed [N], forces [N,3]) are
    concatenated over the N = sum(natoms) atoms; per-structure fields are stacked (cell [B,3,3],
    pbc [B,3], energy [B], stress [B,3,3], properties [B] or [B,k]). Added: natoms [B] int64 and
    batch [N] int64, the structure index of every atom. Floating fields are cast to `dtype`
    (default torch.get_default_dtype()); integer and bool fields keep theirs. Only keys present
    in every entry are collated.
    """
    if len(entries) == 0:
        raise ValueError("collate needs at least one entry")
    dtype = dtype or torch.get_default_dtype()
    keys = [key for key in entries[0] if all(key in entry for entry in entries[1:])]
    natoms = np.array([entry["atomic_numbers"].shape[0] for entry in entries], dtype=np.int64)
    # numpy: torch.repeat_interleave on CPU costs ~10 ms here, most of a batch's collation.
    batch = {"natoms": torch.from_numpy(natoms),
             "batch": torch.from_numpy(np.repeat(np.arange(len(entries)), natoms))}
    for key in keys:
        tensors = [entry[key] for entry in entries]
        if key in ATOM_FIELDS:
            value = torch.cat(tensors)
        else:
            try:
                value = torch.stack(tensors)
            except RuntimeError:
                shapes = sorted({tuple(t.shape) for t in tensors})
                raise ValueError(f"collate: field {key!r} has different shapes across the batch "
                                 f"{shapes}") from None
        batch[key] = value.to(dtype) if value.is_floating_point() else value
    return batch
