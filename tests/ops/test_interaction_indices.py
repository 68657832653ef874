"""jmp_ext.ops triplets / mixed_triplets / quadruplets against three independent references:
the index tensors the real JMP code produced (fixtures), a definitional brute force written with
Python loops, and the vectorised pure-torch twin (reference_interaction_indices)."""

from pathlib import Path

import pytest
import torch

from jmp_ext.ops import mixed_triplets, quadruplets, triplets
from jmp_ext.ops import reference_interaction_indices as ref

FIXTURES = Path("/work/shared/fixtures/jmp_ref")
CASES = ["oc20_slab", "ani_molecules"]


# ---- helpers ----


def _graph(d: dict) -> dict:
    return {"edge_index": d["edge_index"], "cell_offset": d["cell_offset"]}


def _pairs(idx: dict) -> set:
    return set(zip(idx["in"].long().tolist(), idx["out"].long().tolist()))


def _ranks(out: torch.Tensor) -> torch.Tensor:
    """out_agg by definition: i - (first position with the same out), for a sorted `out`."""
    out = out.long()
    first = torch.searchsorted(out, out, right=False)
    return torch.arange(out.numel()) - first


def _assert_grouped(idx: dict) -> None:
    out = idx["out"]
    assert out.dtype == torch.int64 and idx["out_agg"].dtype == torch.int64
    assert torch.all(out[1:] >= out[:-1]), "out must be sorted"
    torch.testing.assert_close(idx["out_agg"], _ranks(out), rtol=0, atol=0)


def _quad_set(q: dict) -> set:
    """Quadruplets as (d->b, b->a, b->a of the output triplet, c->a) edge tuples."""
    tin = q["trip_in_to_quad"].long()
    tout = q["trip_out_to_quad"].long()
    return set(
        zip(
            q["triplet_in"]["in"].long()[tin].tolist(),
            q["triplet_in"]["out"].long()[tin].tolist(),
            q["triplet_out"]["in"].long()[tout].tolist(),
            q["triplet_out"]["out"].long()[tout].tolist(),
            q["out"].long().tolist(),
        )
    )


def _map(result: dict, fn) -> dict:
    """fn applied to every tensor of a (possibly nested) index dict."""
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in result.items()}


def _assert_same(a: dict, b: dict) -> None:
    """Bitwise equality of two (possibly nested) index dicts."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    data = torch.load(FIXTURES / f"{request.param}.pt", weights_only=True)
    main = _graph(data["indices"]["main_sym"])
    graphs = {"main": main, **{k: _graph(data["graphs"][k]) for k in ("a2ee2a", "qint")}}
    return data["inputs"]["pos"].shape[0], graphs, data["indices"]


# ---- the JMP fixtures ----


@pytest.mark.parametrize("impl", ["jmp_ext", "reference"])
@pytest.mark.parametrize(
    "name, build",
    [
        ("trip_e2e", lambda ops, g, n: ops.triplets(g["main"], n)),
        ("trip_a2e", lambda ops, g, n: ops.mixed_triplets(g["a2ee2a"], g["main"], n)),
        ("trip_e2a", lambda ops, g, n: ops.mixed_triplets(g["main"], g["a2ee2a"], n)),
        ("quad/triplet_in", lambda ops, g, n: ops.quadruplets(g["main"], g["qint"], n)["triplet_in"]),
        ("quad/triplet_out", lambda ops, g, n: ops.quadruplets(g["main"], g["qint"], n)["triplet_out"]),
    ],
)
def test_triplets_match_fixture(case, impl, name, build):
    num_atoms, graphs, indices = case
    ops = ref if impl == "reference" else __import__("jmp_ext.ops", fromlist=["ops"])
    got = build(ops, graphs, num_atoms)
    expected = indices
    for part in name.split("/"):
        expected = expected[part]
    assert _pairs(got) == _pairs(expected)
    assert len(got["in"]) == len(expected["in"])  # no duplicates either side
    torch.testing.assert_close(got["out"], expected["out"].long(), rtol=0, atol=0)
    if "out_agg" in got:
        _assert_grouped(got)
    # Inside an out group the reference orders in edges by their source atom.
    in_graph = graphs["qint"] if name == "quad/triplet_out" else (
        graphs["a2ee2a"] if name == "trip_a2e" else graphs["main"]
    )
    source = in_graph["edge_index"][0]
    torch.testing.assert_close(source[got["in"]], source[expected["in"].long()], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["jmp_ext", "reference"])
def test_quadruplets_match_fixture(case, impl):
    num_atoms, graphs, indices = case
    fn = ref.quadruplets if impl == "reference" else quadruplets
    got = fn(graphs["main"], graphs["qint"], num_atoms)
    expected = indices["quad"]
    assert len(got["out"]) == len(expected["out"])
    assert _quad_set(got) == _quad_set(expected)
    torch.testing.assert_close(got["out"], expected["out"].long(), rtol=0, atol=0)
    _assert_grouped(got)


# ---- random graphs: brute force and the torch twin ----


def _random_graph(generator, num_atoms, num_pairs, max_shift, sorted_by_target=False):
    """A symmetric periodic graph: every edge with its reverse (negated shift), self-images
    (s == t, shift != 0), repeated atom pairs through different images, isolated atoms; edges
    shuffled unless sorted_by_target."""
    if num_atoms == 0 or num_pairs == 0:
        return {"edge_index": torch.zeros(2, 0, dtype=torch.int64),
                "cell_offset": torch.zeros(0, 3, dtype=torch.int32)}
    connected = max(1, num_atoms - num_atoms // 4)  # the last quarter has no neighbours
    s = torch.randint(connected, (num_pairs,), generator=generator)
    t = torch.randint(connected, (num_pairs,), generator=generator)
    shift = torch.randint(-max_shift, max_shift + 1, (num_pairs, 3), generator=generator)
    # No (i, i, 0) self loops; duplicate (s, t, shift) keys are removed, as in a radius graph.
    shift[(s == t) & (shift == 0).all(1), 0] = 1
    key = torch.stack([s, t, *shift.T], 1)
    key = torch.cat([key, torch.stack([t, s, *(-shift).T], 1)])
    key = torch.unique(key, dim=0)
    key = key[torch.randperm(len(key), generator=generator)]
    if sorted_by_target:
        key = key[torch.sort(key[:, 1], stable=True).indices]
    return {"edge_index": key[:, :2].T.contiguous(), "cell_offset": key[:, 2:].to(torch.int32)}


def _subgraph(generator, graph, fraction):
    keep = torch.rand(graph["edge_index"].shape[1], generator=generator) < fraction
    return {"edge_index": graph["edge_index"][:, keep], "cell_offset": graph["cell_offset"][keep]}


def _brute_triplets(graph_in, graph_out, mode):
    """Definition, one pair at a time: mode 'same', 'target' or 'outedge'."""
    s_in, t_in = graph_in["edge_index"].tolist()
    s_out, t_out = graph_out["edge_index"].tolist()
    off_in, off_out = graph_in["cell_offset"].tolist(), graph_out["cell_offset"].tolist()
    result = {"in": [], "out": [], "out_agg": []}
    for o in range(len(s_out)):
        pivot = s_out[o] if mode == "outedge" else t_out[o]
        found = [i for i in range(len(s_in)) if t_in[i] == pivot]
        found.sort(key=lambda i: (s_in[i], i))
        rank = 0
        for i in found:
            if mode == "same":
                closes = i == o
            elif mode == "target":
                closes = s_in[i] == s_out[o] and off_in[i] == off_out[o]
            else:
                closes = s_in[i] == t_out[o] and all(a + b == 0 for a, b in zip(off_in[i], off_out[o]))
            if not closes:
                result["in"].append(i)
                result["out"].append(o)
                result["out_agg"].append(rank)
                rank += 1
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in result.items()}


def _brute_quadruplets(main, qint, tin, tout):
    s = main["edge_index"][0].tolist()
    off_main, off_qint = main["cell_offset"].tolist(), qint["cell_offset"].tolist()
    result = {"out": [], "trip_in_to_quad": [], "trip_out_to_quad": [], "out_agg": []}
    rank = {}
    for t, (ba, ca) in enumerate(zip(tout["in"].tolist(), tout["out"].tolist())):
        for j, (db, ba_in) in enumerate(zip(tin["in"].tolist(), tin["out"].tolist())):
            net = [x + y - z for x, y, z in zip(off_main[db], off_qint[ba], off_main[ca])]
            if ba_in != ba or (s[db] == s[ca] and net == [0, 0, 0]):
                continue
            result["out"].append(ca)
            result["trip_out_to_quad"].append(t)
            result["trip_in_to_quad"].append(j)
            result["out_agg"].append(rank.get(ca, 0))
            rank[ca] = rank.get(ca, 0) + 1
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in result.items()}


RANDOM = [  # (num_atoms, num_pairs, max_shift)
    (0, 0, 0),
    (5, 0, 0),
    (1, 6, 2),  # one atom, only self-images
    (7, 30, 1),
    (12, 60, 0),  # non-periodic
    (20, 120, 2),  # many images
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_atoms, num_pairs, max_shift", RANDOM)
def test_random_graphs_match_brute_force_and_twin(seed, num_atoms, num_pairs, max_shift):
    generator = torch.Generator().manual_seed(seed)
    main = _random_graph(generator, num_atoms, num_pairs, max_shift)
    qint = _subgraph(generator, main, 0.5)
    other = _random_graph(generator, num_atoms, num_pairs // 2, max_shift, sorted_by_target=True)

    got = triplets(main, num_atoms)
    _assert_same(got, _brute_triplets(main, main, "same"))
    _assert_same(got, ref.triplets(main, num_atoms))
    for graph_in, graph_out in [(main, other), (other, main), (main, qint), (qint, main)]:
        for to_outedge, mode in [(False, "target"), (True, "outedge")]:
            got = mixed_triplets(graph_in, graph_out, num_atoms, to_outedge)
            _assert_same(got, _brute_triplets(graph_in, graph_out, mode))
            _assert_same(got, ref.mixed_triplets(graph_in, graph_out, num_atoms, to_outedge))

    got = quadruplets(main, qint, num_atoms)
    _assert_same(got["triplet_in"], {k: v for k, v in mixed_triplets(
        main, qint, num_atoms, True).items() if k != "out_agg"})
    _assert_same(got["triplet_out"], {k: v for k, v in mixed_triplets(
        qint, main, num_atoms).items() if k != "out_agg"})
    brute = _brute_quadruplets(main, qint, got["triplet_in"], got["triplet_out"])
    _assert_same({k: got[k] for k in brute}, brute)
    _assert_same(got, ref.quadruplets(main, qint, num_atoms))


def test_cell_offset_dtypes_are_accepted():
    generator = torch.Generator().manual_seed(3)
    main = _random_graph(generator, 9, 40, 1)
    expected = mixed_triplets(main, main, 9)
    for dtype in (torch.int8, torch.int16, torch.int64):
        graph = {**main, "cell_offset": main["cell_offset"].to(dtype)}
        _assert_same(mixed_triplets(graph, graph, 9), expected)
    # int64 offsets are checked against both ends of int32 (abs(-2**63) is negative).
    for bound, fits in ((-2**31, True), (2**31 - 1, True), (-2**31 - 1, False), (2**31, False), (-2**63, False)):
        offset = main["cell_offset"].to(torch.int64)
        offset[0, 1] = bound
        graph = {**main, "cell_offset": offset}
        if fits:
            assert mixed_triplets(graph, graph, 9)["in"].numel() > 0
        else:
            with pytest.raises(ValueError, match="outside the int32 range"):
                mixed_triplets(graph, graph, 9)


def test_deterministic_across_thread_counts():
    generator = torch.Generator().manual_seed(4)
    main = _random_graph(generator, 400, 6000, 1)  # > 2 * grain out edges: several chunks
    qint = _subgraph(generator, main, 0.3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            results.append((triplets(main, 400), mixed_triplets(main, qint, 400, True),
                            quadruplets(main, qint, 400), quadruplets(main, qint, 400, index_dtype=torch.int32)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            _assert_same(a, b)


def _assert_int32_twin(got: dict, expected: dict) -> None:
    """got: the int32 result of an op whose int64 result is `expected` (same values, same order)."""
    assert _map(got, lambda t: t.dtype) == _map(expected, lambda t: torch.int32)
    _assert_same(_map(got, torch.Tensor.long), expected)


@pytest.mark.parametrize("num_atoms, num_pairs, max_shift", RANDOM)
def test_int32_outputs_hold_the_int64_values(num_atoms, num_pairs, max_shift):
    generator = torch.Generator().manual_seed(7)
    main = _random_graph(generator, num_atoms, num_pairs, max_shift)
    qint = _subgraph(generator, main, 0.5)
    int32 = {"index_dtype": torch.int32}
    _assert_int32_twin(triplets(main, num_atoms, **int32), triplets(main, num_atoms))
    for to_outedge in (False, True):
        _assert_int32_twin(mixed_triplets(main, qint, num_atoms, to_outedge, **int32),
                           mixed_triplets(main, qint, num_atoms, to_outedge))
    _assert_int32_twin(quadruplets(main, qint, num_atoms, **int32), quadruplets(main, qint, num_atoms))


def test_int32_outputs_match_the_fixture(case):
    num_atoms, graphs, indices = case
    got = quadruplets(graphs["main"], graphs["qint"], num_atoms, index_dtype=torch.int32)
    assert _quad_set(got) == _quad_set(indices["quad"])


def test_int32_refuses_what_does_not_fit():
    from jmp_ext.ops import interaction_indices as ii

    ii._check_fits(torch.int32, "quadruplets", 2**31 - 1)
    ii._check_fits(torch.int64, "quadruplets", 2**31)
    with pytest.raises(ValueError, match=r"2147483648 quadruplets do not fit int32 indices; pass "
                                         r"index_dtype=torch.int64"):
        ii._check_fits(torch.int32, "quadruplets", 2**31)
    with pytest.raises(TypeError, match="index_dtype must be torch.int64 or torch.int32"):
        triplets(_small(), 3, index_dtype=torch.int16)


# ---- bad input ----


def _small():
    return {"edge_index": torch.tensor([[0, 1, 2], [1, 2, 0]]),
            "cell_offset": torch.zeros(3, 3, dtype=torch.int32)}


def test_bad_atoms_are_named_by_the_argument_that_holds_them():
    bad = _small()
    bad["edge_index"] = torch.tensor([[0, 1, 3], [1, 2, 0]])
    for call, name in [(lambda: triplets(bad, 3), "graph"), (lambda: mixed_triplets(bad, _small(), 3), "graph_in"),
                       (lambda: mixed_triplets(_small(), bad, 3), "graph_out"),
                       (lambda: quadruplets(bad, _small(), 3), "main_graph"),
                       (lambda: quadruplets(_small(), bad, 3), "qint_graph")]:
        with pytest.raises(ValueError, match=rf"^{name}: edge 2 \(3 -> 0\) has an atom index outside"):
            call()


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda g: g.update(edge_index=torch.tensor([[0, 1, 3], [1, 2, 0]])), ValueError,
         r"edge 2 \(3 -> 0\).*outside \[0, num_atoms = 3\)"),
        (lambda g: g.update(edge_index=torch.tensor([[0, 1, 2], [1, -1, 0]])), ValueError,
         "outside"),
        (lambda g: g.update(edge_index=torch.zeros(3, 3, dtype=torch.int64)), ValueError,
         r"\[2, E\]"),
        (lambda g: g.update(edge_index=torch.zeros(2, 3, dtype=torch.int32)), TypeError,
         "int64"),
        (lambda g: g.update(cell_offset=torch.zeros(2, 3, dtype=torch.int32)), ValueError,
         r"\[E, 3\]"),
        (lambda g: g.update(cell_offset=torch.zeros(3, 3)), TypeError, "integer"),
        (lambda g: g.update(cell_offset=torch.full((3, 3), 2**40)), ValueError, "int32"),
        (lambda g: g.pop("cell_offset"), ValueError, "cell_offset"),
        (lambda g: g.update(cell_offset=torch.zeros(3, 3, dtype=torch.int32, device="meta")),
         ValueError, "device|on meta"),
    ],
)
def test_bad_graph_raises(mutate, error, match):
    bad = _small()
    mutate(bad)
    with pytest.raises(error, match=match):
        mixed_triplets(bad, _small(), 3)
    with pytest.raises(error, match=match):
        quadruplets(_small(), bad, 3)


def test_an_impossible_allocation_says_how_many_triplets():
    """A hub atom with d = 2**23 in-edges has d (d - 1) = 7e13 triplets, 1.7 PB of int64 indices:
    the allocator's refusal (which names bytes only) says so, as the allocator's error."""
    hub = 2**23
    star = {"edge_index": torch.stack([torch.arange(1, hub + 1), torch.zeros(hub, dtype=torch.int64)])}
    with pytest.raises(RuntimeError, match=rf"^{hub * (hub - 1)} triplets \(of graph\): their 3 index arrays need "
                                           r"1\.69e\+06 GB \(.*can't allocate memory"):
        triplets(star, hub + 1, index_dtype=torch.int64)


def test_only_an_allocation_failure_is_described_as_one(monkeypatch):
    """Another error raised at the index allocation (a GPU's earlier kernel fault surfaces at the
    next call) is not described as the indices' size; the allocator's own error type stays."""
    star = {"edge_index": torch.tensor([[1, 2, 3], [0, 0, 0]]), "cell_offset": torch.zeros(3, 3, dtype=torch.int32)}
    original = torch.Tensor.new_empty

    def failing(error):
        def new_empty(self, *size, **kwargs):
            if kwargs.get("dtype") == torch.int32:  # (the index arrays: 6 triplets at atom 0)
                raise error
            return original(self, *size, **kwargs)
        return new_empty

    monkeypatch.setattr(torch.Tensor, "new_empty", failing(RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(RuntimeError, match=r"^CUDA error: an illegal memory access$"):
        triplets(star, 4, index_dtype=torch.int32)
    monkeypatch.setattr(torch.Tensor, "new_empty", failing(torch.OutOfMemoryError("CUDA out of memory.")))
    with pytest.raises(torch.OutOfMemoryError, match=r"^6 triplets \(of graph\): their 3 index arrays need 7\.2e-08 GB "
                                                     r"\(CUDA out of memory\.\)$"):
        triplets(star, 4, index_dtype=torch.int32)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"outside \[0, num_atoms = 2\)"):
        triplets(_small(), 2)  # the out graph is checked too
    with pytest.raises(ValueError, match="graph_out.*outside"):
        mixed_triplets({"edge_index": torch.zeros(2, 0, dtype=torch.int64),
                        "cell_offset": torch.zeros(0, 3, dtype=torch.int32)}, _small(), 2)
    with pytest.raises(ValueError, match="num_atoms"):
        triplets(_small(), -1)
    with pytest.raises(ValueError, match="num_atoms"):
        triplets(_small(), 3.0)
    with pytest.raises(ValueError, match=r"num_atoms must be an int in \[0, 2\*\*62\], got 9223372036854775807"):
        triplets(_small(), 2**63 - 1)  # (a TypeError with a C++ trace inside torch before)
    with pytest.raises(ValueError, match="edge_index"):
        triplets({"cell_offset": torch.zeros(3, 3)}, 3)
    meta = {k: v.to("meta") for k, v in _small().items()}
    with pytest.raises(ValueError, match="one device"):
        mixed_triplets(meta, _small(), 3)


# ---- torch.library integration ----


def test_opcheck():
    generator = torch.Generator().manual_seed(5)
    main = _random_graph(generator, 10, 40, 1)
    qint = _subgraph(generator, main, 0.5)
    ei, off = main["edge_index"], main["cell_offset"]
    for index_dtype in (torch.int64, torch.int32):
        torch.library.opcheck(torch.ops.jmp_ext.triplets.default, (ei, 10, index_dtype))
        torch.library.opcheck(torch.ops.jmp_ext.mixed_triplets.default, (ei, off, ei, off, 10, True, index_dtype))
        torch.library.opcheck(
            torch.ops.jmp_ext.quadruplets.default,
            (ei, off, qint["edge_index"], qint["cell_offset"], 10, index_dtype),
        )


# ---- CUDA against the CPU (bitwise: both devices run the same per-edge code, in CSR order) ----


def _cpu(result: dict) -> dict:
    return _map(result, torch.Tensor.cpu)


def _to(graph: dict, device) -> dict:
    return {k: v.to(device) for k, v in graph.items()}




@pytest.mark.cuda
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_atoms, num_pairs, max_shift", RANDOM + [(400, 6000, 1)])
def test_cuda_matches_cpu_on_random_graphs(seed, num_atoms, num_pairs, max_shift):
    generator = torch.Generator().manual_seed(seed)
    main = _random_graph(generator, num_atoms, num_pairs, max_shift)
    qint = _subgraph(generator, main, 0.5)
    other = _random_graph(generator, num_atoms, num_pairs // 2, max_shift, sorted_by_target=True)
    cuda = torch.device("cuda")
    _assert_same(_cpu(triplets(_to(main, cuda), num_atoms)), triplets(main, num_atoms))
    for graph_in, graph_out in [(main, other), (other, main), (main, qint), (qint, main)]:
        for to_outedge in (False, True):
            got = mixed_triplets(_to(graph_in, cuda), _to(graph_out, cuda), num_atoms, to_outedge)
            _assert_same(_cpu(got), mixed_triplets(graph_in, graph_out, num_atoms, to_outedge))
    got = quadruplets(_to(main, cuda), _to(qint, cuda), num_atoms)
    _assert_same(_cpu(got), quadruplets(main, qint, num_atoms))
    got = quadruplets(_to(main, cuda), _to(qint, cuda), num_atoms, index_dtype=torch.int32)
    _assert_int32_twin(_cpu(got), quadruplets(main, qint, num_atoms))


@pytest.mark.cuda
def test_cuda_matches_fixture(case):
    num_atoms, graphs, indices = case
    cuda = {k: _to(g, "cuda") for k, g in graphs.items()}
    _assert_same(_cpu(triplets(cuda["main"], num_atoms)), triplets(graphs["main"], num_atoms))
    _assert_same(_cpu(mixed_triplets(cuda["a2ee2a"], cuda["main"], num_atoms)),
                 mixed_triplets(graphs["a2ee2a"], graphs["main"], num_atoms))
    got = quadruplets(cuda["main"], cuda["qint"], num_atoms)
    _assert_same(_cpu(got), quadruplets(graphs["main"], graphs["qint"], num_atoms))
    assert _quad_set(_cpu(got)) == _quad_set(indices["quad"])


@pytest.mark.cuda
def test_cuda_bad_atoms_raise_the_cpu_messages():
    bad = _to(_small(), "cuda")
    bad["edge_index"] = torch.tensor([[0, 1, 3], [1, 2, 0]], device="cuda")
    with pytest.raises(ValueError, match=r"graph_in: edge 2 \(3 -> 0\).*outside \[0, num_atoms = 3\)"):
        mixed_triplets(bad, _to(_small(), "cuda"), 3)
    with pytest.raises(ValueError, match=r"graph_out: edge 2 \(3 -> 0\).*outside"):
        mixed_triplets(_to(_small(), "cuda"), bad, 3)
    with pytest.raises(ValueError, match=r"qint_graph: edge 2 \(3 -> 0\)"):  # as on the CPU
        quadruplets(_to(_small(), "cuda"), bad, 3)
    with pytest.raises(ValueError, match=r"outside \[0, num_atoms = 2\)"):
        triplets(_to(_small(), "cuda"), 2)
    with pytest.raises(ValueError, match="one device"):
        mixed_triplets(_small(), _to(_small(), "cuda"), 3)


def test_torch_side_of_the_cuda_path_on_cpu_tensors():
    """The CUDA path's torch pieces (sorted TargetCsr, prefix sum with checks) are device-generic:
    on CPU tensors they must reproduce the CPU kernels' CSR and offsets."""
    from jmp_ext.ops import interaction_indices as ii

    generator = torch.Generator().manual_seed(6)
    main = _random_graph(generator, 50, 400, 2)
    ei = main["edge_index"]
    for a, b in zip(ii._target_csr_cuda(ei, 50, "graph"), ii._target_csr(ei, 50, "graph")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    counts = torch.randint(0, 5, (ei.shape[1],), generator=generator)
    offsets = torch.cat([counts.new_zeros(1), counts])
    assert ii._scan_counts_cuda(offsets, "triplets", "graph", ei, 50) == int(counts.sum())
    torch.testing.assert_close(offsets[1:], counts.cumsum(0), rtol=0, atol=0)
    assert offsets[0] == 0
    offsets = torch.cat([counts.new_zeros(1), counts])
    offsets[8] = -1  # the counting pass marks edge 7 as having a bad atom
    with pytest.raises(ValueError, match=r"graph: edge 7 \("):
        ii._scan_counts_cuda(offsets, "triplets", "graph", ei, 50)
    empty = torch.full((1,), 7)  # no out edges: offsets = [0], total 0
    assert ii._scan_counts_cuda(empty, "triplets", "graph", ei[:, :0], 50) == 0 and empty[0] == 0
    huge = torch.tensor([0, 2**62, 2**62, 2**62])
    with pytest.raises(ValueError, match="number of quadruplets overflows int64"):
        ii._scan_counts_cuda(huge, "quadruplets", "main_graph", ei, 50)
    bad = ei.clone()
    bad[0, 3] = 50
    with pytest.raises(ValueError, match=r"main_graph: edge 3 \(50 -> .*num_atoms = 50\)"):
        ii._target_csr_cuda(bad, 50, "main_graph")
