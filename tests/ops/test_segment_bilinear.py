"""jmp_ext.ops.segment_outer / segment_contract against the zero-padded batched matmuls they
replace in GemNet-OC (float64 brute force), gradcheck / gradgradcheck, threads, bad inputs."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import jmp_ext.ops as ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (R, C): compile-time shapes (a basis width 7 / 8 / 16 by 7 / 8 / 16 / 32 / 64, either way
# round), a compile-time width with a runtime one (49 x 8, 8 x 49, 7 x 56) and runtime ones
# (3 x 5, 49 x 56), as in the model.
SIZES = [(7, 8), (8, 7), (7, 16), (16, 7), (64, 7), (8, 16), (16, 8), (16, 64), (64, 16), (49, 8), (8, 49),
         (7, 56), (3, 5), (49, 56)]
# Against a float64 reference: sums of up to 11 products of O(1) terms, rounded in the dtype.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {},
              torch.bfloat16: {"rtol": 1e-2, "atol": 5e-2}}


def random_case(num_segments, rows, cols, dtype, gen, max_len=12):
    lengths = torch.randint(0, max_len, (num_segments,), generator=gen)
    lengths = lengths * (torch.rand(num_segments, generator=gen) > 0.2)  # about 1 in 5 empty
    ptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    n = int(ptr[-1])
    x = torch.randn(n, rows, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(n, cols, generator=gen, dtype=torch.float64).to(dtype)
    return x, y, ptr, lengths


def padded(src, lengths):
    """[n, F] -> [S, Kmax, F], zero padded: GemNet-OC's ragged_to_padded layout (float64)."""
    segment = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
    rank = torch.arange(src.shape[0]) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    kmax = int(lengths.max()) if lengths.numel() else 0
    out = torch.zeros(lengths.shape[0], kmax, src.shape[1], dtype=torch.float64)
    out[segment, rank] = src.double()
    return out, segment


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), SIZES)
def test_match_padded_matmuls(dtype, rows, cols):
    gen = torch.Generator().manual_seed(rows * 100 + cols)
    x, y, ptr, lengths = random_case(60, rows, cols, dtype, gen)
    x_pad, segment = padded(x, lengths)
    y_pad, _ = padded(y, lengths)
    tol = TOLERANCES[dtype]
    outer = ops.segment_outer(x, y, ptr)
    assert outer.shape == (60, rows, cols) and outer.dtype == dtype
    torch.testing.assert_close(outer.double(), x_pad.transpose(1, 2) @ y_pad, **tol)
    assert torch.all(outer[lengths == 0] == 0)

    blocks = torch.randn(60, rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    contract = ops.segment_contract(blocks, y, ptr)
    assert contract.shape == (y.shape[0], rows) and contract.dtype == dtype
    expected = (blocks.double()[segment] @ y.double()[:, :, None]).squeeze(-1)
    torch.testing.assert_close(contract.double(), expected, **tol)
    # Blocks stored [S, C, R] (a backward's grad.transpose(1, 2)) are read in place, same sums.
    stored_transposed = blocks.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(ops.segment_contract(stored_transposed, y, ptr), contract)
    # y's rows picked by an index inside the kernel: the same sums as gathering them first.
    table = torch.randn(17, cols, generator=gen, dtype=torch.float64).to(dtype)
    index = torch.randint(0, 17, (y.shape[0],), generator=gen)
    assert torch.equal(ops.segment_outer(x, table, ptr, index), ops.segment_outer(x, table[index], ptr))
    assert torch.equal(ops.segment_contract(blocks, table, ptr, y_index=index), ops.segment_contract(blocks, table[index], ptr))
    # The product's rows summed into 17 rows by an index inside the kernel (repeats, gaps).
    scattered = ops.segment_contract(blocks, y, ptr, out_index=index, num_out_rows=17)
    assert scattered.shape == (17, rows) and scattered.dtype == dtype
    torch.testing.assert_close(scattered.double(), torch.zeros(17, rows, dtype=torch.float64).index_add_(0, index, expected),
                               **TOLERANCES[dtype])
    if dtype != torch.bfloat16:  # (bf16 products are not rounded to bf16 before the sum here)
        assert torch.equal(scattered, ops.scatter_sum(contract, index, 17))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(1)
    x, y, ptr, _ = random_case(20, 8, 16, torch.float64, gen)
    blocks = torch.randn(20, 8, 16, generator=gen, dtype=torch.float64)
    assert torch.equal(ops.segment_outer(x.T.contiguous().T, y, ptr), ops.segment_outer(x, y, ptr))
    assert torch.equal(ops.segment_contract(blocks.transpose(1, 2), x, ptr),
                       ops.segment_contract(blocks.transpose(1, 2).contiguous(), x, ptr))
    wider = torch.randn(20, 8, 20, generator=gen, dtype=torch.float64)  # a view with padded rows
    assert torch.equal(ops.segment_contract(wider[:, :, :16], y, ptr),
                       ops.segment_contract(wider[:, :, :16].contiguous(), y, ptr))


@pytest.mark.parametrize("op", ["outer", "outer_gathered", "contract", "contract_gathered", "contract_scattered"])
def test_gradcheck_and_gradgradcheck(op):
    gen = torch.Generator().manual_seed(2)
    x, y, ptr, _ = random_case(7, 8, 5, torch.float64, gen, max_len=5)
    if op.startswith("contract"):
        x = torch.randn(7, 8, 5, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 6, (y.shape[0],), generator=gen)  # repeated and missing rows of 6
    fn = {
        "outer": ops.segment_outer,
        "outer_gathered": lambda x, y, ptr: ops.segment_outer(x, y, ptr, index),
        "contract": ops.segment_contract,
        "contract_gathered": lambda x, y, ptr: ops.segment_contract(x, y, ptr, y_index=index),
        "contract_scattered": lambda x, y, ptr: ops.segment_contract(x, y, ptr, out_index=index, num_out_rows=6),
    }[op]
    if op.endswith("gathered"):  # y is the 6-row table
        y = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    inputs = (x.requires_grad_(), y.requires_grad_(), ptr)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    x, y, ptr, _ = random_case(9, 4, 8, torch.float32, gen)
    blocks = torch.randn(9, 4, 8, generator=gen)
    torch.library.opcheck(torch.ops.jmp_ext.segment_outer.default, (x, y, ptr))
    torch.library.opcheck(torch.ops.jmp_ext.segment_contract.default, (blocks, y, ptr))
    index = torch.randint(0, 3, (x.shape[0],), generator=gen)
    torch.library.opcheck(torch.ops.jmp_ext.segment_outer_gathered.default, (x, y[:3].contiguous(), index, ptr))
    torch.library.opcheck(torch.ops.jmp_ext.segment_contract_gathered.default, (blocks, y[:3].contiguous(), index, ptr))
    torch.library.opcheck(torch.ops.jmp_ext.segment_contract_scattered.default, (blocks, y, ptr, index, 3))


def test_bitwise_identical_on_any_thread_count():
    gen = torch.Generator().manual_seed(4)
    x, y, ptr, _ = random_case(3000, 49, 8, torch.float32, gen, max_len=60)
    blocks = torch.randn(3000, 8, 49, generator=gen)
    index = torch.randint(0, 500, (x.shape[0],), generator=gen)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results.append((ops.segment_outer(x, y, ptr), ops.segment_contract(blocks, x, ptr),
                            ops.segment_outer(x, y[:500], ptr, index),
                            ops.segment_contract(blocks, x[:500], ptr, y_index=index),
                            # 8 and 49 out features: one owner of the out rows, then several
                            ops.segment_contract(blocks, x, ptr, out_index=index, num_out_rows=500),
                            ops.segment_contract(blocks.transpose(1, 2), y, ptr, out_index=index, num_out_rows=500)))
    finally:
        torch.set_num_threads(old)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


def test_int32_indices_give_the_int64_results():
    """y_index and out_index may be int32 (the model's interaction indices): same values, same
    gradients, bitwise."""
    gen = torch.Generator().manual_seed(8)
    x, y, ptr, _ = random_case(300, 8, 7, torch.float32, gen, max_len=20)
    blocks = torch.randn(300, 8, 7, generator=gen).requires_grad_()
    table = torch.randn(50, 7, generator=gen).requires_grad_()
    x.requires_grad_()
    index = torch.randint(0, 50, (x.shape[0],), generator=gen)
    results = []
    for index_dtype in (torch.int64, torch.int32):
        idx = index.to(index_dtype)
        outs = (ops.segment_outer(x, table, ptr, idx), ops.segment_contract(blocks, table, ptr, y_index=idx),
                ops.segment_contract(blocks, y, ptr, out_index=idx, num_out_rows=50))
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        results.append((*outs, *torch.autograd.grad(loss, (x, blocks, table))))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"y_index\[1\] = 50 is out of range for the rows of y = 50"):
        ops.segment_outer(x[:2], table, torch.tensor([0, 2]), torch.tensor([0, 50], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out_index\[0\] = -1 is negative"):
        ops.segment_contract(blocks[:1], y[:2], torch.tensor([0, 2]), out_index=torch.tensor([-1, 0], dtype=torch.int32),
                             num_out_rows=3)


def test_bad_inputs():
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"ptr\[0\] must be 0"):
        ops.segment_outer(x, y, torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment_contract(torch.randn(3, 3, 2), y, torch.tensor([0, 4, 2, 5]))
    with pytest.raises(ValueError, match=r"ptr\[-1\] must equal the number of source rows \(5\)"):
        ops.segment_outer(x, y, torch.tensor([0, 2, 9]))
    with pytest.raises(ValueError, match="x has 5 rows but y has 4"):
        ops.segment_outer(x, y[:4], torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="must share dtype"):
        ops.segment_outer(x, y.double(), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"x must be \[S=2, R, C=2\]"):
        ops.segment_contract(torch.randn(2, 3, 4), y, torch.tensor([0, 2, 5]))
    with pytest.raises(TypeError, match="ptr must be int64, got torch.int32"):
        ops.segment_outer(x, y, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"y_index\[3\] = 5 is out of range for the rows of y = 5"):
        ops.segment_outer(x, y, torch.tensor([0, 2, 5]), torch.tensor([0, 1, 4, 5, 2]))
    with pytest.raises(ValueError, match=r"y_index\[0\] = -1 is negative"):
        ops.segment_outer(x, y, torch.tensor([0, 5]), torch.tensor([-1, 1, 4, 0, 2]))
    with pytest.raises(ValueError, match="y_index has 4 entries but the source has 5 rows"):
        ops.segment_outer(x, y, torch.tensor([0, 5]), torch.tensor([0, 1, 4, 0]))
    blocks, ptr = torch.randn(2, 3, 2), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"y_index\[4\] = 5 is out of range for the rows of y = 5"):
        ops.segment_contract(blocks, y, ptr, y_index=torch.tensor([0, 1, 4, 0, 5]))
    with pytest.raises(ValueError, match=r"ptr\[-1\] must equal the number of source rows \(4\)"):
        ops.segment_contract(blocks, y, ptr, y_index=torch.tensor([0, 1, 4, 0]))
    with pytest.raises(ValueError, match=r"out_index\[2\] = 3 is out of range for the rows of out = 3"):
        ops.segment_contract(blocks, y, ptr, out_index=torch.tensor([0, 1, 3, 0, 2]), num_out_rows=3)
    with pytest.raises(ValueError, match=r"out_index\[1\] = -2 is negative"):
        ops.segment_contract(blocks, y, ptr, out_index=torch.tensor([0, -2, 1, 0, 2]), num_out_rows=3)
    with pytest.raises(ValueError, match="out_index has 4 entries but the source has 5 rows"):
        ops.segment_contract(blocks, y, ptr, out_index=torch.tensor([0, 1, 1, 0]), num_out_rows=3)
    # No rows at all: every out row is an empty sum.
    empty = ops.segment_contract(blocks, y[:0], torch.tensor([0, 0, 0]), out_index=torch.tensor([], dtype=torch.int64),
                                 num_out_rows=3)
    assert torch.equal(empty, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="out_index and num_out_rows go together"):
        ops.segment_contract(blocks, y, ptr, out_index=torch.tensor([0, 1, 1, 0, 0]))


_BOTH_BUILDS_SCRIPT = """
import sys, torch
import jmp_ext.ops as ops
torch.manual_seed(6)
results = []
for rows, cols in [(7, 8), (8, 7), (16, 7), (7, 16), (8, 16), (49, 8), (3, 5)]:
    lengths = torch.randint(0, 12, (200,))
    ptr = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    x, y = torch.randn(int(ptr[-1]), rows), torch.randn(int(ptr[-1]), cols)
    blocks = torch.randn(200, rows, cols)
    index = torch.randint(0, 30, (x.shape[0],))
    results.append([ops.segment_outer(x, y, ptr), ops.segment_contract(blocks, y, ptr),
                    ops.segment_contract(blocks, y, ptr, out_index=index, num_out_rows=30),
                    ops.segment_contract(blocks.double(), y.double(), ptr)])
torch.save({"isa": ops.build_info()["cpu_bilinear_isa"], "results": results}, sys.argv[1])
"""


def test_baseline_and_avx2_builds_agree(tmp_path):
    """The bilinear kernels are built for the baseline ISA and for AVX2 + FMA (chosen by the CPU):
    run both, the baseline one forced through JMP_EXT_CPU_ISA, and compare. FMA rounds each
    multiply-add once instead of twice, so float32 agrees to rounding, not bitwise."""
    import os
    import subprocess
    import sys

    runs = {}
    for forced in ("", "baseline"):
        env = dict(os.environ, JMP_EXT_CPU_ISA=forced)
        path = tmp_path / f"run{forced}.pt"
        subprocess.run([sys.executable, "-c", _BOTH_BUILDS_SCRIPT, str(path)], env=env, check=True)
        runs[forced] = torch.load(path, weights_only=True)
    assert runs["baseline"]["isa"] == "baseline"
    if runs[""]["isa"] != "avx2":
        pytest.skip("this CPU (or compiler) has no AVX2 + FMA build: only the baseline one runs")
    bad = subprocess.run([sys.executable, "-c", _BOTH_BUILDS_SCRIPT, str(tmp_path / "bad.pt")],
                         env=dict(os.environ, JMP_EXT_CPU_ISA="avx512"), capture_output=True, text=True)
    assert bad.returncode != 0 and "JMP_EXT_CPU_ISA must be unset, empty or 'baseline', got 'avx512'" in bad.stderr
    for native, baseline in zip(runs[""]["results"], runs["baseline"]["results"]):
        for a, b in zip(native, baseline):
            torch.testing.assert_close(a, b, **({} if a.dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(5)
    x, y, ptr, _ = random_case(300, 49, 8, dtype, gen, max_len=40)
    blocks = torch.randn(300, 8, 49, generator=gen, dtype=torch.float64).to(dtype)
    cuda = torch.device("cuda")
    tol = {"rtol": 1e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ops.segment_outer(x.to(cuda), y.to(cuda), ptr.to(cuda)).cpu(),
                               ops.segment_outer(x, y, ptr), **tol)
    torch.testing.assert_close(ops.segment_contract(blocks.to(cuda), x.to(cuda), ptr.to(cuda)).cpu(),
                               ops.segment_contract(blocks, x, ptr), **tol)
    stored_transposed = blocks.transpose(1, 2).contiguous().transpose(1, 2)  # read through strides
    torch.testing.assert_close(ops.segment_contract(stored_transposed.to(cuda), x.to(cuda), ptr.to(cuda)).cpu(),
                               ops.segment_contract(blocks, x, ptr), **tol)
    index = torch.randint(0, 50, (x.shape[0],), generator=gen)
    torch.testing.assert_close(ops.segment_outer(x.to(cuda), y[:50].to(cuda), ptr.to(cuda), index.to(cuda)).cpu(),
                               ops.segment_outer(x, y[:50], ptr, index), **tol)
    torch.testing.assert_close(ops.segment_contract(blocks.to(cuda), x[:50].to(cuda), ptr.to(cuda), y_index=index.to(cuda)).cpu(),
                               ops.segment_contract(blocks, x[:50], ptr, y_index=index), **tol)
    torch.testing.assert_close(ops.segment_contract(blocks.to(cuda), x.to(cuda), ptr.to(cuda), out_index=index.to(cuda),
                                                    num_out_rows=50).cpu(),
                               ops.segment_contract(blocks, x, ptr, out_index=index, num_out_rows=50), **tol)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment_outer(x[:5].to(cuda), y[:5].to(cuda), torch.tensor([0, 4, 2, 5], device=cuda))
