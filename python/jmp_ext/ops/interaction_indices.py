"""GemNet-OC interaction indices (triplets, mixed triplets, quadruplets) as compiled kernels.

Edges follow jmp_ext's convention: edge e goes from source s = edge_index[0, e] (the neighbour)
to target t = edge_index[1, e] (the centre, where messages aggregate); cell_offset[e] is the
integer lattice shift of the source image. An edge is identified by its index, so two edges
between the same atoms through different periodic images are different edges. Inputs need not be
sorted by target (JMP's symmetrised main graph is not).

Semantics are exactly those of GemNet-OC's ``interaction_indices.py`` (fairchem, JMP):

- triplets: for every out edge c->a, every in edge b->a of the same graph except c->a itself.
- mixed triplets (to_outedge=False): for every out edge c->a, every in edge b->a of the other
  graph, except b == c with the same cell offset. With to_outedge=True: for every out edge b->a,
  every in edge d->b, except d == a with off_db + off_ba == 0.
- quadruplets d->b->a<-c: an input triplet (d->b main, b->a qint; to_outedge=True) joined with an
  output triplet (b->a qint, c->a main) through the qint edge b->a, except c == d with
  off_db + off_ba - off_ca == 0.

Order (deterministic, documented): ``out`` ascending; inside an out group, triplets are ordered by
(source atom of the in edge, in edge index), which is the reference's order (SparseTensor CSR
column order) with its unspecified ties among periodic images broken by edge index; quadruplets
are ordered by (output triplet, input triplet). ``out_agg`` is the rank inside the out group
(0..count-1), the index GemNet-OC uses to pad triplets into [num_out_edges, Kmax, F].

Outputs are on the inputs' device, int64 by default. With ``index_dtype=torch.int32`` they are
written as int32, half the memory and the bandwidth (jmp_ext.graphs builds the model's indices
this way; jmp_ext.ops' gathers, scatters and bilinear ops read either); a graph or a result too
large for int32 then raises a ValueError instead of wrapping. No autograd: the outputs are
integer indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jmp_ext.ops._lib import _C, is_out_of_memory, launch, ptr

__all__ = ["triplets", "mixed_triplets", "quadruplets"]

# Pairing codes of csrc/interaction_indices/interaction_indices.h.
_SAME_GRAPH, _SHARED_TARGET, _IN_TARGET_IS_OUT_SOURCE = 0, 1, 2
# Largest num_atoms for which the CUDA sort key target * num_atoms + source fits in int64.
_MAX_KEY_ATOMS = 3_037_000_499
_INDEX_DTYPES = (torch.int64, torch.int32)


# ---- checks and kernel plumbing ----


def _check_graph(name: str, edge_index: Tensor, cell_offset: Tensor | None) -> None:
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index)
        raise ValueError(f"{name}['edge_index'] must be a [2, E] tensor, got {shape}")
    if edge_index.dtype != torch.int64:
        raise TypeError(f"{name}['edge_index'] must be int64, got {edge_index.dtype}")
    if cell_offset is None:
        return
    if cell_offset.shape != (edge_index.shape[1], 3):
        raise ValueError(
            f"{name}['cell_offset'] must have shape [E, 3] = [{edge_index.shape[1]}, 3] to match "
            f"edge_index, got {tuple(cell_offset.shape)}"
        )
    if cell_offset.dtype != torch.int32:
        raise TypeError(f"{name}['cell_offset'] must be int32, got {cell_offset.dtype}")
    if cell_offset.device != edge_index.device:
        raise ValueError(
            f"{name}: edge_index is on {edge_index.device} but cell_offset is on "
            f"{cell_offset.device}"
        )


def _check_index_dtype(index_dtype: torch.dtype) -> None:
    if index_dtype not in _INDEX_DTYPES:
        raise TypeError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}")


def _check_fits(index_dtype: torch.dtype, what: str, count: int) -> None:
    """Refuses int32 outputs when `count` (a number of edges or of results, which bounds every
    index written) does not fit int32."""
    if index_dtype == torch.int32 and count > torch.iinfo(torch.int32).max:
        raise ValueError(f"{count} {what} do not fit int32 indices; pass index_dtype=torch.int64")


def _check_num_atoms(num_atoms: int) -> None:
    # (the bound keeps num_atoms + 1 and the kernels' sums of it in int64)
    if isinstance(num_atoms, bool) or not isinstance(num_atoms, int) or not 0 <= num_atoms <= 2**62:
        raise ValueError(f"num_atoms must be an int in [0, 2**62], got {num_atoms!r}")


def _new_indices(like: Tensor, arrays: int, count: int, index_dtype: torch.dtype, what: str) -> tuple[Tensor, ...]:
    """`arrays` index tensors of `count` entries; an allocation that fails says how many
    `what` (triplets, quadruplets) they were for, and their size (the allocator names bytes
    only), as the allocator's own error type (torch.OutOfMemoryError on a GPU)."""
    try:
        return tuple(like.new_empty(count, dtype=index_dtype) for _ in range(arrays))
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise  # (another error, such as an earlier kernel's on the GPU, as it is)
        size = arrays * count * index_dtype.itemsize / 1e9
        raise type(error)(f"{count} {what}: their {arrays} index arrays need {size:.3g} GB ({error})") from None


def _check_same_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all inputs must be on one device, got {devices}")
    return first


def _check_two_graphs(
    names: tuple[str, str],
    first: tuple[Tensor, Tensor],
    second: tuple[Tensor, Tensor],
) -> torch.device:
    _check_graph(names[0], *first)
    _check_graph(names[1], *second)
    return _check_same_device(**{names[0]: first[0], names[1]: second[0]})


def _graph_args(edge_index: Tensor, cell_offset: Tensor | None) -> tuple[int, int, int]:
    return ptr(edge_index), ptr(cell_offset), edge_index.shape[1]


def _target_csr(edge_index: Tensor, num_atoms: int, name: str) -> tuple[Tensor, Tensor]:
    """(ptr [num_atoms+1], order [E]): edges grouped by target, by (source, index) inside."""
    if edge_index.is_cuda:
        return _target_csr_cuda(edge_index, num_atoms, name)
    if edge_index.device.type != "cpu":
        raise ValueError(f"interaction indices run on CPU or CUDA tensors, got {name} on {edge_index.device}")
    num_edges = edge_index.shape[1]
    csr_ptr = edge_index.new_empty(num_atoms + 1)
    order = edge_index.new_empty(num_edges)
    scratch = edge_index.new_empty(num_atoms + 1 + num_edges)
    _C.target_csr_cpu(ptr(edge_index), num_edges, num_atoms, name, ptr(csr_ptr), ptr(order), ptr(scratch))
    return csr_ptr, order


def _target_csr_cuda(edge_index: Tensor, num_atoms: int, name: str) -> tuple[Tensor, Tensor]:
    """The CPU kernel's TargetCsr with torch's stable GPU sort on the key target * N + source."""
    if num_atoms > _MAX_KEY_ATOMS:
        raise ValueError(f"num_atoms = {num_atoms} is too large: target * num_atoms + source "
                         "would overflow int64")
    # The range check costs one synchronisation; bad atoms would corrupt the sort keys.
    bad = ((edge_index < 0) | (edge_index >= num_atoms)).any(dim=0)
    if bad.any():
        _raise_bad_edge(name, edge_index, int(bad.nonzero()[0]), num_atoms)
    source, target = edge_index
    sorted_key, order = torch.sort(target * num_atoms + source, stable=True)
    bounds = torch.arange(num_atoms + 1, device=edge_index.device) * num_atoms
    return torch.searchsorted(sorted_key, bounds), order


def _raise_bad_edge(name: str, edge_index: Tensor, e: int, num_atoms: int) -> None:
    """The CPU kernels' message for edge e with an atom index outside [0, num_atoms)."""
    s, t = edge_index[:, e].tolist()
    raise ValueError(f"{name}: edge {e} ({s} -> {t}) has an atom index outside "
                     f"[0, num_atoms = {num_atoms})")


def _scan_counts_cuda(offsets: Tensor, what: str, name: str, edge_index: Tensor,
                      num_atoms: int) -> int:
    """offsets[1:] holds per-edge counts from a CUDA counting pass (-1: the edge has a bad atom).

    Turns them into the exclusive prefix sum in place and returns the total, with one
    synchronisation for the total and the checks."""
    counts = offsets[1:]
    offsets[0] = 0
    if counts.numel() == 0:
        return 0
    bad = counts < 0
    first_bad = torch.where(bad.any(), bad.int().argmax(), -1)
    # A float64 sum detects an int64 overflow of the exact sum (cumsum would wrap silently).
    too_many = counts.double().sum() >= 2.0**63
    offsets[1:] = counts.cumsum(0)
    total, first_bad, too_many = torch.stack([offsets[-1], first_bad, too_many.long()]).tolist()
    if first_bad >= 0:
        _raise_bad_edge(name, edge_index, first_bad, num_atoms)
    if too_many:
        raise ValueError(f"the number of {what} overflows int64")
    return total


def _pairs(
    in_graph: tuple[Tensor, Tensor | None],
    out_graph: tuple[Tensor, Tensor | None],
    csr: tuple[Tensor, Tensor],
    num_atoms: int,
    pairing: int,
    index_dtype: torch.dtype,
    out_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Count, scan and fill one triplet op: (in [T], out [T], out_agg [T] of index_dtype,
    offsets [E_out+1] int64). out_name: the out graph's argument name, for error messages."""
    device = in_graph[0].device
    _check_fits(index_dtype, "edges", max(in_graph[0].shape[1], out_graph[0].shape[1]))
    args = (
        *_graph_args(*in_graph),
        *_graph_args(*out_graph),
        pairing,
        num_atoms,
        ptr(csr[0]),
        ptr(csr[1]),
    )
    offsets = in_graph[0].new_empty(out_graph[0].shape[1] + 1)
    int32 = index_dtype == torch.int32
    total = launch("count_triplets", device, *args, ptr(offsets), int32, out_name, checks_indices=False)
    if device.type == "cuda":
        total = _scan_counts_cuda(offsets, "triplets", out_name, out_graph[0], num_atoms)
    _check_fits(index_dtype, "triplets", total)
    idx_in, idx_out, out_agg = _new_indices(offsets, 3, total, index_dtype, f"triplets (of {out_name})")
    launch("fill_triplets", device, *args, ptr(offsets), int32, ptr(idx_in), ptr(idx_out), ptr(out_agg),
           checks_indices=False)
    return idx_in, idx_out, out_agg, offsets


# ---- custom ops (integer outputs: no autograd) ----


@torch.library.custom_op("jmp_ext::triplets", mutates_args=())
def _triplets_op(edge_index: Tensor, num_atoms: int, index_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    _check_graph("graph", edge_index, None)
    _check_num_atoms(num_atoms)
    _check_index_dtype(index_dtype)
    edge_index = edge_index.contiguous()
    csr = _target_csr(edge_index, num_atoms, "graph")
    return _pairs((edge_index, None), (edge_index, None), csr, num_atoms, _SAME_GRAPH, index_dtype, "graph")[:3]


@torch.library.custom_op("jmp_ext::mixed_triplets", mutates_args=())
def _mixed_triplets_op(
    in_edge_index: Tensor,
    in_cell_offset: Tensor,
    out_edge_index: Tensor,
    out_cell_offset: Tensor,
    num_atoms: int,
    to_outedge: bool,
    index_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_two_graphs(
        ("graph_in", "graph_out"),
        (in_edge_index, in_cell_offset),
        (out_edge_index, out_cell_offset),
    )
    _check_num_atoms(num_atoms)
    _check_index_dtype(index_dtype)
    graph_in = (in_edge_index.contiguous(), in_cell_offset.contiguous())
    graph_out = (out_edge_index.contiguous(), out_cell_offset.contiguous())
    csr = _target_csr(graph_in[0], num_atoms, "graph_in")
    pairing = _IN_TARGET_IS_OUT_SOURCE if to_outedge else _SHARED_TARGET
    return _pairs(graph_in, graph_out, csr, num_atoms, pairing, index_dtype, "graph_out")[:3]


@torch.library.custom_op("jmp_ext::quadruplets", mutates_args=())
def _quadruplets_op(
    main_edge_index: Tensor,
    main_cell_offset: Tensor,
    qint_edge_index: Tensor,
    qint_cell_offset: Tensor,
    num_atoms: int,
    index_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    device = _check_two_graphs(
        ("main_graph", "qint_graph"),
        (main_edge_index, main_cell_offset),
        (qint_edge_index, qint_cell_offset),
    )
    _check_num_atoms(num_atoms)
    _check_index_dtype(index_dtype)
    main = (main_edge_index.contiguous(), main_cell_offset.contiguous())
    qint = (qint_edge_index.contiguous(), qint_cell_offset.contiguous())
    # Input triplets d->b->a: main edge d->b into qint edge b->a (CSR by qint edge).
    tin_in, tin_out, _, tin_ptr = _pairs(
        main, qint, _target_csr(main[0], num_atoms, "main_graph"), num_atoms,
        _IN_TARGET_IS_OUT_SOURCE, index_dtype, "qint_graph",
    )
    # Output triplets b->a<-c: qint edge b->a next to main edge c->a (CSR by main edge).
    tout_in, tout_out, _, tout_ptr = _pairs(
        qint, main, _target_csr(qint[0], num_atoms, "qint_graph"), num_atoms, _SHARED_TARGET,
        index_dtype, "main_graph",
    )
    # Scratch of the kernels: where each output triplet's droppable input triplets start.
    candidates = tout_in.new_empty(tout_in.shape[0], dtype=torch.int64)
    args = (
        *_graph_args(*main),
        *_graph_args(*qint),
        ptr(tin_ptr),
        ptr(tin_in),
        ptr(tout_ptr),
        ptr(tout_in),
        ptr(candidates),
    )
    offsets = main[0].new_empty(main[0].shape[1] + 1)
    int32 = index_dtype == torch.int32
    total = launch("count_quadruplets", device, *args, ptr(offsets), int32, checks_indices=False)
    if device.type == "cuda":  # (counts are never negative: the triplet ops checked the atoms)
        total = _scan_counts_cuda(offsets, "quadruplets", "main_graph", main[0], num_atoms)
    _check_fits(index_dtype, "quadruplets", total)
    out, trip_out_to_quad, trip_in_to_quad, out_agg = _new_indices(offsets, 4, total, index_dtype, "quadruplets")
    launch("fill_quadruplets", device, *args, ptr(offsets), int32, ptr(out), ptr(trip_out_to_quad),
           ptr(trip_in_to_quad), ptr(out_agg), checks_indices=False)
    return tin_in, tin_out, tout_in, tout_out, out, trip_in_to_quad, trip_out_to_quad, out_agg


def _fake_indices(like: Tensor, index_dtype: torch.dtype, *group_sizes: int) -> tuple[Tensor, ...]:
    """Fake outputs: each group shares one data-dependent length (fakes read no data)."""
    _check_index_dtype(index_dtype)
    ctx = torch.library.get_ctx()
    outputs = []
    for group_size in group_sizes:
        length = ctx.new_dynamic_size()
        outputs += [like.new_empty(length, dtype=index_dtype) for _ in range(group_size)]
    return tuple(outputs)


# The fakes check what can be checked without data, so that meta / fake tensors get the same
# clear errors as real ones.
@_triplets_op.register_fake
def _(edge_index, num_atoms, index_dtype):
    _check_graph("graph", edge_index, None)
    return _fake_indices(edge_index, index_dtype, 3)


@_mixed_triplets_op.register_fake
def _(in_edge_index, in_cell_offset, out_edge_index, out_cell_offset, num_atoms, to_outedge, index_dtype):
    _check_two_graphs(
        ("graph_in", "graph_out"),
        (in_edge_index, in_cell_offset),
        (out_edge_index, out_cell_offset),
    )
    return _fake_indices(in_edge_index, index_dtype, 3)


@_quadruplets_op.register_fake
def _(main_edge_index, main_cell_offset, qint_edge_index, qint_cell_offset, num_atoms, index_dtype):
    _check_two_graphs(
        ("main_graph", "qint_graph"),
        (main_edge_index, main_cell_offset),
        (qint_edge_index, qint_cell_offset),
    )
    # triplet_in (in, out), triplet_out (in, out), then the four quadruplet tensors.
    return _fake_indices(main_edge_index, index_dtype, 2, 2, 4)


# ---- public API (GemNet-OC's dicts) ----


def _unpack(graph: dict, name: str) -> tuple[Tensor, Tensor]:
    """(edge_index int64 [2,E], cell_offset int32 [E,3]) of a graph dict, checked."""
    if not isinstance(graph, dict) or "edge_index" not in graph or "cell_offset" not in graph:
        raise ValueError(f"{name} must be a dict with 'edge_index' and 'cell_offset'")
    edge_index, cell_offset = graph["edge_index"], graph["cell_offset"]
    _check_graph(name, edge_index, None)
    if not isinstance(cell_offset, Tensor) or cell_offset.is_floating_point() or (
        cell_offset.is_complex() or cell_offset.dtype == torch.bool
    ):
        raise TypeError(f"{name}['cell_offset'] must be an integer tensor")
    if cell_offset.dtype == torch.int64 and cell_offset.numel() > 0:
        int32 = torch.iinfo(torch.int32)  # (not abs(): abs(-2**63) wraps to a negative number)
        if cell_offset.min() < int32.min or cell_offset.max() > int32.max:
            raise ValueError(f"{name}['cell_offset'] has values outside the int32 range")
    return edge_index, cell_offset.to(torch.int32)


def triplets(graph: dict, num_atoms: int, *, index_dtype: torch.dtype = torch.int64) -> dict[str, Tensor]:
    """Triplets b->a, c->a of one graph (GemNet-OC ``get_triplets``).

    Args:
        graph: {"edge_index": [2, E] int64, ...}; cell offsets are not needed (edges are
            compared by index).
        num_atoms: N, the number of atoms; every atom index must be in [0, N).
        index_dtype: torch.int64 or torch.int32, the dtype of the outputs.
    Returns:
        {"in": [T] edge b->a, "out": [T] edge c->a (ascending),
         "out_agg": [T] rank of the triplet among those of its out edge}, of index_dtype.
    """
    if not isinstance(graph, dict) or "edge_index" not in graph:
        raise ValueError("graph must be a dict with 'edge_index'")
    _check_num_atoms(num_atoms)
    _check_graph("graph", graph["edge_index"], None)
    idx_in, idx_out, out_agg = _triplets_op(graph["edge_index"], num_atoms, index_dtype)
    return {"in": idx_in, "out": idx_out, "out_agg": out_agg}


def mixed_triplets(
    graph_in: dict, graph_out: dict, num_atoms: int, to_outedge: bool = False, *,
    index_dtype: torch.dtype = torch.int64,
) -> dict[str, Tensor]:
    """Triplets across two graphs (GemNet-OC ``get_mixed_triplets``).

    Args:
        graph_in, graph_out: {"edge_index": [2, E] int64, "cell_offset": [E, 3] integer}.
        num_atoms: N.
        to_outedge: False pairs in b->a with out c->a (same target); True pairs in d->b with
            out b->a (the in edge's target is the out edge's source).
        index_dtype: torch.int64 or torch.int32, the dtype of the outputs.
    Returns:
        {"in": [T] index into graph_in, "out": [T] index into graph_out (ascending),
         "out_agg": [T] rank inside the out group}, of index_dtype.
    """
    _check_num_atoms(num_atoms)
    in_ei, in_off = _unpack(graph_in, "graph_in")
    out_ei, out_off = _unpack(graph_out, "graph_out")
    idx_in, idx_out, out_agg = _mixed_triplets_op(
        in_ei, in_off, out_ei, out_off, num_atoms, bool(to_outedge), index_dtype
    )
    return {"in": idx_in, "out": idx_out, "out_agg": out_agg}


def quadruplets(main_graph: dict, qint_graph: dict, num_atoms: int, *,
                index_dtype: torch.dtype = torch.int64) -> dict:
    """Quadruplets d->b->a<-c of GemNet-OC (``get_quadruplets``).

    Args:
        main_graph, qint_graph: {"edge_index": [2, E] int64, "cell_offset": [E, 3] integer}.
        num_atoms: N.
        index_dtype: torch.int64 or torch.int32, the dtype of every output.
    Returns:
        {"triplet_in": {"in": [T_in] main edge d->b, "out": [T_in] qint edge b->a},
         "triplet_out": {"in": [T_out] qint edge b->a, "out": [T_out] main edge c->a},
         "out": [Q] main edge c->a (ascending),
         "trip_in_to_quad": [Q] index into triplet_in, "trip_out_to_quad": [Q] index into
         triplet_out, "out_agg": [Q] rank inside the out group}, all of index_dtype.
    """
    _check_num_atoms(num_atoms)
    main_ei, main_off = _unpack(main_graph, "main_graph")
    qint_ei, qint_off = _unpack(qint_graph, "qint_graph")
    tin_in, tin_out, tout_in, tout_out, out, tin_to_quad, tout_to_quad, out_agg = _quadruplets_op(
        main_ei, main_off, qint_ei, qint_off, num_atoms, index_dtype
    )
    return {
        "triplet_in": {"in": tin_in, "out": tin_out},
        "triplet_out": {"in": tout_in, "out": tout_out},
        "out": out,
        "trip_in_to_quad": tin_to_quad,
        "trip_out_to_quad": tout_to_quad,
        "out_agg": out_agg,
    }
