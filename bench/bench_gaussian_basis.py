"""GemNet-OC's Gaussian radial basis (128 centres on d / 12 Å): jmp_ext.ops.gaussian_basis against
the torch expression it replaced, eager and under torch.compile (Inductor fuses it into one
pass), with the write floor measured in the same run: filling a tensor of the output's size.

    out[e, k] = exp(-temps[k] * (x[e] - offset[k])^2), 0 below float32's smallest normal
    "enveloped" (RadialBasis): out[e, k] * envelope(x[e]), 0 where that is below it

Sizes: the main graph (E = 64 278) and the a2a graph (E = 521 526) of 32 OC20-like slabs, the
model's benchmark batch (bench_model.py); distances uniform in [0, 12] Å. float32, one thread.

    PYTHONPATH=python pytest bench/bench_gaussian_basis.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

import jmp_ext.ops as ops

NUM_RADIAL = 128


compiled_expression = torch.compile(ops.gaussian_basis_expression, dynamic=False)

IMPLS = {
    "jmp_ext": ops.gaussian_basis,
    "torch": ops.gaussian_basis_expression,
    "torch_compile": compiled_expression,
    "write_floor": lambda x, offset, temps, scale: torch.empty(x.shape[0], offset.shape[0]).fill_(1.0),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("enveloped", [False, True], ids=["plain", "enveloped"])
@pytest.mark.parametrize("edges", [64_278, 521_526], ids=["main", "a2a"])
def test_gaussian_basis(benchmark, impl, enveloped, edges):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(edges, generator=gen)  # d / cutoff
    offset = torch.linspace(0.0, 1.0, NUM_RADIAL)
    temps = torch.full_like(offset, 0.5 * (NUM_RADIAL - 1) ** 2)
    scale = 1 - 21 * x**5 + 35 * x**6 - 15 * x**7 if enveloped else None  # RadialBasis's, p = 5
    fn = IMPLS[impl]
    if impl != "write_floor":
        torch.testing.assert_close(fn(x, offset, temps, scale), ops.gaussian_basis(x, offset, temps, scale),
                                   rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    benchmark.extra_info["bytes_out"] = edges * NUM_RADIAL * 4
    benchmark.pedantic(fn, args=(x, offset, temps, scale), rounds=10, warmup_rounds=2)
