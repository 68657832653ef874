"""jmp_ext.ops.gaussian_basis against the torch expression it replaces, in values and gradients."""

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import jmp_ext.ops as ops


def torch_gaussian_basis(x, offset, temps):
    """The expression of GemNet-OC's Gaussian basis with values below the smallest normal set to 0
    (the model's definition before the kernel existed)."""
    exponent = -temps * (x[:, None] - offset) ** 2
    underflow = ~(exponent > math.log(torch.finfo(exponent.dtype).tiny))
    return torch.exp(exponent.masked_fill(underflow, 0.0)).masked_fill(underflow, 0.0)


def jmp_centres(num_radial=128, dtype=torch.float32):
    """JMP's buffers: centres on [0, 1], temps = 1 / (2 spacing^2), float32-rounded."""
    offset = torch.linspace(0.0, 1.0, num_radial, dtype=torch.float32)
    temps = torch.full_like(offset, 0.5 / (1.0 / (num_radial - 1)) ** 2)
    return offset.to(dtype), temps.to(dtype)


def distances(n, dtype, seed=0):
    """Scaled distances over [0, 1.2) (beyond the cutoff too), with exact centres and 0 included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=gen, dtype=torch.float64) * 1.2
    x[:3] = torch.tensor([0.0, 1.0, 5 / 127])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_torch_expression(dtype):
    x = distances(5000, dtype)
    offset, temps = jmp_centres(dtype=dtype)
    out = ops.gaussian_basis(x, offset, temps)
    expected = torch_gaussian_basis(x, offset, temps)
    assert out.shape == (5000, 128) and out.dtype == dtype
    assert torch.equal(out == 0, expected == 0)  # the same values are zeroed
    # exp of the same exponent: at most an ulp or two apart (libm vs torch's vectorised exp).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, expected, rtol=4 * eps, atol=0)
    # Non-zero only within sqrt(-log(tiny) / temps) of x: at most floor(2 * that / spacing) + 1
    # centres (27 in float32, 76 in float64).
    half_width = math.sqrt(-math.log(torch.finfo(dtype).tiny) / temps[0].item()) * 127
    nonzero = (out > 0).sum(dim=1)
    assert nonzero[x <= 1].min() >= 1 and nonzero.max() <= math.floor(2 * half_width) + 1


def test_nan_and_far_values_give_zero_like_the_expression():
    offset, temps = jmp_centres(16)
    x = torch.tensor([float("nan"), 40.0, -40.0, 0.5])
    out = ops.gaussian_basis(x, offset, temps)
    assert torch.equal(out, torch_gaussian_basis(x, offset, temps))
    assert torch.equal(out[:3], torch.zeros(3, 16)) and (out[3] > 0).any()


def test_gradients_match_the_expression_and_pass_gradcheck():
    # Few, wide Gaussians so that every value and derivative is well away from the cut-off.
    offset = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    temps = torch.full_like(offset, 3.0)
    x = distances(20, torch.float64, seed=1).requires_grad_()
    weights = torch.randn(20, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad((ops.gaussian_basis(x, offset, temps) * weights).sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad((torch_gaussian_basis(x, offset, temps) * weights).sum(), x,
                                      create_graph=True)
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=1e-14)
    (ours2,) = torch.autograd.grad(ours.square().sum(), x)
    (expected2,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(ours2, expected2, rtol=1e-12, atol=1e-13)
    assert gradcheck(lambda v: ops.gaussian_basis(v, offset, temps), (x,))
    assert gradgradcheck(lambda v: ops.gaussian_basis(v, offset, temps), (x,))


def test_zeroed_values_pass_no_gradient():
    offset, temps = jmp_centres(128, torch.float64)
    x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    out = ops.gaussian_basis(x, offset, temps)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out) * (out == 0))
    assert grad.item() == 0.0


def test_opcheck():
    offset, temps = jmp_centres(8)
    x = distances(10, torch.float32)
    torch.library.opcheck(torch.ops.jmp_ext.gaussian_basis.default, (x.requires_grad_(), offset, temps, None))
    scale = envelope(x.detach()).requires_grad_()
    torch.library.opcheck(torch.ops.jmp_ext.gaussian_basis.default, (x, offset, temps, scale))


def test_opcheck_of_the_gradient_ops():
    offset, temps = jmp_centres(8)
    x = distances(10, torch.float32)
    scale, grad = envelope(x), torch.randn(10, 8)
    for s in (None, scale):
        torch.library.opcheck(torch.ops.jmp_ext.gaussian_basis_backward.default, (grad, x, offset, temps, s))
        torch.library.opcheck(torch.ops.jmp_ext.gaussian_basis_second.default,
                              (grad, x, offset, temps, s, torch.randn(10), None if s is None else torch.randn(10)))


def test_third_derivative_raises_a_clear_error():
    """Second order is what training on -dE/dpos needs; the third is not provided, and says so."""
    offset, temps = jmp_centres(8, torch.float64)
    x = distances(5, torch.float64).requires_grad_()
    (first,) = torch.autograd.grad(ops.gaussian_basis(x, offset, temps).square().sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="gaussian_basis_second"):
        torch.autograd.grad(second.sum(), x)


def envelope(x):
    """RadialBasis's polynomial envelope (p = 5), 0 from x = 1 on: scales from 1 down to 0."""
    env = 1 - 21 * x**5 + 35 * x**6 - 15 * x**7
    return torch.where(x < 1, env, torch.zeros_like(x))


def scale_then_zero(scale, basis):
    """RadialBasis's expression before the kernel took the scale."""
    product = scale[:, None] * basis
    return torch.where(product.abs() < torch.finfo(product.dtype).tiny, 0.0, product)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_basis_is_the_scaled_expression(dtype):
    """The multiply and the zeroing bitwise as torch does them on our unscaled basis; against the
    whole torch expression to exp's last-ulp differences. Tiny scales make subnormal products."""
    x = distances(5000, dtype)
    offset, temps = jmp_centres(dtype=dtype)
    scale = envelope(x)
    scale[::7] *= torch.finfo(dtype).tiny * 1e6
    out = ops.gaussian_basis(x, offset, temps, scale)
    assert torch.equal(out, scale_then_zero(scale, ops.gaussian_basis(x, offset, temps)))
    expected = scale_then_zero(scale, torch_gaussian_basis(x, offset, temps))
    torch.testing.assert_close(out, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
    # The expression the model gives torch.compile: the same values, scaled or not.
    torch.testing.assert_close(ops.gaussian_basis_expression(x, offset, temps, scale), expected, rtol=0, atol=0)
    torch.testing.assert_close(ops.gaussian_basis_expression(x, offset, temps),
                               torch_gaussian_basis(x, offset, temps), rtol=0, atol=0)
    product = scale[:, None] * ops.gaussian_basis(x, offset, temps)
    assert ((product != 0) & (out == 0)).sum() > 100  # the subnormal products were there, and zeroed


def test_scaled_gradients_match_the_expression_and_pass_gradcheck():
    offset = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    temps = torch.full_like(offset, 3.0)
    x = distances(20, torch.float64, seed=2).requires_grad_()
    scale = (envelope(x.detach()) + 0.1).requires_grad_()  # away from 0: no entry sits on the cut
    weights = torch.randn(20, 6, dtype=torch.float64)
    ours = torch.autograd.grad((ops.gaussian_basis(x, offset, temps, scale) * weights).sum(), (x, scale),
                               create_graph=True)
    expected = torch.autograd.grad((scale_then_zero(scale, torch_gaussian_basis(x, offset, temps)) * weights).sum(),
                                   (x, scale), create_graph=True)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    second = torch.autograd.grad(sum(g.square().sum() for g in ours), (x, scale))
    expected2 = torch.autograd.grad(sum(g.square().sum() for g in expected), (x, scale))
    for a, b in zip(second, expected2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert gradcheck(lambda v, s: ops.gaussian_basis(v, offset, temps, s), (x, scale))
    assert gradgradcheck(lambda v, s: ops.gaussian_basis(v, offset, temps, s), (x, scale))


def test_zeroed_scaled_values_pass_no_gradient():
    offset, temps = jmp_centres(128, torch.float64)
    x = torch.tensor([0.3, 1.5], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1e-309, 0.0], dtype=torch.float64, requires_grad=True)  # products < tiny
    out = ops.gaussian_basis(x, offset, temps, scale)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, (x, scale), torch.ones_like(out))
    assert all(torch.equal(g, torch.zeros(2, dtype=torch.float64)) for g in grads)


def test_bitwise_identical_on_any_thread_count():
    x = distances(100_000, torch.float32)
    offset, temps = jmp_centres()
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.gaussian_basis(x, offset, temps))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_bad_inputs_name_the_problem():
    offset, temps = jmp_centres(8)
    x = distances(4, torch.float32)
    with pytest.raises(ValueError, match="x \\[E\\], offset \\[R\\] and temps \\[R\\]"):
        ops.gaussian_basis(x[:, None], offset, temps)
    with pytest.raises(ValueError, match="offset \\[R\\] and temps \\[R\\]"):
        ops.gaussian_basis(x, offset, temps[:3])
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.gaussian_basis(x.double(), offset, temps)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.gaussian_basis(x.bfloat16(), offset.bfloat16(), temps.bfloat16())
    with pytest.raises(ValueError, match="scale must have x's shape"):
        ops.gaussian_basis(x, offset, temps, x[:3])
    with pytest.raises(TypeError, match="scale torch.float64"):
        ops.gaussian_basis(x, offset, temps, x.double())
    with pytest.raises(ValueError, match="constants"):
        ops.gaussian_basis(x, offset.requires_grad_(), temps)



def test_the_derivative_ops_check_their_inputs():
    """Called through torch.ops, nothing else checks them: a short grad was read past its end
    (a segfault at E = 1e6, garbage at E = 4)."""
    offset, temps = jmp_centres(8, torch.float64)
    x = distances(1000, torch.float64)
    grad = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gaussian_basis_backward: grad must be torch.float64 \[1000, 8\]"):
        torch.ops.jmp_ext.gaussian_basis_backward(grad, x, offset, temps, None)
    full = torch.ones(1000, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"gaussian_basis_second: grad_grad_x must be torch.float64 \[1000\]"):
        torch.ops.jmp_ext.gaussian_basis_second(full, x, offset, temps, None, x[:10], None)
    with pytest.raises(ValueError, match=r"gaussian_basis_second: grad must be"):
        torch.ops.jmp_ext.gaussian_basis_second(full.float(), x, offset, temps, None, x, None)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    for dtype in (torch.float32, torch.float64):
        x = distances(20_000, dtype)
        offset, temps = jmp_centres(dtype=dtype)
        cpu = ops.gaussian_basis(x, offset, temps)
        gpu = ops.gaussian_basis(x.cuda(), offset.cuda(), temps.cuda()).cpu()
        assert torch.equal(cpu == 0, gpu == 0)
        torch.testing.assert_close(gpu, cpu, rtol=4 * torch.finfo(dtype).eps, atol=0)
        scale = envelope(x)
        cpu = ops.gaussian_basis(x, offset, temps, scale)
        gpu = ops.gaussian_basis(x.cuda(), offset.cuda(), temps.cuda(), scale.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=4 * torch.finfo(dtype).eps, atol=0)
        # First and second derivatives (the gradient kernels), on a few thousand edges.
        results = []
        for device in ("cpu", "cuda"):
            v, s = x[:2000].to(device).requires_grad_(), scale[:2000].to(device).requires_grad_()
            w = torch.linspace(-1, 1, 128, dtype=dtype, device=device)
            first = torch.autograd.grad((ops.gaussian_basis(v, offset.to(device), temps.to(device), s) * w).sum(),
                                        (v, s), create_graph=True)
            second = torch.autograd.grad(sum(g.square().sum() for g in first), (v, s))
            results.append([t.detach().cpu() for t in (*first, *second)])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)
