"""GemNet-OC's Gaussian radial basis as one compiled kernel (csrc/gaussian_basis).

    gaussian_basis(x [E], offset [R], temps [R]) -> [E, R]
    out[e, k] = exp(-temps[k] * (x[e] - offset[k])^2), or exactly 0 where that exponent is not
    above log(torch.finfo(dtype).tiny) (the result would be subnormal or zero).

This is the torch expression of jmp_ext.models.gemnet_oc.bases.GaussianBasis computed in one
pass: with 128 centres on [0, 1] (JMP's setting) only ~27 of an edge's values are non-zero in
float32, and the kernel evaluates exp for those only. float32 or float64; x, offset and temps
share dtype and device. Differentiable in x to any order (the gradient is built from the output
with torch ops); offset and temps are constants (the model's buffers) and get no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jmp_ext.ops._lib import launch, ptr

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


def _check(x: Tensor, offset: Tensor, temps: Tensor) -> None:
    if x.dim() != 1 or offset.dim() != 1 or temps.shape != offset.shape:
        raise ValueError(f"gaussian_basis takes x [E], offset [R] and temps [R]; got shapes "
                         f"{tuple(x.shape)}, {tuple(offset.shape)} and {tuple(temps.shape)}")
    if x.dtype not in _DTYPE_CODES or offset.dtype != x.dtype or temps.dtype != x.dtype:
        raise TypeError(f"gaussian_basis takes float32 or float64 tensors of one dtype; got x "
                        f"{x.dtype}, offset {offset.dtype}, temps {temps.dtype}")
    if offset.device != x.device or temps.device != x.device:
        raise ValueError(f"gaussian_basis inputs must be on one device; got x on {x.device}, "
                         f"offset on {offset.device}, temps on {temps.device}")


@torch.library.custom_op("jmp_ext::gaussian_basis", mutates_args=())
def _gaussian_basis(x: Tensor, offset: Tensor, temps: Tensor) -> Tensor:
    _check(x, offset, temps)
    x, offset, temps = x.contiguous(), offset.contiguous(), temps.contiguous()
    out = x.new_empty(x.shape[0], offset.shape[0])
    launch("gaussian_basis", x.device, ptr(x), ptr(offset), ptr(temps), ptr(out), x.shape[0], offset.shape[0],
           _DTYPE_CODES[x.dtype], checks_indices=False)
    return out


@_gaussian_basis.register_fake
def _(x, offset, temps):
    _check(x, offset, temps)
    return x.new_empty(x.shape[0], offset.shape[0])


def _setup(ctx, inputs, output):
    x, offset, temps = inputs
    ctx.save_for_backward(x, offset, temps, output)


def _backward(ctx, grad):
    # d out[e, k] / d x[e] = -2 temps[k] (x[e] - offset[k]) out[e, k]: 0 where out was zeroed,
    # as in the torch expression (whose masked_fill passes no gradient).
    x, offset, temps, out = ctx.saved_tensors
    slope = -2.0 * temps * (x[:, None] - offset)
    return (grad * out * slope).sum(dim=1), None, None


_gaussian_basis.register_autograd(_backward, setup_context=_setup)


def gaussian_basis(x: Tensor, offset: Tensor, temps: Tensor) -> Tensor:
    """exp(-temps * (x[:, None] - offset)^2), zeroed below the smallest normal number.

    x [E] (distances over the cutoff), offset [R], temps [R]: float32 or float64. -> [E, R]."""
    if offset.requires_grad or temps.requires_grad:
        raise ValueError("gaussian_basis: offset and temps are constants; they cannot require grad")
    return _gaussian_basis(x, offset, temps)
