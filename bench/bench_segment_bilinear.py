"""The efficient-bilinear contraction of GemNet-OC's quadruplet interaction: jmp_ext's ragged
segment_outer against the zero-padded batched matmul that JMP (and this package before) used.

    out[e] = sum over the quadruplets q of edge e of sph[q] ⊗ m[q]     sph [Q, 49], m [Q, 8]

"padded": ragged_to_padded(m) [E, Kmax, 8], sph padded to [E, 49, Kmax], then bmm (the padded
sph is built once per forward in the model, so it is prepared outside the timed call).
"ragged": ops.segment_outer(sph, m, ptr). "factored" (what the model does since 2026-12-02): the
basis is Y(cos φ) [P, 7] of the quadruplet's output triplet ⊗ Y(cos θ) [Q, 7], so segment_outer
first sums each output triplet's quadruplets against Y(cos θ), then the [P, 7 * 8] result against
Y(cos φ) per edge; building sph [Q, 49] itself (the others' input) is not timed, which favours
them. Output triplets hold ~30 quadruplets, as on the slabs. Each is timed forward and forward+backward (grad of m,
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
    # Output triplets: runs of ~30 consecutive quadruplets of one edge.
    num_quads = out.shape[0]
    starts = torch.rand(num_quads, generator=gen) < 1 / 30
    starts[ptr[:-1][lengths > 0]] = True
    trip_of_quad = starts.cumsum(0) - 1
    trip_edge = out[starts]
    ptr_2 = torch.searchsorted(trip_of_quad, torch.arange(trip_edge.shape[0] + 1))
    ptr_1 = torch.searchsorted(trip_edge, torch.arange(E + 1))
    sph_1 = torch.randn(trip_edge.shape[0], 7, generator=gen)
    sph_2 = torch.randn(num_quads, 7, generator=gen)
    sph = (sph_1[trip_of_quad][:, :, None] * sph_2[:, None, :]).reshape(num_quads, S)
    m = torch.randn(num_quads, F, generator=gen)
    sph_padded = ops.ragged_to_padded(sph, out, out_agg, E, KMAX).transpose(1, 2)
    return {"sph": sph, "m": m, "ptr": ptr, "out": out, "out_agg": out_agg, "sph_padded": sph_padded,
            "sph_1": sph_1, "sph_2": sph_2, "ptr_1": ptr_1, "ptr_2": ptr_2}


def padded(d, m):
    return d["sph_padded"] @ ops.ragged_to_padded(m, d["out"], d["out_agg"], E, KMAX)


def ragged(d, m):
    return ops.segment_outer(d["sph"], m, d["ptr"])


def factored(d, m):
    inner = ops.segment_outer(d["sph_2"], m, d["ptr_2"]).flatten(1)  # [P, 7 * 8]
    return ops.segment_outer(d["sph_1"], inner, d["ptr_1"]).view(E, S, F)


def test_same_result(data):
    expected = padded(data, data["m"])
    torch.testing.assert_close(ragged(data, data["m"]), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(factored(data, data["m"]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("impl", [padded, ragged, factored], ids=["padded", "ragged", "factored"])
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
