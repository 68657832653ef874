"""The efficient-bilinear contraction of GemNet-OC's quadruplet interaction: jmp_ext's ragged
segment_outer against the zero-padded batched matmul that JMP (and this package before) used.

    out[e] = sum over the quadruplets q of edge e of sph[q] ⊗ m[q]     sph [Q, 49], m [Q, 8]

"padded": ragged_to_padded(m) [E, Kmax, 8], sph padded to [E, 49, Kmax], then bmm (the padded
sph is built once per forward in the model, so it is prepared outside the timed call).
"ragged": ops.segment_outer(sph, m, ptr). Each is timed forward and forward+backward (grad of m,
as in a direct-force training step). Sizes: the quadruplets of 8 OC20-like slabs (E = 16 048
main edges, Q = 1.29 M, up to 257 per edge, 31 % of the padded block filled), segment lengths
drawn to match. One thread. Run:

    PYTHONPATH=python pytest bench/bench_segment_bilinear.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

import jmp_ext.ops as ops

E, S, F, KMAX = 16_048, 49, 8, 257


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    # Lengths uniform in [0, Kmax]: mean ~128 of 257 is close to the slabs' 31 % fill (mean 80).
    lengths = torch.randint(0, KMAX + 1, (E,), generator=gen) * 5 // 8
    lengths[0] = KMAX
    ptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    out = torch.repeat_interleave(torch.arange(E), lengths)
    out_agg = torch.arange(out.shape[0]) - ptr[:-1][out]
    sph = torch.randn(out.shape[0], S, generator=gen)
    m = torch.randn(out.shape[0], F, generator=gen)
    sph_padded = ops.ragged_to_padded(sph, out, out_agg, E, KMAX).transpose(1, 2)
    return {"sph": sph, "m": m, "ptr": ptr, "out": out, "out_agg": out_agg, "sph_padded": sph_padded}


def padded(d, m):
    return d["sph_padded"] @ ops.ragged_to_padded(m, d["out"], d["out_agg"], E, KMAX)


def ragged(d, m):
    return ops.segment_outer(d["sph"], m, d["ptr"])


def test_same_result(data):
    torch.testing.assert_close(ragged(data, data["m"]), padded(data, data["m"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("impl", [padded, ragged], ids=["padded", "ragged"])
def test_quadruplet_contraction(benchmark, data, impl, backward):
    torch.set_num_threads(1)
    benchmark.group = "forward+backward" if backward else "forward"

    def run():
        m = data["m"].requires_grad_(backward)
        out = impl(data, m)
        if backward:
            out.backward(torch.ones_like(out))
            m.grad = None

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
