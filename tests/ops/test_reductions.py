"""jmp_ext.ops reductions against torch's own ops, the pure-torch twins and brute force."""

from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import jmp_ext.ops as ops
from jmp_ext.ops import reductions as red
from jmp_ext.ops import reference_reductions as ref

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
FEATURES = [1, 3, 7, 64]


def make_ptr(lengths, device="cpu"):
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)


def random_lengths(num_segments, gen, max_len=9):
    """Segment lengths with plenty of empty segments (about 1 in 5)."""
    lengths = torch.randint(0, max_len, (num_segments,), generator=gen)
    return lengths * (torch.rand(num_segments, generator=gen) > 0.2)


def random_src(rows, features, dtype, gen, device="cpu"):
    return torch.randn(rows, features, generator=gen, dtype=torch.float64).to(dtype).to(device)


def expected_segment(src, lengths, reduce):
    """torch.segment_reduce in float64 on the non-empty segments, 0 on the empty ones."""
    out = torch.segment_reduce(src.double(), reduce, lengths=lengths, axis=0, unsafe=True)
    return torch.where((lengths > 0).unsqueeze(1), out, 0.0).to(src.dtype)


# ---- forward values ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_segment_matches_torch_segment_reduce(dtype, features, reduce):
    gen = torch.Generator().manual_seed(features)
    lengths = random_lengths(200, gen)
    src = random_src(int(lengths.sum()), features, dtype, gen)
    out = getattr(ops, f"segment_{reduce}")(src, make_ptr(lengths))
    assert out.dtype == dtype and out.shape == (200, features)
    torch.testing.assert_close(out, expected_segment(src, lengths, reduce))
    torch.testing.assert_close(out, getattr(ref, f"segment_{reduce}")(src, make_ptr(lengths)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", FEATURES)
def test_scatter_sum_matches_index_add(dtype, features):
    gen = torch.Generator().manual_seed(features)
    index = torch.randint(0, 150, (1000,), generator=gen)
    index[index == 7] = 8  # an empty target
    src = random_src(1000, features, dtype, gen)
    expected = torch.zeros(150, features, dtype=torch.float64).index_add_(0, index, src.double())
    out = ops.scatter_sum(src, index, 150)
    torch.testing.assert_close(out, expected.to(dtype))
    assert torch.equal(out[7], torch.zeros(features, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_indexing_and_its_gradient_index_add(dtype):
    gen = torch.Generator().manual_seed(2)
    src = random_src(40, 6, dtype, gen).reshape(40, 2, 3).requires_grad_()
    index = torch.randint(0, 40, (500,), generator=gen)
    index[index == 5] = 6  # a row nobody picks: its gradient is 0
    out = ops.gather(src, index)
    assert torch.equal(out, ref.gather(src, index))
    grad = random_src(500, 6, dtype, gen).reshape(500, 2, 3)
    (grad_src,) = torch.autograd.grad(out, src, grad)
    expected = torch.zeros(40, 2, 3, dtype=torch.float64).index_add_(0, index, grad.double())
    torch.testing.assert_close(grad_src, expected.to(dtype))
    assert torch.equal(grad_src[5], torch.zeros(2, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [1, 3, 64])
def test_int32_row_indices_give_the_int64_results(dtype, features):
    """gather, scatter_* and the padded copies read int32 indices (the model's interaction
    indices) as int64."""
    gen = torch.Generator().manual_seed(features)
    index = torch.randint(0, 150, (1000,), generator=gen)
    src = random_src(1000, features, dtype, gen).requires_grad_()
    table = random_src(150, features, dtype, gen).requires_grad_()
    grad = random_src(1000, features, dtype, gen)
    slot = torch.randperm(150 * 9, generator=gen)[:1000]  # distinct (row, col) pairs
    results = []
    for index_dtype in (torch.int64, torch.int32):
        idx, row, col = index.to(index_dtype), (slot // 9).to(index_dtype), (slot % 9).to(index_dtype)
        padded = ops.ragged_to_padded(src, row, col, 150, 9)
        outs = (ops.scatter_sum(src, idx, 150), ops.scatter_mean(src, idx, 150), ops.gather(table, idx),
                padded, ops.padded_to_ragged(padded, row, col))
        grads = torch.autograd.grad(outs[2], table, grad)  # gather's backward: an int32 scatter
        results.append((*outs, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_gather_under_torch_compile_matches_eager():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(30, 4, generator=gen, requires_grad=True)
    index = torch.randint(0, 30, (200,), generator=gen)
    compiled = torch.compile(lambda s, i: ops.gather(s, i).square().sum(), backend="aot_eager", fullgraph=True)
    (grad_compiled,) = torch.autograd.grad(compiled(src, index), src)
    (grad_eager,) = torch.autograd.grad(ops.gather(src, index).square().sum(), src)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", FEATURES)
def test_scatter_mean_matches_scatter_reduce(dtype, features):
    gen = torch.Generator().manual_seed(features)
    index = torch.randint(0, 150, (1000,), generator=gen)
    index[index == 7] = 8
    src = random_src(1000, features, dtype, gen)
    full_index = index.unsqueeze(1).expand(-1, features)
    expected = torch.zeros(150, features, dtype=torch.float64).scatter_reduce(
        0, full_index, src.double(), "mean", include_self=False)
    torch.testing.assert_close(ops.scatter_mean(src, index, 150), expected.to(dtype))
    torch.testing.assert_close(ops.scatter_mean(src, index, 150), ref.scatter_mean(src, index, 150))


def test_scatter_is_a_stable_segment_sum():
    """The CPU scatter sums each target's rows in their original order: bitwise a segment sum."""
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, 300, (5000,), generator=gen)
    src = random_src(5000, 3, torch.float32, gen)
    sorted_index, perm = torch.sort(index, stable=True)
    ptr = make_ptr(torch.bincount(sorted_index, minlength=300))
    assert torch.equal(ops.scatter_sum(src, index, 300), ops.segment_sum(src[perm], ptr))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_the_cuda_scatters_csr_of_an_index(index_dtype):
    """The deterministic CUDA scatter's ptr and stable permutation come from pure torch
    (_index_to_csr_cuda), so they are checked here on the CPU: against bincount and a stable
    argsort, for int32 indices too (ptr int64, as the segment kernels take it), with the CPU
    kernel's message for a bad entry."""
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(0, 300, (5000,), generator=gen).to(index_dtype)
    ptr_, perm = red._index_to_csr_cuda(index, 301)  # (row 300 empty)
    assert ptr_.dtype == torch.int64
    assert torch.equal(ptr_, make_ptr(torch.bincount(index.long(), minlength=301)))
    assert torch.equal(perm, torch.from_numpy(index.numpy().argsort(kind="stable")))
    with pytest.raises(ValueError, match=r"index\[1\] = 301 is out of range for dim_size = 301"):
        red._index_to_csr_cuda(torch.tensor([0, 301, -1], dtype=index_dtype), 301)


def test_sum_runs_in_order_in_float32_for_bfloat16():
    """1000 ones: a bf16 running sum stalls at 256; a float32 accumulator gives 1000 exactly."""
    ones = torch.ones(1000, dtype=torch.bfloat16)
    assert ops.segment_sum(ones, make_ptr([1000])).item() == 1000
    assert ops.scatter_sum(ones, torch.zeros(1000, dtype=torch.int64), 1).item() == 1000
    assert ops.segment_mean(ones, make_ptr([1000])).item() == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", FEATURES)
def test_ragged_padded_round_trip(dtype, features):
    gen = torch.Generator().manual_seed(features)
    # GemNet-style: row = out sorted ascending, col = rank inside its row (out_agg).
    degrees = random_lengths(40, gen, max_len=6)
    row = torch.repeat_interleave(torch.arange(40), degrees)
    col = torch.cat([torch.arange(int(d)) for d in degrees])
    shuffle = torch.randperm(row.numel(), generator=gen)  # any item order works
    row, col = row[shuffle], col[shuffle]
    x = random_src(row.numel(), features, dtype, gen)
    padded = ops.ragged_to_padded(x, row, col, 40, 6)
    assert torch.equal(padded, ref.ragged_to_padded(x, row, col, 40, 6))
    assert torch.equal(ops.padded_to_ragged(padded, row, col), x)
    other = random_src(40 * 6, features, dtype, gen).reshape(40, 6, features)
    assert torch.equal(ops.padded_to_ragged(other, row, col), ref.padded_to_ragged(other, row, col))


def test_trailing_dims_and_1d():
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(10, 2, 3, generator=gen)
    ptr = make_ptr([4, 0, 6])
    torch.testing.assert_close(ops.segment_sum(src, ptr), ref.segment_sum(src, ptr))
    torch.testing.assert_close(ops.segment_max(src[:, 0, 0], ptr), ref.segment_max(src[:, 0, 0], ptr))
    index = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 1])
    torch.testing.assert_close(ops.scatter_mean(src, index, 4), ref.scatter_mean(src, index, 4))
    row, col = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    padded = ops.ragged_to_padded(src[:3], row, col, 2, 2)
    assert padded.shape == (2, 2, 2, 3)
    assert torch.equal(ops.padded_to_ragged(padded, row, col), src[:3])
    assert ops.ragged_to_padded(src[:3, 0, 0], row, col, 2, 2).shape == (2, 2)


def test_non_contiguous_inputs():
    src = torch.randn(6, 8)[:, ::2]
    ptr = make_ptr([2, 4])
    torch.testing.assert_close(ops.segment_sum(src, ptr), ref.segment_sum(src, ptr))
    index = torch.tensor([[0, 9], [1, 9], [1, 9], [0, 9], [2, 9], [2, 9]])[:, 0]
    torch.testing.assert_close(ops.scatter_sum(src, index, 3), ref.scatter_sum(src, index, 3))
    strided_ptr = torch.tensor([0, 7, 2, 7, 6, 7])[::2]
    torch.testing.assert_close(ops.segment_mean(src, strided_ptr), ref.segment_mean(src, ptr))
    row, col = index, torch.tensor([[0, 9], [0, 9], [1, 9], [1, 9], [0, 9], [1, 9]])[:, 0]
    padded = ops.ragged_to_padded(src, row, col, 3, 2)
    assert torch.equal(padded, ref.ragged_to_padded(src, row, col, 3, 2))
    assert torch.equal(ops.padded_to_ragged(padded.transpose(0, 1).contiguous().transpose(0, 1), row, col), src)


@pytest.mark.parametrize("features", [0, 3])
def test_empty_inputs(features):
    empty = torch.zeros(0, features)
    none = torch.zeros(0, dtype=torch.int64)
    for reduce in ("sum", "mean", "max"):
        segment = getattr(ops, f"segment_{reduce}")
        assert segment(empty, make_ptr([])).shape == (0, features)
        assert torch.equal(segment(empty, make_ptr([0, 0])), torch.zeros(2, features))
    assert torch.equal(ops.scatter_sum(empty, none, 4), torch.zeros(4, features))
    assert torch.equal(ops.scatter_mean(empty, none, 0), torch.zeros(0, features))
    assert torch.equal(ops.ragged_to_padded(empty, none, none, 3, 2), torch.zeros(3, 2, features))
    assert ops.padded_to_ragged(torch.zeros(3, 2, features), none, none).shape == (0, features)
    assert ops.ragged_to_padded(empty, none, none, 0, 5).shape == (0, 5, features)


# ---- max: ties, NaN, infinities ----


def test_segment_max_ties_send_the_gradient_to_the_first():
    src = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, 2.0], [-1.0, -2.0]], requires_grad=True)
    out = ops.segment_max(src, make_ptr([3, 0, 1]))
    assert torch.equal(out.detach(), torch.tensor([[3.0, 5.0], [0.0, 0.0], [-1.0, -2.0]]))
    out.sum().backward()
    assert torch.equal(src.grad, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))


def test_segment_max_nan_and_infinity():
    inf, nan = float("inf"), float("nan")
    src = torch.tensor([-inf, -inf, 1.0, nan, 2.0, inf, 3.0])
    out = ops.segment_max(src, make_ptr([2, 3, 2]))
    assert out[0].item() == -inf
    assert out[1].isnan()
    assert out[2].item() == inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [1, 2, 3, 4, 37])
def test_segment_max_picks_the_first_maximum_or_nan_per_feature(dtype, features):
    """Values from a small set (many ties, -0 and +0 among them), with -inf and NaN mixed in;
    1-4 features take the two-pass kernel (blocks of rows plus a remainder: lengths up to 43),
    37 leaves a remainder after the vectorised part of the other one. Where each feature's
    gradient goes is checked against a loop over the rows: the first maximal row, or the first
    NaN."""
    gen = torch.Generator().manual_seed(features)
    lengths = [1, 0, 5, 9, 2, 17, 43, 8]
    values = torch.tensor([-float("inf"), -1.0, -0.0, 0.0, 2.0, float("nan")])
    pick = torch.multinomial(torch.tensor([1.0, 3.0, 3.0, 3.0, 1.0, 0.3]), sum(lengths) * features, True,
                             generator=gen)
    src = values[pick].reshape(-1, features).to(dtype).requires_grad_()
    out = ops.segment_max(src, make_ptr(lengths))
    out.sum().backward()
    expected_out = torch.zeros(len(lengths), features, dtype=dtype)
    expected_grad = torch.zeros_like(src)
    start = 0
    for s, length in enumerate(lengths):
        for f in range(features):
            column = src.detach()[start : start + length, f].tolist()
            if not column:
                continue
            nans = [k for k, v in enumerate(column) if v != v]
            first = nans[0] if nans else column.index(max(column))
            expected_out[s, f] = column[first]
            expected_grad[start + first, f] = 1
        start += length
    torch.testing.assert_close(out.detach(), expected_out, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(src.grad, expected_grad)


# ---- gradients (float64) ----


def _grad_cases(device="cpu"):
    """name -> (fn, x): small float64 cases of every op, inputs on `device`."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([3, 0, 4, 1, 0, 2])
    ptr = make_ptr(lengths, device)
    index = torch.tensor([4, 0, 0, 2, 4, 4, 1, 0, 2, 4], device=device)
    row = torch.tensor([0, 2, 2, 1, 0], device=device)
    col = torch.tensor([1, 0, 2, 0, 0], device=device)
    # Max: distinct values so that the argmax (and the derivative) is well defined nearby.
    distinct = (torch.randperm(30, generator=gen).double().reshape(10, 3) / 3).to(device)
    distinct.requires_grad_()
    def _double(*shape, gen):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    return {
        "segment_sum": (lambda x: ops.segment_sum(x, ptr), _double(10, 3, gen=gen)),
        "segment_mean": (lambda x: ops.segment_mean(x, ptr), _double(10, 3, gen=gen)),
        "segment_max": (lambda x: ops.segment_max(x, ptr), distinct),
        "scatter_sum": (lambda x: ops.scatter_sum(x, index, 6), _double(10, 3, gen=gen)),
        "scatter_mean": (lambda x: ops.scatter_mean(x, index, 6), _double(10, 3, gen=gen)),
        "ragged_to_padded": (lambda x: ops.ragged_to_padded(x, row, col, 3, 3), _double(5, 2, gen=gen)),
        "padded_to_ragged": (lambda x: ops.padded_to_ragged(x, row, col), _double(3, 3, 2, gen=gen)),
        "gather": (lambda x: red._gather(x, index), _double(5, 3, gen=gen)),
        "segment_broadcast": (lambda x: red._segment_broadcast(x, ptr, 10), _double(6, 3, gen=gen)),
    }


@pytest.mark.parametrize("name", list(_grad_cases()))
def test_gradcheck_and_gradgradcheck(name):
    fn, x = _grad_cases()[name]
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


def test_second_derivative_through_a_nonlinear_chain():
    """energy = sum(segment_sum(tanh(scatter(x)))^2): check grad-of-grad against the twins."""
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, 6, (20,), generator=gen)
    ptr = make_ptr([2, 1, 3])

    def energy(x, lib):
        return (lib.segment_sum(torch.tanh(lib.scatter_sum(x, index, 6)), ptr) ** 2).sum()

    results = []
    for lib in (ops, ref):
        x = torch.randn(20, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64,
                        requires_grad=True)
        (force,) = torch.autograd.grad(energy(x, lib), x, create_graph=True)
        (curvature,) = torch.autograd.grad((force * torch.arange(60.0).reshape(20, 3)).sum(), x)
        results.append((force.detach(), curvature))
    torch.testing.assert_close(results[0], results[1])


# ---- torch.library checks (schema, fake kernels, autograd registration) ----


def _opcheck_cases():
    gen = torch.Generator().manual_seed(4)
    ptr = make_ptr([3, 0, 2])
    index = torch.tensor([1, 0, 1, 3, 3])
    row, col = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    x = torch.randn(5, 3, generator=gen, requires_grad=True)
    return [
        (torch.ops.jmp_ext.segment_reduce.default, (x, ptr, "sum")),
        (torch.ops.jmp_ext.segment_reduce.default, (x, ptr, "mean")),
        (torch.ops.jmp_ext.segment_max.default, (x, ptr)),
        (torch.ops.jmp_ext.segment_broadcast.default, (x[:3], ptr, 5)),
        (torch.ops.jmp_ext.scatter_reduce.default, (x, index, 4, "sum", True)),
        (torch.ops.jmp_ext.scatter_reduce.default, (x, index, 4, "mean", True)),
        (torch.ops.jmp_ext.gather.default, (x, index)),
        (torch.ops.jmp_ext.ragged_to_padded.default, (x[:3], row, col, 2, 2)),
        (torch.ops.jmp_ext.padded_to_ragged.default, (x[:4].reshape(2, 2, 3), row, col)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---- determinism ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [3, 64])  # the CPU scatter splits rows across threads from F = 32
def test_bitwise_identical_on_any_thread_count(dtype, features):
    gen = torch.Generator().manual_seed(7)
    index = torch.randint(0, 2000, (200_000,), generator=gen)
    index[:50_000] = 3  # a hub target: one segment much longer than the rest
    src = random_src(200_000, features, dtype, gen)
    sorted_index, perm = torch.sort(index, stable=True)
    ptr = make_ptr(torch.bincount(sorted_index, minlength=2000))
    row, col = torch.arange(50_000) // 10, torch.arange(50_000) % 10

    def run():
        return [ops.scatter_sum(src, index, 2000), ops.scatter_mean(src, index, 2000),
                ops.segment_sum(src[perm], ptr), ops.segment_max(src[perm], ptr),
                ops.ragged_to_padded(src[:50_000], row, col, 5000, 10)]

    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---- bad inputs: clear errors, nothing written out of bounds ----


def test_bad_index_values():
    src = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"index\[2\] = -1 is negative"):
        ops.scatter_sum(src, torch.tensor([0, 1, -1, 0]), 3)
    with pytest.raises(ValueError, match=r"index\[3\] = 3 is out of range for dim_size = 3"):
        ops.scatter_mean(src, torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="out of range"):
        red._gather(src, torch.tensor([0, 4]))
    # With no features nothing moves, but the indices are checked all the same.
    with pytest.raises(ValueError, match=r"index\[1\] = 4 is out of range for the number of source rows"):
        red._gather(src[:, :0], torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"index\[3\] = 3 is out of range for dim_size = 3"):
        ops.scatter_sum(src[:, :0], torch.tensor([0, 1, 2, 3]), 3)
    # The same checks read int32 indices.
    with pytest.raises(ValueError, match=r"index\[2\] = -1 is negative"):
        ops.scatter_sum(src, torch.tensor([0, 1, -1, 0], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"index\[1\] = 4 is out of range for the number of source rows = 4"):
        red._gather(src, torch.tensor([0, 4], dtype=torch.int32))
    int32 = {"dtype": torch.int32}
    with pytest.raises(ValueError, match="appears twice"):
        ops.ragged_to_padded(src, torch.tensor([0, 1, 1, 1], **int32), torch.tensor([0, 0, 1, 0], **int32), 2, 2)
    with pytest.raises(ValueError, match=r"col\[3\] = 5 is out of range"):
        ops.ragged_to_padded(src, torch.tensor([0, 1, 0, 1], **int32), torch.tensor([0, 0, 1, 5], **int32), 2, 2)


def test_bad_ptr():
    src = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"ptr\[0\] must be 0"):
        ops.segment_sum(src, torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment_mean(src, torch.tensor([0, 4, 2, 5]))
    with pytest.raises(ValueError, match=r"ptr\[-1\] must equal the number of source rows \(5\)"):
        ops.segment_max(src, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"ptr\[-1\] must equal"):
        ops.segment_sum(src, torch.tensor([0, 2, 9]))
    with pytest.raises(ValueError, match="at least|S \\+ 1"):
        ops.segment_sum(src, torch.zeros(0, dtype=torch.int64))


def test_bad_padded_index():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"\(row, col\) = \(1, 0\) appears twice, at items 0 and 2"):
        ops.ragged_to_padded(x, torch.tensor([1, 0, 1]), torch.tensor([0, 0, 0]), 2, 2)
    with pytest.raises(ValueError, match=r"col\[1\] = 2 is out of range for num_cols = 2"):
        ops.ragged_to_padded(x, torch.tensor([1, 0, 1]), torch.tensor([0, 2, 1]), 2, 2)
    with pytest.raises(ValueError, match=r"row\[0\] = -1 is negative"):
        ops.padded_to_ragged(torch.zeros(2, 2, 2), torch.tensor([-1, 0, 1]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="appears twice"):
        ops.padded_to_ragged(torch.zeros(2, 2, 2), torch.tensor([0, 0]), torch.tensor([1, 1]))


def test_bad_shapes_and_dtypes():
    src = torch.randn(4, 3)
    index = torch.tensor([0, 1, 1, 0])
    with pytest.raises(TypeError, match="index must be int64 or int32, got torch.int16"):
        ops.scatter_sum(src, index.short(), 2)
    with pytest.raises(TypeError, match="ptr must be int64, got torch.int32"):
        ops.segment_sum(src, make_ptr([4]).int())
    with pytest.raises(TypeError, match="row must be int64 or int32, got torch.int16"):
        ops.ragged_to_padded(src, index.short(), index, 2, 2)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        ops.scatter_sum(src.half(), index, 2)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16"):
        ops.segment_sum(index, make_ptr([4]))
    with pytest.raises(ValueError, match="3 entries but the source has 4 rows"):
        ops.scatter_sum(src, index[:3], 2)
    with pytest.raises(ValueError, match="dim_size must be >= 0"):
        ops.scatter_sum(src, index, -1)
    with pytest.raises(ValueError, match="1-D"):
        ops.segment_sum(src, make_ptr([4]).reshape(1, 2))
    with pytest.raises(ValueError, match="x has 4 rows but row/col have 3 entries"):
        ops.ragged_to_padded(src, index[:3], index[:3], 2, 2)
    with pytest.raises(ValueError, match="scalar"):
        ops.segment_sum(torch.tensor(1.0), make_ptr([1]))


# ---- CUDA against the CPU ----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", FEATURES)
def test_cuda_matches_cpu(dtype, features):
    gen = torch.Generator().manual_seed(features)
    lengths = random_lengths(500, gen, max_len=40)
    ptr = make_ptr(lengths)
    src = random_src(int(lengths.sum()), features, dtype, gen)
    index = torch.randint(0, 300, (src.shape[0],), generator=gen)
    row, col = torch.arange(src.shape[0]) // 50, torch.arange(src.shape[0]) % 50
    cuda = torch.device("cuda")
    for reduce in ("sum", "mean", "max"):
        segment = getattr(ops, f"segment_{reduce}")
        torch.testing.assert_close(segment(src.to(cuda), ptr.to(cuda)).cpu(), segment(src, ptr))
    for deterministic in (True, False):
        for scatter in (ops.scatter_sum, ops.scatter_mean):
            torch.testing.assert_close(
                scatter(src.to(cuda), index.to(cuda), 300, deterministic=deterministic).cpu(),
                scatter(src, index, 300))
    rows = int(row.max()) + 1
    padded = ops.ragged_to_padded(src.to(cuda), row.to(cuda), col.to(cuda), rows, 50)
    assert torch.equal(padded.cpu(), ops.ragged_to_padded(src, row, col, rows, 50))
    assert torch.equal(ops.padded_to_ragged(padded, row.to(cuda), col.to(cuda)).cpu(), src)


@pytest.mark.cuda
def test_cuda_segment_is_deterministic_and_checks_indices():
    cuda = torch.device("cuda")
    src = torch.randn(100_000, 3, device=cuda)
    index = torch.randint(0, 100, (100_000,), device=cuda)
    assert torch.equal(ops.scatter_sum(src, index, 100), ops.scatter_sum(src, index, 100))
    with pytest.raises(ValueError, match="index"):
        ops.scatter_sum(src, index, 50)
    with pytest.raises(ValueError, match="ptr"):
        ops.segment_sum(src, torch.tensor([0, 5, 3, 100_000], device=cuda))
    with pytest.raises(ValueError, match="appears twice"):
        ops.ragged_to_padded(src[:2], torch.zeros(2, dtype=torch.int64, device=cuda),
                             torch.zeros(2, dtype=torch.int64, device=cuda), 1, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(_grad_cases()))
def test_cuda_gradcheck_and_gradgradcheck(name):
    fn, x = _grad_cases("cuda")[name]
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.cuda
@pytest.mark.parametrize("features", [1, 3, 31, 32, 64, 256])
def test_cuda_long_segments_match_cpu(features):
    """Hub segments (many rows in flight per warp for small F); F >= 32 runs the CPU's
    sequential order, so float32 sums are bitwise equal there."""
    gen = torch.Generator().manual_seed(features)
    lengths = torch.tensor([0, 1, 5000, 33, 0, 64, 2])
    ptr = make_ptr(lengths)
    src = random_src(int(lengths.sum()), features, torch.float32, gen)
    for reduce in ("sum", "mean", "max"):
        segment = getattr(ops, f"segment_{reduce}")
        got = segment(src.cuda(), ptr.cuda()).cpu()
        if features >= 32 or reduce == "max":
            assert torch.equal(got, segment(src, ptr)), reduce
        else:
            torch.testing.assert_close(got, segment(src, ptr))


@pytest.mark.cuda
def test_cuda_segment_max_ties_and_nan_pick_the_first():
    inf, nan = float("inf"), float("nan")
    # 100 equal rows: the warp's lanes each see a tie; the first row must win.
    src = torch.cat([torch.full((100, 1), 2.0), torch.tensor([[-inf], [-inf], [1.0], [nan], [2.0],
                                                             [nan], [inf], [3.0]])])
    ptr = make_ptr([100, 2, 4, 2])
    for x in (src, src.repeat(1, 40)):  # narrow and wide kernels
        x_cuda = x.cuda().requires_grad_()
        x_cpu = x.clone().requires_grad_()
        out_cuda, out_cpu = ops.segment_max(x_cuda, ptr.cuda()), ops.segment_max(x_cpu, ptr)
        torch.testing.assert_close(out_cuda.cpu(), out_cpu, equal_nan=True, rtol=0, atol=0)
        out_cuda.nan_to_num(0.0, 0.0, 0.0).sum().backward()
        out_cpu.nan_to_num(0.0, 0.0, 0.0).sum().backward()
        assert torch.equal(x_cuda.grad.cpu(), x_cpu.grad)
        assert x_cpu.grad[0].sum() == x.shape[1] and x_cpu.grad[1:100].sum() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("features", [0, 3])
def test_cuda_empty_inputs(features):
    empty = torch.zeros(0, features, device="cuda")
    none = torch.zeros(0, dtype=torch.int64, device="cuda")
    for reduce in ("sum", "mean", "max"):
        segment = getattr(ops, f"segment_{reduce}")
        assert segment(empty, make_ptr([], "cuda")).shape == (0, features)
        assert torch.equal(segment(empty, make_ptr([0, 0], "cuda")).cpu(), torch.zeros(2, features))
    for deterministic in (True, False):
        assert torch.equal(ops.scatter_sum(empty, none, 4, deterministic=deterministic).cpu(),
                           torch.zeros(4, features))
    assert torch.equal(ops.ragged_to_padded(empty, none, none, 3, 2).cpu(), torch.zeros(3, 2, features))
    assert ops.padded_to_ragged(torch.zeros(3, 2, features, device="cuda"), none, none).shape == (0, features)


@pytest.mark.cuda
def test_cuda_bad_indices_raise_the_cpu_messages():
    cuda = torch.device("cuda")
    src = torch.randn(4, 3)
    cases = [
        lambda d: red._gather(src.to(d), torch.tensor([0, 9, 1], device=d)),
        lambda d: ops.segment_sum(src.to(d), torch.tensor([1, 2, 4], device=d)),
        lambda d: ops.segment_sum(src.to(d), torch.tensor([0, 3, 2, 4], device=d)),
        lambda d: ops.segment_sum(src.to(d), torch.tensor([0, 2, 3], device=d)),
        lambda d: red._segment_broadcast(src[:2].to(d), torch.tensor([0, 3, 2], device=d), 2),
        lambda d: ops.ragged_to_padded(src.to(d), torch.tensor([0, 1, 0, 1], device=d),
                                       torch.tensor([0, 0, 1, 5], device=d), 2, 2),
        lambda d: ops.ragged_to_padded(src.to(d), torch.tensor([0, 1, 1, 1], device=d),
                                       torch.tensor([0, 0, 1, 0], device=d), 2, 2),
        lambda d: ops.padded_to_ragged(torch.zeros(2, 2, 3, device=d), torch.tensor([0, -1], device=d),
                                       torch.tensor([0, 0], device=d)),
        lambda d: red._gather(src[:, :0].to(d), torch.tensor([0, 9, 1], device=d)),
        # int32 indices: the CUDA side reads the bad entry back at its own width
        lambda d: red._gather(src.to(d), torch.tensor([0, 9, 1], dtype=torch.int32, device=d)),
        lambda d: ops.ragged_to_padded(src.to(d), torch.tensor([0, 1, 0, 1], dtype=torch.int32, device=d),
                                       torch.tensor([0, 0, 1, 5], dtype=torch.int32, device=d), 2, 2),
    ]
    for deterministic in (True, False):
        cases += [
            lambda d, det=deterministic: ops.scatter_sum(
                src.to(d), torch.tensor([0, 1, -1, 0], device=d), 3, deterministic=det),
            lambda d, det=deterministic: ops.scatter_mean(
                src.to(d), torch.tensor([0, 1, 2, 3], device=d), 3, deterministic=det),
            # no features: nothing to move, the indices are checked all the same
            lambda d, det=deterministic: ops.scatter_sum(
                src[:, :0].to(d), torch.tensor([0, 1, 7, 0], device=d), 3, deterministic=det),
        ]
    for case in cases:
        with pytest.raises(ValueError) as on_cpu:
            case(torch.device("cpu"))
        with pytest.raises(ValueError) as on_cuda:
            case(cuda)
        assert str(on_cuda.value) == str(on_cpu.value)


@pytest.mark.parametrize("op", ["scatter_sum", "scatter_mean", "segment_contract"])
def test_cpu_scatter_peak_memory_is_its_output(op):
    """A float32 scatter onto 512 MB of output rows accumulates in them: the process's peak
    memory grows by about the output, not twice it (a private accumulator the size of the
    output once doubled it). Measured in a fresh process, by its VmHWM (its peak resident
    memory; ru_maxrss would carry over the pytest process's, which forked it)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak resident memory from /proc (Linux)")
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch
        from jmp_ext.ops import reductions as red
        def peak_kb():
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0])
        rows, width = 2**19, 256  # 512 MB of float32
        index = torch.tensor([0, rows - 1])
        def run(rows):
            if "{op}" == "segment_contract":
                return red.segment_contract(torch.ones(1, width, 1), torch.ones(2, 1), torch.tensor([0, 2]),
                                            out_index=index.clamp(max=rows - 1), num_out_rows=rows)
            return red.{op}(torch.ones(2, width), index.clamp(max=rows - 1), rows)
        run(4)  # (libraries loaded, thread pools started)
        before = peak_kb()
        out = run(rows)
        grown = peak_kb() - before
        assert out.shape == (rows, width) and out[0].eq(1).all() and out[1:-1].eq(0).all(), "wrong result"
        print(grown * 1024 / out.numel() / out.element_size())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 0.9 < float(result.stdout) < 1.3  # (peak growth / output bytes; 2.0 with the copy)
