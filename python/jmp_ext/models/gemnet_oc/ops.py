"""The two data-movement primitives of GemNet-OC's hot loop, over jmp_ext's reductions.

to_padded: ragged rows -> a zero-padded [rows, Kmax, ...] block (GemNet-OC's "efficient"
    bilinear layers contract over the padded axis with a batched matmul).
scatter_sum: sum of edge rows onto their target atoms.
"""

from __future__ import annotations

import torch


def to_padded(x: torch.Tensor, row: torch.Tensor, col: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x [T, ...] -> [num_rows, Kmax, ...] with out[row[t], col[t]] = x[t], zeros elsewhere.

    Kmax = max(col) + 1 (0 when T = 0); (row, col) pairs must be unique (col = rank in row)."""
    num_cols = int(col.max()) + 1 if col.numel() else 0
    out = x.new_zeros((num_rows, num_cols) + tuple(x.shape[1:]))
    return out.index_put((row, col), x)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """src [E, F] -> [dim_size, F], out[i] = sum of src[e] with index[e] == i."""
    return src.new_zeros((dim_size,) + tuple(src.shape[1:])).index_add(0, index, src)
