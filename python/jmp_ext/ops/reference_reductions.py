"""Pure-torch twins of jmp_ext.ops.reductions, the test oracle (slow, simple, obviously right).

Same signatures and semantics: empty segments give 0, max of a segment is torch's amax.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _segment_ids(ptr: Tensor) -> Tensor:
    """The segment of every row: [E] int64 from a CSR pointer [S+1]."""
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), ptr.diff())


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    out = src.new_zeros((dim_size,) + src.shape[1:], dtype=torch.float64)
    return out.index_add_(0, index, src.double()).to(src.dtype)


def scatter_mean(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    counts = torch.bincount(index, minlength=dim_size).clamp(min=1)
    counts = counts.reshape((dim_size,) + (1,) * (src.dim() - 1))
    return (scatter_sum(src.double(), index, dim_size) / counts).to(src.dtype)


def segment_sum(src: Tensor, ptr: Tensor) -> Tensor:
    return scatter_sum(src, _segment_ids(ptr), ptr.numel() - 1)


def segment_mean(src: Tensor, ptr: Tensor) -> Tensor:
    return scatter_mean(src, _segment_ids(ptr), ptr.numel() - 1)


def segment_max(src: Tensor, ptr: Tensor) -> Tensor:
    index = _segment_ids(ptr).reshape((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    out = src.new_zeros((ptr.numel() - 1,) + src.shape[1:])
    return out.scatter_reduce(0, index, src, "amax", include_self=False)


def gather(src: Tensor, index: Tensor) -> Tensor:
    return src[index]


def ragged_to_padded(x: Tensor, row: Tensor, col: Tensor, num_rows: int, num_cols: int) -> Tensor:
    out = x.new_zeros((num_rows, num_cols) + x.shape[1:])
    out[row, col] = x
    return out


def padded_to_ragged(padded: Tensor, row: Tensor, col: Tensor) -> Tensor:
    return padded[row, col]
