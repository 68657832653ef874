"""Scatter / segment reductions and GemNet-OC's ragged <-> padded copies, as custom torch ops.

Public functions (shapes: E source rows, S segments, `...` any trailing feature dims):

    segment_sum / segment_mean / segment_max(src [E, ...], ptr [S+1] int64) -> [S, ...]
    scatter_sum / scatter_mean(src [E, ...], index [E] int64/int32, dim_size, *, deterministic=True)
        -> [dim_size, ...]
    gather(src [S, ...], index [E] int64/int32) -> [E, ...]  (src[index], the adjoint of scatter_sum)
    ragged_to_padded(x [T, ...], row [T], col [T], num_rows, num_cols) -> [num_rows, num_cols, ...]
    padded_to_ragged(padded [R, C, ...], row [T], col [T]) -> [T, ...]
    segment_outer(x [E, R], y [E, C], ptr [S+1], y_index=None) -> [S, R, C]  (sum of x[e] ⊗ y[e]
        per segment; with y_index [E], y is [N, C] and row e is y[y_index[e]])
    segment_contract(x [S, R, C], y [E, C], ptr [S+1], y_index=None, out_index=None, num_out_rows=None)
        -> [E, R]  (x[segment of e] @ y[e]; with y_index [E], y is [N, C] and row e is
        y[y_index[e]]; with out_index [E], row e is summed into row out_index[e] of [num_out_rows, R])

src is float32, float64 or bfloat16 (bf16 accumulates in float32). CSR pointers are int64; the
row indices of gather, scatter_*, the padded copies' (row, col) and the bilinear ops' y_index /
out_index are int64 or int32 (the model's interaction indices are int32, see jmp_ext.graphs). Empty
segments give 0. Results are bitwise deterministic on the CPU for any thread count, and on CUDA
unless scatter_* is called with deterministic=False (one atomicAdd per element: faster, but the
summation order varies). segment_max sends the gradient to the first maximal element of each
segment (the first NaN if there is one).

Every op is differentiable to any order: each backward is built from the ops of this file (the
adjoint of a segment sum is a segment broadcast, of a scatter a gather, of ragged_to_padded
padded_to_ragged, and back; segment_outer and segment_contract are each other's adjoints), so force training can differentiate through them twice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jmp_ext.ops._lib import (_C, DTYPE_CODES, contiguous, float32_under_autocast, index_arg, launch, num_threads,
                              ptr)

_REDUCE_CODES = {"sum": 0, "mean": 1, "max": 2}
_PADDED_DIRECTIONS = {"ragged_to_padded": 0, "padded_to_ragged": 1}
_BILINEAR_KINDS = {"segment_outer": 0, "segment_contract": 1}


# ---- checks on metadata (shared by the real and the fake kernels) ----


def _check_src(name: str, src: Tensor, dim: int = 2) -> None:
    if src.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float64 or bfloat16, got {src.dtype}")
    if src.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D here, got shape {tuple(src.shape)}")


def _check_index(name: str, index: Tensor, length: int | None, device: torch.device) -> None:
    """A 1-D int64 or int32 index (the kernels read either, csrc/common/index_array.h)."""
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if length is not None and index.shape[0] != length:
        raise ValueError(f"{name} has {index.shape[0]} entries but the source has {length} rows")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the source is on {device}")


def _check_ptr(ptr_: Tensor, device: torch.device) -> None:
    if ptr_.dtype != torch.int64:  # the kernels read CSR pointers as int64 only
        raise TypeError(f"ptr must be int64, got {ptr_.dtype}")
    _check_index("ptr", ptr_, None, device)
    if ptr_.shape[0] == 0:
        raise ValueError("ptr must have S + 1 >= 1 entries (ptr[0] = 0, ptr[S] = number of rows)")


def _check_size(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# ---- the custom ops, on 2-D [rows, F] tensors ----


def _segment_kernel(src: Tensor, ptr_: Tensor, perm: Tensor | None, reduce: str) -> tuple[Tensor, Tensor | None]:
    """Reduces src rows (taken in the order perm, or 0..E-1) over the CSR segments of ptr_."""
    src, ptr_ = src.contiguous(), ptr_.contiguous()  # (kept alive while the kernel runs)
    num_segments, features = ptr_.shape[0] - 1, src.shape[1]
    out = src.new_empty(num_segments, features)
    arg = src.new_empty(num_segments, features, dtype=torch.int64) if reduce == "max" else None
    launch("segment_reduce", src.device, ptr(src), ptr(ptr_), ptr(perm), ptr(out),
            ptr(arg), src.shape[0], num_segments, features, DTYPE_CODES[src.dtype],
            _REDUCE_CODES[reduce])
    return out, arg


@torch.library.custom_op("jmp_ext::segment_reduce", mutates_args=())
def _segment_reduce(src: Tensor, ptr_: Tensor, reduce: str) -> Tensor:
    """Sum or mean of src [E, F] over segments ptr_ [S+1] -> [S, F]."""
    _check_segment(src, ptr_, reduce)
    return _segment_kernel(src, ptr_, None, reduce)[0]


def _check_segment(src: Tensor, ptr_: Tensor, reduce: str) -> None:
    _check_src("src", src)
    _check_ptr(ptr_, src.device)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


@_segment_reduce.register_fake
def _(src, ptr_, reduce):
    _check_segment(src, ptr_, reduce)
    return src.new_empty(ptr_.shape[0] - 1, src.shape[1])


@torch.library.custom_op("jmp_ext::segment_max", mutates_args=())
def _segment_max(src: Tensor, ptr_: Tensor) -> tuple[Tensor, Tensor]:
    """Max of src [E, F] over segments ptr_ [S+1] -> (values [S, F], argmax [S, F] int64, E if empty)."""
    _check_src("src", src)
    _check_ptr(ptr_, src.device)
    return _segment_kernel(src, ptr_, None, "max")


@_segment_max.register_fake
def _(src, ptr_):
    _check_src("src", src)
    _check_ptr(ptr_, src.device)
    shape = (ptr_.shape[0] - 1, src.shape[1])
    return src.new_empty(shape), src.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("jmp_ext::segment_broadcast", mutates_args=())
def _segment_broadcast(src: Tensor, ptr_: Tensor, num_rows: int) -> Tensor:
    """out[e] = src[s] for e in [ptr_[s], ptr_[s+1]): [S, F] -> [num_rows, F] (adjoint of sum)."""
    _check_broadcast(src, ptr_, num_rows)
    src, ptr_ = src.contiguous(), ptr_.contiguous()
    out = src.new_empty(num_rows, src.shape[1])
    launch("segment_broadcast", src.device, ptr(src), ptr(out), src.shape[1], src.element_size(),
            ptr(ptr_), ptr_.shape[0] - 1, num_rows)
    return out


def _check_broadcast(src: Tensor, ptr_: Tensor, num_rows: int) -> None:
    _check_src("src", src)
    _check_ptr(ptr_, src.device)
    _check_size("num_rows", num_rows)
    if src.shape[0] != ptr_.shape[0] - 1:
        raise ValueError(f"src has {src.shape[0]} rows but ptr describes {ptr_.shape[0] - 1} segments")


@_segment_broadcast.register_fake
def _(src, ptr_, num_rows):
    _check_broadcast(src, ptr_, num_rows)
    return src.new_empty(num_rows, src.shape[1])


def _index_to_csr_cuda(index: Tensor, dim_size: int) -> tuple[Tensor, Tensor]:
    """ptr [dim_size+1] and the stable permutation perm [E] that sorts a CUDA index, with torch's
    stable sort; the range check costs one host sync."""
    bad = (index < 0) | (index >= dim_size)
    if bad.any():  # the CPU kernel's message for the first bad entry
        e = int(bad.nonzero()[0])
        value = int(index[e])
        problem = "is negative" if value < 0 else f"is out of range for dim_size = {dim_size}"
        raise ValueError(f"index[{e}] = {value} {problem}")
    sorted_index, perm = torch.sort(index, stable=True)
    bounds = torch.arange(dim_size + 1, device=index.device)  # (int64: an int32 index's dim_size may be 2**31 - 1)
    return torch.searchsorted(sorted_index, bounds), perm


@torch.library.custom_op("jmp_ext::scatter_reduce", mutates_args=())
def _scatter_reduce(src: Tensor, index: Tensor, dim_size: int, reduce: str, deterministic: bool) -> Tensor:
    """Sum or mean of src [E, F] rows into dim_size rows by index [E] -> [dim_size, F]."""
    _check_scatter(src, index, dim_size, reduce)
    index = index.contiguous()
    atomic = src.is_cuda and not deterministic and not torch.are_deterministic_algorithms_enabled()
    src = src.contiguous()
    if not src.is_cuda:  # rows reduced in ascending e: the order of the sorted CUDA path
        out = src.new_empty(dim_size, src.shape[1])
        _C.scatter_reduce_cpu(ptr(src), *index_arg(index), ptr(out), src.shape[0], dim_size,
                              src.shape[1], DTYPE_CODES[src.dtype], _REDUCE_CODES[reduce],
                              num_threads())
        return out
    if not atomic:
        ptr_, perm = _index_to_csr_cuda(index, dim_size)
        return _segment_kernel(src, ptr_, perm, reduce)[0]
    acc = torch.zeros(dim_size, src.shape[1], device=src.device,
                      dtype=torch.float64 if src.dtype == torch.float64 else torch.float32)
    launch("scatter_add_atomic_cuda", src.device, ptr(src), DTYPE_CODES[src.dtype], *index_arg(index),
            src.shape[0], src.shape[1], dim_size, ptr(acc))
    if reduce == "mean":
        acc /= _counts(index, dim_size, acc.dtype)
    return acc.to(src.dtype)


def _check_scatter(src: Tensor, index: Tensor, dim_size: int, reduce: str) -> None:
    _check_src("src", src)
    _check_index("index", index, src.shape[0], src.device)
    _check_size("dim_size", dim_size)
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


@_scatter_reduce.register_fake
def _(src, index, dim_size, reduce, deterministic):
    _check_scatter(src, index, dim_size, reduce)
    return src.new_empty(dim_size, src.shape[1])


@torch.library.custom_op("jmp_ext::gather", mutates_args=())
def _gather(src: Tensor, index: Tensor) -> Tensor:
    """out[i] = src[index[i]]: [S, F] -> [len(index), F] (adjoint of scatter sum)."""
    _check_gather(src, index)
    src, index = src.contiguous(), index.contiguous()
    out = src.new_empty(index.shape[0], src.shape[1])
    launch("gather", src.device, ptr(src), ptr(out), src.shape[1], src.element_size(), *index_arg(index),
            index.shape[0], src.shape[0])
    return out


def _check_gather(src: Tensor, index: Tensor) -> None:
    _check_src("src", src)
    _check_index("index", index, None, src.device)


@_gather.register_fake
def _(src, index):
    _check_gather(src, index)
    return src.new_empty(index.shape[0], src.shape[1])


def _padded_copy(direction: str, src: Tensor, row: Tensor, col: Tensor, num_rows: int, num_cols: int,
                 out: Tensor) -> Tensor:
    src, row, col = src.contiguous(), row.contiguous(), col.contiguous()
    slots = torch.empty(num_rows * num_cols, dtype=torch.int64, device=src.device)
    launch("padded_copy", src.device, _PADDED_DIRECTIONS[direction], ptr(src), ptr(out), out.shape[-1],
           src.element_size(), *index_arg(row), *index_arg(col), row.shape[0], num_rows, num_cols, ptr(slots))
    return out


def _check_padded(x: Tensor, row: Tensor, col: Tensor, num_rows: int, num_cols: int) -> None:
    _check_index("row", row, None, x.device)
    _check_index("col", col, row.shape[0], x.device)
    _check_size("num_rows", num_rows)
    _check_size("num_cols", num_cols)


@torch.library.custom_op("jmp_ext::ragged_to_padded", mutates_args=())
def _ragged_to_padded(x: Tensor, row: Tensor, col: Tensor, num_rows: int, num_cols: int) -> Tensor:
    """out[row[t], col[t]] = x[t], zeros elsewhere: [T, F] -> [num_rows, num_cols, F]."""
    _check_ragged(x, row, col, num_rows, num_cols)
    out = x.new_empty(num_rows, num_cols, x.shape[1])
    return _padded_copy("ragged_to_padded", x, row, col, num_rows, num_cols, out)


def _check_ragged(x, row, col, num_rows, num_cols):
    _check_src("x", x)
    _check_padded(x, row, col, num_rows, num_cols)
    if x.shape[0] != row.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but row/col have {row.shape[0]} entries")


@_ragged_to_padded.register_fake
def _(x, row, col, num_rows, num_cols):
    _check_ragged(x, row, col, num_rows, num_cols)
    return x.new_empty(num_rows, num_cols, x.shape[1])


@torch.library.custom_op("jmp_ext::padded_to_ragged", mutates_args=())
def _padded_to_ragged(padded: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """out[t] = padded[row[t], col[t]]: [R, C, F] -> [T, F] (adjoint of ragged_to_padded)."""
    _check_src("padded", padded, dim=3)
    _check_padded(padded, row, col, padded.shape[0], padded.shape[1])
    out = padded.new_empty(row.shape[0], padded.shape[2])
    return _padded_copy("padded_to_ragged", padded, row, col, padded.shape[0], padded.shape[1], out)


@_padded_to_ragged.register_fake
def _(padded, row, col):
    _check_src("padded", padded, dim=3)
    _check_padded(padded, row, col, padded.shape[0], padded.shape[1])
    return padded.new_empty(row.shape[0], padded.shape[2])


def _check_bilinear(x: Tensor, y: Tensor, ptr_: Tensor, x_dim: int, y_index: Tensor | None = None,
                    out_index: Tensor | None = None) -> None:
    """x_dim 2: segment_outer's x [E, R]; 3: segment_contract's x [S, R, C]."""
    _check_src("x", x, x_dim)
    _check_src("y", y)
    _check_ptr(ptr_, x.device)
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) and y ({y.dtype}, {y.device}) must share dtype and device")
    if x_dim == 2:
        if y_index is not None:
            _check_index("y_index", y_index, x.shape[0], x.device)
        elif x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        return
    segments = ptr_.shape[0] - 1
    if x.shape[0] != segments or x.shape[2] != y.shape[1]:
        raise ValueError(f"x must be [S={segments}, R, C={y.shape[1]}] for ptr and y, got shape {tuple(x.shape)}")
    if y_index is not None:
        _check_index("y_index", y_index, None, x.device)
    if out_index is not None:
        _check_index("out_index", out_index, y.shape[0], x.device)


def _bilinear_kernel(kind: str, x: Tensor, y: Tensor, ptr_: Tensor, out: Tensor, rows: int,
                     y_index: Tensor | None = None, out_index: Tensor | None = None) -> Tensor:
    cols = y.shape[1]
    # segment_contract reads its [S, R, C] blocks through the strides of R and C, so a transposed
    # block (the backward's grad.transpose(1, 2)) is used in place: torch's copy of one is slow.
    if not (x.dim() == 3 and x.stride(0) == rows * cols and x.stride()[1:] in ((cols, 1), (1, rows))):
        x = x.contiguous()
    x_stride_r, x_stride_c = x.stride()[1:] if x.dim() == 3 else (1, 1)
    x_address = x.data_ptr() if x.numel() else 0  # (ptr() asserts a contiguous buffer)
    y, ptr_, y_index, out_index = contiguous(y, ptr_, y_index, out_index)  # (kept alive while the kernel runs)
    if kind == "segment_outer":
        num_src = x.shape[0]
    else:
        num_src = y.shape[0] if y_index is None else y_index.shape[0]
    launch("segment_bilinear", x.device, _BILINEAR_KINDS[kind], x_address, ptr(y), ptr(ptr_), ptr(out), num_src, ptr_.shape[0] - 1, rows,
           cols, x_stride_r, x_stride_c, *index_arg(y_index), y.shape[0], *index_arg(out_index), out.shape[0],
           DTYPE_CODES[x.dtype])
    return out


@torch.library.custom_op("jmp_ext::segment_outer", mutates_args=())
def _segment_outer(x: Tensor, y: Tensor, ptr_: Tensor) -> Tensor:
    """out[s] = sum over e in [ptr_[s], ptr_[s+1]) of outer(x[e], y[e]): x [E, R], y [E, C] -> [S, R, C]."""
    _check_bilinear(x, y, ptr_, 2)
    out = x.new_empty(ptr_.shape[0] - 1, x.shape[1], y.shape[1])
    return _bilinear_kernel("segment_outer", x, y, ptr_, out, x.shape[1])


@_segment_outer.register_fake
def _(x, y, ptr_):
    _check_bilinear(x, y, ptr_, 2)
    return x.new_empty(ptr_.shape[0] - 1, x.shape[1], y.shape[1])


@torch.library.custom_op("jmp_ext::segment_outer_gathered", mutates_args=())
def _segment_outer_gathered(x: Tensor, y: Tensor, y_index: Tensor, ptr_: Tensor) -> Tensor:
    """segment_outer(x, y[y_index], ptr_) without writing y[y_index]: x [E, R], y [N, C],
    y_index [E] -> [S, R, C]. On CUDA (no fused kernel yet) it gathers first."""
    _check_bilinear(x, y, ptr_, 2, y_index)
    if x.device.type != "cpu":
        return _segment_outer(x, _gather(y, y_index), ptr_)
    out = x.new_empty(ptr_.shape[0] - 1, x.shape[1], y.shape[1])
    return _bilinear_kernel("segment_outer", x, y, ptr_, out, x.shape[1], y_index)


@_segment_outer_gathered.register_fake
def _(x, y, y_index, ptr_):
    _check_bilinear(x, y, ptr_, 2, y_index)
    return x.new_empty(ptr_.shape[0] - 1, x.shape[1], y.shape[1])


@torch.library.custom_op("jmp_ext::segment_contract", mutates_args=())
def _segment_contract(x: Tensor, y: Tensor, ptr_: Tensor) -> Tensor:
    """out[e] = x[s] @ y[e] for e in [ptr_[s], ptr_[s+1]): x [S, R, C], y [E, C] -> [E, R]."""
    _check_bilinear(x, y, ptr_, 3)
    out = x.new_empty(y.shape[0], x.shape[1])
    return _bilinear_kernel("segment_contract", x, y, ptr_, out, x.shape[1])


@_segment_contract.register_fake
def _(x, y, ptr_):
    _check_bilinear(x, y, ptr_, 3)
    return x.new_empty(y.shape[0], x.shape[1])


@torch.library.custom_op("jmp_ext::segment_contract_gathered", mutates_args=())
def _segment_contract_gathered(x: Tensor, y: Tensor, y_index: Tensor, ptr_: Tensor) -> Tensor:
    """segment_contract(x, y[y_index], ptr_) without writing y[y_index]: x [S, R, C], y [N, C],
    y_index [E] -> [E, R]. On CUDA (no fused kernel yet) it gathers first."""
    _check_bilinear(x, y, ptr_, 3, y_index=y_index)
    if x.device.type != "cpu":
        return _segment_contract(x, _gather(y, y_index), ptr_)
    out = x.new_empty(y_index.shape[0], x.shape[1])
    return _bilinear_kernel("segment_contract", x, y, ptr_, out, x.shape[1], y_index=y_index)


@_segment_contract_gathered.register_fake
def _(x, y, y_index, ptr_):
    _check_bilinear(x, y, ptr_, 3, y_index=y_index)
    return x.new_empty(y_index.shape[0], x.shape[1])


@torch.library.custom_op("jmp_ext::segment_contract_scattered", mutates_args=())
def _segment_contract_scattered(x: Tensor, y: Tensor, ptr_: Tensor, out_index: Tensor, num_out_rows: int) -> Tensor:
    """scatter_sum(segment_contract(x, y, ptr_), out_index, num_out_rows) without writing the
    [E, R] product: x [S, R, C], y [E, C], out_index [E] -> [num_out_rows, R]. Each out row sums
    its rows in ascending e, as scatter_sum. On CUDA (no fused kernel yet) it is those two ops."""
    _check_bilinear(x, y, ptr_, 3, out_index=out_index)
    _check_size("num_out_rows", num_out_rows)
    if x.device.type != "cpu":
        return _scatter_reduce(_segment_contract(x, y, ptr_), out_index, num_out_rows, "sum", True)
    if out_index.shape[0] == 0:  # (an empty index reaches the kernel as a null pointer: no index)
        return x.new_zeros(num_out_rows, x.shape[1])
    out = x.new_empty(num_out_rows, x.shape[1])
    return _bilinear_kernel("segment_contract", x, y, ptr_, out, x.shape[1], out_index=out_index)


@_segment_contract_scattered.register_fake
def _(x, y, ptr_, out_index, num_out_rows):
    _check_bilinear(x, y, ptr_, 3, out_index=out_index)
    _check_size("num_out_rows", num_out_rows)
    return x.new_empty(num_out_rows, x.shape[1])


# ---- autograd: every backward is made of the ops above, so it is differentiable again ----


def _counts(index_or_ptr: Tensor, dim_size: int | None, dtype: torch.dtype) -> Tensor:
    """Rows per segment, at least 1, as a [S, 1] column: from a CSR ptr (dim_size None) or an index."""
    if dim_size is None:
        counts = index_or_ptr.diff()
    else:
        counts = torch.bincount(index_or_ptr, minlength=dim_size)
    return counts.clamp(min=1).to(dtype).unsqueeze(1)


def _setup_segment(ctx, inputs, output):
    src, ptr_, reduce = inputs
    ctx.save_for_backward(ptr_)
    ctx.num_rows, ctx.reduce = src.shape[0], reduce


def _backward_segment(ctx, grad):
    (ptr_,) = ctx.saved_tensors
    if ctx.reduce == "mean":
        grad = grad / _counts(ptr_, None, grad.dtype)
    return _segment_broadcast(grad, ptr_, ctx.num_rows), None, None


_segment_reduce.register_autograd(_backward_segment, setup_context=_setup_segment)


def _setup_segment_max(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.num_rows = inputs[0].shape[0]


def _backward_segment_max(ctx, grad, _grad_arg):
    # Each source row is the argmax of at most one (segment, feature), so this scatter has no
    # collisions except in the extra row num_rows that empty segments point to (then dropped).
    (arg,) = ctx.saved_tensors
    grad_src = grad.new_zeros(ctx.num_rows + 1, grad.shape[1]).scatter(0, arg, grad)
    return grad_src[: ctx.num_rows], None


_segment_max.register_autograd(_backward_segment_max, setup_context=_setup_segment_max)


def _setup_broadcast(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_broadcast(ctx, grad):
    (ptr_,) = ctx.saved_tensors
    return _segment_reduce(grad, ptr_, "sum"), None, None


_segment_broadcast.register_autograd(_backward_broadcast, setup_context=_setup_broadcast)


def _setup_scatter(ctx, inputs, output):
    src, index, dim_size, reduce, deterministic = inputs
    ctx.save_for_backward(index)
    ctx.dim_size, ctx.reduce = dim_size, reduce


def _backward_scatter(ctx, grad):
    (index,) = ctx.saved_tensors
    if ctx.reduce == "mean":
        grad = grad / _counts(index, ctx.dim_size, grad.dtype)
    return _gather(grad, index), None, None, None, None


_scatter_reduce.register_autograd(_backward_scatter, setup_context=_setup_scatter)


def _setup_gather(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_rows = inputs[0].shape[0]


def _backward_gather(ctx, grad):
    (index,) = ctx.saved_tensors
    return _scatter_reduce(grad, index, ctx.num_rows, "sum", True), None


_gather.register_autograd(_backward_gather, setup_context=_setup_gather)


def _setup_padded(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.padded_shape = inputs[0].shape[:2]


def _backward_ragged_to_padded(ctx, grad):
    row, col = ctx.saved_tensors
    return _padded_to_ragged(grad, row, col), None, None, None, None


def _backward_padded_to_ragged(ctx, grad):
    row, col = ctx.saved_tensors
    return _ragged_to_padded(grad, row, col, *ctx.padded_shape), None, None


def _setup_ragged(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


_ragged_to_padded.register_autograd(_backward_ragged_to_padded, setup_context=_setup_ragged)
_padded_to_ragged.register_autograd(_backward_padded_to_ragged, setup_context=_setup_padded)


def _setup_bilinear(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_outer(ctx, grad):
    # out[s] = sum_e x[e] ⊗ y[e]: dx[e] = grad[s] @ y[e], dy[e] = grad[s]^T @ x[e].
    x, y, ptr_ = ctx.saved_tensors
    grad_x = _segment_contract(grad, y, ptr_) if ctx.needs_input_grad[0] else None
    grad_y = _segment_contract(grad.transpose(1, 2), x, ptr_) if ctx.needs_input_grad[1] else None
    return grad_x, grad_y, None


def _backward_contract(ctx, grad):
    # out[e] = x[s] @ y[e]: dx[s] = sum_e grad[e] ⊗ y[e], dy[e] = x[s]^T @ grad[e].
    x, y, ptr_ = ctx.saved_tensors
    grad_x = _segment_outer(grad, y, ptr_) if ctx.needs_input_grad[0] else None
    grad_y = _segment_contract(x.transpose(1, 2), grad, ptr_) if ctx.needs_input_grad[1] else None
    return grad_x, grad_y, None


_segment_outer.register_autograd(_backward_outer, setup_context=_setup_bilinear)


def _backward_outer_gathered(ctx, grad):
    # As _backward_outer with y[y_index] for y: the gather feeds the contraction for dx, and
    # dy, the gradient of the gather, is the contraction's rows scatter-summed.
    x, y, y_index, ptr_ = ctx.saved_tensors
    grad_x = _segment_contract_gathered(grad, y, y_index, ptr_) if ctx.needs_input_grad[0] else None
    grad_y = _segment_contract_scattered(grad.transpose(1, 2), x, ptr_, y_index, y.shape[0]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_y, None, None


def _backward_contract_gathered(ctx, grad):
    # out[e] = x[s] @ y[y_index[e]]: dx[s] = sum_e grad[e] ⊗ y[y_index[e]], dy = the rows
    # x[s]^T @ grad[e] scatter-summed by y_index.
    x, y, y_index, ptr_ = ctx.saved_tensors
    grad_x = _segment_outer_gathered(grad, y, y_index, ptr_) if ctx.needs_input_grad[0] else None
    grad_y = _segment_contract_scattered(x.transpose(1, 2), grad, ptr_, y_index, y.shape[0]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_y, None, None


def _backward_contract_scattered(ctx, grad):
    # out[k] = sum over e with out_index[e] = k of x[s] @ y[e]: dx[s] = sum_e grad[out_index[e]] ⊗ y[e]
    # (built as y[e] ⊗ grad[out_index[e]], transposed), dy[e] = x[s]^T @ grad[out_index[e]].
    x, y, ptr_, out_index = ctx.saved_tensors
    grad_x = _segment_outer_gathered(y, grad, out_index, ptr_).transpose(1, 2) if ctx.needs_input_grad[0] else None
    grad_y = _segment_contract_gathered(x.transpose(1, 2), grad, out_index, ptr_) if ctx.needs_input_grad[1] else None
    return grad_x, grad_y, None, None, None


def _setup_contract_scattered(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


_segment_outer_gathered.register_autograd(_backward_outer_gathered, setup_context=_setup_bilinear)
_segment_contract.register_autograd(_backward_contract, setup_context=_setup_bilinear)
_segment_contract_gathered.register_autograd(_backward_contract_gathered, setup_context=_setup_bilinear)
_segment_contract_scattered.register_autograd(_backward_contract_scattered, setup_context=_setup_contract_scattered)

float32_under_autocast(*(op._qualname for op in (
    _segment_reduce, _segment_max, _segment_broadcast, _scatter_reduce, _gather, _ragged_to_padded,
    _padded_to_ragged, _segment_outer, _segment_outer_gathered, _segment_contract, _segment_contract_gathered,
    _segment_contract_scattered)))


# ---- public functions: any trailing feature dims, flattened to F for the kernels ----


def _features(src: Tensor, name: str) -> Tensor:
    if src.dim() == 0:
        raise ValueError(f"{name} must have a leading row dimension, got a scalar")
    return src.reshape(src.shape[0], math.prod(src.shape[1:]))


def segment_sum(src: Tensor, ptr: Tensor) -> Tensor:
    """Sums of the rows of src [E, ...] over sorted segments: out[s] = src[ptr[s]:ptr[s+1]].sum(0).

    ptr [S+1] int64 is a CSR pointer (ptr[0] = 0, non-decreasing, ptr[S] = E). -> [S, ...]."""
    out = _segment_reduce(_features(src, "src"), ptr, "sum")
    return out.reshape(out.shape[:1] + src.shape[1:])


def segment_mean(src: Tensor, ptr: Tensor) -> Tensor:
    """Like segment_sum, divided by the segment length (0 for empty segments). -> [S, ...]."""
    out = _segment_reduce(_features(src, "src"), ptr, "mean")
    return out.reshape(out.shape[:1] + src.shape[1:])


def segment_max(src: Tensor, ptr: Tensor) -> Tensor:
    """Elementwise max over each segment (0 for empty segments). -> [S, ...]."""
    out, _ = _segment_max(_features(src, "src"), ptr)
    return out.reshape(out.shape[:1] + src.shape[1:])


def scatter_sum(src: Tensor, index: Tensor, dim_size: int, *, deterministic: bool = True) -> Tensor:
    """out[k] = sum of src[e] over e with index[e] == k, for k < dim_size. -> [dim_size, ...].

    index [E] int64/int32 need not be sorted. deterministic=False allows the atomic CUDA kernel
    (ignored on the CPU, which is always deterministic, and under
    torch.use_deterministic_algorithms(True))."""
    out = _scatter_reduce(_features(src, "src"), index, dim_size, "sum", deterministic)
    return out.reshape(out.shape[:1] + src.shape[1:])


def scatter_mean(src: Tensor, index: Tensor, dim_size: int, *, deterministic: bool = True) -> Tensor:
    """Like scatter_sum, divided by the number of rows sent to each k (0 where none). -> [dim_size, ...]."""
    out = _scatter_reduce(_features(src, "src"), index, dim_size, "mean", deterministic)
    return out.reshape(out.shape[:1] + src.shape[1:])


def gather(src: Tensor, index: Tensor) -> Tensor:
    """Rows of src [S, ...] picked by index [E] int64/int32: out[e] = src[index[e]]. -> [E, ...].

    The same values as src[index], but the gradient is a deterministic scatter_sum instead of
    torch's index_put with accumulation (about 2x slower on the CPU). Under torch.compile it is
    plain indexing instead, which Inductor fuses into the ops around it (a compiled model step
    was 5 % faster so; the fused scatter-add of its gradient is not bitwise reproducible across
    thread counts, which compiling gives up anyway) and, like it, does not refuse a negative
    index (-1 is the last row)."""
    if torch.compiler.is_compiling():
        return src[index]
    out = _gather(_features(src, "src"), index)
    return out.reshape(out.shape[:1] + src.shape[1:])


def ragged_to_padded(x: Tensor, row: Tensor, col: Tensor, num_rows: int, num_cols: int) -> Tensor:
    """GemNet-OC's Kmax padding: out[row[t], col[t]] = x[t], zeros elsewhere.

    x [T, ...]; row, col [T] int64 or int32 with distinct (row, col) pairs (row = out, col = out_agg).
    -> [num_rows, num_cols, ...]."""
    out = _ragged_to_padded(_features(x, "x"), row, col, num_rows, num_cols)
    return out.reshape(out.shape[:2] + x.shape[1:])


def padded_to_ragged(padded: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """The adjoint of ragged_to_padded: out[t] = padded[row[t], col[t]]. padded [R, C, ...] -> [T, ...]."""
    if padded.dim() < 2:
        raise ValueError(f"padded must be [R, C, ...], got shape {tuple(padded.shape)}")
    out = _padded_to_ragged(padded.reshape(*padded.shape[:2], math.prod(padded.shape[2:])), row, col)
    return out.reshape(out.shape[:1] + padded.shape[2:])


def segment_outer(x: Tensor, y: Tensor, ptr: Tensor, y_index: Tensor | None = None) -> Tensor:
    """Per-segment sums of outer products: out[s] = sum over e in [ptr[s], ptr[s+1]) of x[e] ⊗ y[e].

    x [E, R], y [E, C] (same dtype); ptr [S+1] int64 CSR pointer. -> [S, R, C]; the ragged form of
    padded_x[s].T @ padded_y[s], without materialising the zero padding.
    With y_index [E] int64/int32, row e of y is y[y_index[e]] (y [N, C]): the same result as
    segment_outer(x, gather(y, y_index), ptr), without writing the gathered rows (on the CPU)."""
    if y_index is None:
        return _segment_outer(x, y, ptr)
    return _segment_outer_gathered(x, y, y_index, ptr)


def segment_contract(x: Tensor, y: Tensor, ptr: Tensor, y_index: Tensor | None = None,
                     out_index: Tensor | None = None, num_out_rows: int | None = None) -> Tensor:
    """out[e] = x[s] @ y[e] for the rows e of segment s: x [S, R, C], y [E, C] -> [E, R].

    With y_index [E] int64/int32, row e of y is y[y_index[e]] (y [N, C]): segment_contract(x,
    gather(y, y_index), ptr). With out_index [E] int64/int32 and num_out_rows, row e of the result is
    summed into row out_index[e]: scatter_sum(segment_contract(x, y, ptr), out_index,
    num_out_rows) -> [num_out_rows, R]. On the CPU neither writes the [E, ...] rows in between."""
    if (out_index is None) != (num_out_rows is None):
        raise ValueError("segment_contract: out_index and num_out_rows go together")
    if y_index is not None and out_index is not None:
        raise ValueError("segment_contract: y_index and out_index cannot be combined")
    if y_index is not None:
        return _segment_contract_gathered(x, y, y_index, ptr)
    if out_index is not None:
        return _segment_contract_scattered(x, y, ptr, out_index, num_out_rows)
    return _segment_contract(x, y, ptr)
