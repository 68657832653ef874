"""GemNet-OC's Gaussian radial basis as one compiled kernel (csrc/gaussian_basis).

    gaussian_basis(x [E], offset [R], temps [R], scale [E] | None) -> [E, R]
    out[e, k] = exp(-temps[k] * (x[e] - offset[k])^2), or exactly 0 where that exponent is not
    above log(torch.finfo(dtype).tiny) (the result would be subnormal or zero); with a scale (the
    radial basis's envelope), that times scale[e], and exactly 0 where |product| < tiny.

This is the torch expression of jmp_ext.models.gemnet_oc.bases.RadialBasis computed in one
pass: with 128 centres on [0, 1] (JMP's setting) only ~27 of an edge's values are non-zero in
float32, and the kernel evaluates exp for those only; unfused, the envelope's multiply and the
zeroing cost ~3x the basis itself in eager mode (they run over all 128 columns, some of them
subnormal). float32 or float64; x, offset, temps and scale share dtype and device.
Differentiable in x and scale to second order, what training on forces -dE/dpos needs: both
derivatives are kernels too (gaussian_basis_backward, gaussian_basis_second), which recompute a
row's non-zero values instead of running torch ops over [E, R]; a third derivative raises.
offset and temps are constants (the model's buffers) and get no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jmp_ext.ops._lib import DTYPE_CODES, contiguous, launch, ptr

def _check(x: Tensor, offset: Tensor, temps: Tensor, scale: Tensor | None) -> None:
    if x.dim() != 1 or offset.dim() != 1 or temps.shape != offset.shape:
        raise ValueError(f"gaussian_basis takes x [E], offset [R] and temps [R]; got shapes "
                         f"{tuple(x.shape)}, {tuple(offset.shape)} and {tuple(temps.shape)}")
    if scale is not None and scale.shape != x.shape:
        raise ValueError(f"gaussian_basis: scale must have x's shape {tuple(x.shape)}, got {tuple(scale.shape)}")
    tensors = {"x": x, "offset": offset, "temps": temps} | ({} if scale is None else {"scale": scale})
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors.values()):
        raise TypeError("gaussian_basis takes float32 or float64 tensors of one dtype; got " +
                        ", ".join(f"{name} {t.dtype}" for name, t in tensors.items()))
    if any(t.device != x.device for t in tensors.values()):
        raise ValueError("gaussian_basis inputs must be on one device; got " +
                         ", ".join(f"{name} on {t.device}" for name, t in tensors.items()))


def _check_derivative(name: str, x: Tensor, offset: Tensor, temps: Tensor, scale: Tensor | None,
                      grad: Tensor, **per_edge: Tensor | None) -> None:
    """The derivative ops' inputs (called as torch.ops.jmp_ext.*, nothing else checks them, and
    the kernels trust their shapes): grad [E, R] and the per-edge tensors [E], in x's dtype."""
    _check(x, offset, temps, scale)
    tensors = {"grad": (grad, (x.shape[0], offset.shape[0]))}
    tensors |= {key: (t, tuple(x.shape)) for key, t in per_edge.items() if t is not None}
    for key, (t, shape) in tensors.items():
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: {key} must be {x.dtype} {list(shape)} on {x.device}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")


def _per_edge(x: Tensor, scale: Tensor | None) -> Tensor:
    """An uninitialised [E] buffer for a scale's gradient, or an empty one without a scale."""
    return torch.empty_like(x) if scale is not None else x.new_empty(0)


@torch.library.custom_op("jmp_ext::gaussian_basis", mutates_args=())
def _gaussian_basis(x: Tensor, offset: Tensor, temps: Tensor, scale: Tensor | None) -> Tensor:
    _check(x, offset, temps, scale)
    x, offset, temps, scale = contiguous(x, offset, temps, scale)
    out = x.new_empty(x.shape[0], offset.shape[0])
    launch("gaussian_basis", x.device, ptr(x), ptr(offset), ptr(temps), ptr(scale), ptr(out), x.shape[0],
           offset.shape[0], DTYPE_CODES[x.dtype], checks_indices=False)
    return out


@_gaussian_basis.register_fake
def _(x, offset, temps, scale):
    _check(x, offset, temps, scale)
    return x.new_empty(x.shape[0], offset.shape[0])


@torch.library.custom_op("jmp_ext::gaussian_basis_backward", mutates_args=())
def _gaussian_basis_backward(grad: Tensor, x: Tensor, offset: Tensor, temps: Tensor,
                             scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(grad_x [E], grad_scale [E], or [0] without a scale) from grad = d/d out [E, R]: one pass
    that recomputes the non-zero values, instead of torch ops over [E, R] (whose products of
    small numbers are subnormal and slow)."""
    _check_derivative("gaussian_basis_backward", x, offset, temps, scale, grad)
    grad, x, offset, temps, scale = contiguous(grad, x, offset, temps, scale)
    grad_x, grad_scale = torch.empty_like(x), _per_edge(x, scale)
    launch("gaussian_basis_backward", x.device, ptr(grad), ptr(x), ptr(offset), ptr(temps), ptr(scale),
           ptr(grad_x), ptr(grad_scale), x.shape[0], offset.shape[0], DTYPE_CODES[x.dtype],
           checks_indices=False)
    return grad_x, grad_scale


@_gaussian_basis_backward.register_fake
def _(grad, x, offset, temps, scale):
    return torch.empty_like(x), _per_edge(x, scale)


def _setup(ctx, inputs, output):
    x, offset, temps, scale = inputs
    ctx.save_for_backward(x, offset, temps, scale)


def _backward(ctx, grad):
    # d out[e, k] / d x[e] = -2 temps[k] (x[e] - offset[k]) out[e, k], and d out[e, k] / d scale[e]
    # = the unscaled basis: both 0 where out was zeroed, as in the torch expressions (whose
    # masked_fill and where pass no gradient there).
    x, offset, temps, scale = ctx.saved_tensors
    grad_x, grad_scale = _gaussian_basis_backward(grad, x, offset, temps, scale)
    return grad_x, None, None, grad_scale if scale is not None else None


_gaussian_basis.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("jmp_ext::gaussian_basis_second", mutates_args=())
def _gaussian_basis_second(grad: Tensor, x: Tensor, offset: Tensor, temps: Tensor, scale: Tensor | None,
                           grad_grad_x: Tensor | None, grad_grad_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's own gradient: (d grad [E, R], d x [E], d scale [E] or [0]) from d/d grad_x
    and d/d grad_scale (None: zero). What training on forces -dE/dpos needs; it has no gradient
    of its own (a third derivative raises)."""
    _check_derivative("gaussian_basis_second", x, offset, temps, scale, grad,
                      grad_grad_x=grad_grad_x, grad_grad_scale=grad_grad_scale)
    grad, x, offset, temps, scale, grad_grad_x, grad_grad_scale = contiguous(
        grad, x, offset, temps, scale, grad_grad_x, grad_grad_scale)
    d_grad, d_x, d_scale = torch.empty_like(grad), torch.empty_like(x), _per_edge(x, scale)
    launch("gaussian_basis_second", x.device, ptr(grad), ptr(x), ptr(offset), ptr(temps), ptr(scale),
           ptr(grad_grad_x), ptr(grad_grad_scale), ptr(d_grad), ptr(d_x), ptr(d_scale), x.shape[0],
           offset.shape[0], DTYPE_CODES[x.dtype], checks_indices=False)
    return d_grad, d_x, d_scale


@_gaussian_basis_second.register_fake
def _(grad, x, offset, temps, scale, grad_grad_x, grad_grad_scale):
    return torch.empty_like(grad), torch.empty_like(x), _per_edge(x, scale)


def _setup_second(ctx, inputs, output):
    grad, x, offset, temps, scale = inputs
    ctx.save_for_backward(grad, x, offset, temps, scale)


def _backward_second(ctx, grad_grad_x, grad_grad_scale):
    grad, x, offset, temps, scale = ctx.saved_tensors
    if scale is None:
        grad_grad_scale = None
    d_grad, d_x, d_scale = _gaussian_basis_second(grad, x, offset, temps, scale, grad_grad_x, grad_grad_scale)
    return d_grad, d_x, None, None, d_scale if scale is not None else None


_gaussian_basis_backward.register_autograd(_backward_second, setup_context=_setup_second)


def gaussian_basis(x: Tensor, offset: Tensor, temps: Tensor, scale: Tensor | None = None) -> Tensor:
    """exp(-temps * (x[:, None] - offset)^2), zeroed below the smallest normal number; with a
    scale, scale[:, None] times that, zeroed where below the smallest normal number.

    x [E] (distances over the cutoff), offset [R], temps [R], scale [E] or None: float32 or
    float64. -> [E, R]."""
    if offset.requires_grad or temps.requires_grad:
        raise ValueError("gaussian_basis: offset and temps are constants; they cannot require grad")
    return _gaussian_basis(x, offset, temps, scale)


def gaussian_basis_expression(x: Tensor, offset: Tensor, temps: Tensor, scale: Tensor | None = None) -> Tensor:
    """gaussian_basis as torch operations: the same values (exp may differ in the last bit).

    What the model hands torch.compile: Inductor fuses it into one vectorised pass, ~2.5x faster
    than the kernel's scalar exp. Eager, it is 5-7x slower than the kernel (separate passes over
    [E, R], some of them over subnormal numbers; bench/README.md, "Gaussian basis")."""
    tiny = torch.finfo(x.dtype).tiny
    exponent = -temps * (x[:, None] - offset) ** 2
    underflow = ~(exponent > math.log(tiny))
    basis = torch.exp(exponent.masked_fill(underflow, 0.0)).masked_fill(underflow, 0.0)
    if scale is None:
        return basis
    product = scale[:, None] * basis
    return torch.where(product.abs() < tiny, 0.0, product)
