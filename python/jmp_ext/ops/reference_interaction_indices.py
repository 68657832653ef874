"""Pure-torch twin of jmp_ext.ops.interaction_indices (test oracle and benchmark baseline).

It follows GemNet-OC's own algorithm (an adjacency "row lookup" of every out edge's pivot atom,
then masking, then a repeat_interleave expansion for quadruplets) with the torch_sparse
SparseTensor replaced by a stable sort and torch.repeat_interleave. Same inputs, outputs and
order as the compiled ops: see that module's docstring for the semantics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ragged_arange(counts: Tensor) -> Tensor:
    """[0..counts[0]), [0..counts[1]), ... concatenated."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - starts.repeat_interleave(counts)


def _adjacency_rows(edge_index: Tensor, num_atoms: int, rows: Tensor) -> tuple[Tensor, Tensor]:
    """For every query atom rows[k], every edge with that target, ordered by (source, edge).

    Returns (query [P], edge [P]): the position k in `rows` and the edge index of each pair.
    """
    source, target = edge_index
    # Stable sort by target * N + source: ties (periodic images) keep edge order.
    order = torch.sort(target * num_atoms + source, stable=True).indices
    degree = torch.bincount(target, minlength=num_atoms)
    start = torch.cumsum(degree, 0) - degree
    counts = degree[rows]
    query = torch.arange(rows.numel(), device=rows.device).repeat_interleave(counts)
    edge = order[start[rows].repeat_interleave(counts) + _ragged_arange(counts)]
    return query, edge


def _any_nonzero(offsets: Tensor) -> Tensor:
    return (offsets != 0).any(dim=-1)


def triplets(graph: dict, num_atoms: int) -> dict[str, Tensor]:
    """Reference of jmp_ext.ops.triplets."""
    edge_index = graph["edge_index"]
    idx_out, idx_in = _adjacency_rows(edge_index, num_atoms, edge_index[1])
    keep = idx_in != idx_out
    idx_in, idx_out = idx_in[keep], idx_out[keep]
    counts = torch.bincount(idx_out, minlength=edge_index.shape[1])
    return {"in": idx_in, "out": idx_out, "out_agg": _ragged_arange(counts)}


def mixed_triplets(
    graph_in: dict, graph_out: dict, num_atoms: int, to_outedge: bool = False
) -> dict[str, Tensor]:
    """Reference of jmp_ext.ops.mixed_triplets."""
    in_s = graph_in["edge_index"][0]
    out_s, out_t = graph_out["edge_index"]
    in_off = graph_in["cell_offset"].long()
    out_off = graph_out["cell_offset"].long()
    pivot = out_s if to_outedge else out_t
    idx_out, idx_in = _adjacency_rows(graph_in["edge_index"], num_atoms, pivot)
    if to_outedge:  # d->b->a closes when d == a and off_db + off_ba == 0
        other_atom = out_t[idx_out]
        net = out_off[idx_out] + in_off[idx_in]
    else:  # b->a<-c closes when b == c and off_ca - off_ba == 0
        other_atom = out_s[idx_out]
        net = out_off[idx_out] - in_off[idx_in]
    keep = (in_s[idx_in] != other_atom) | _any_nonzero(net)
    idx_in, idx_out = idx_in[keep], idx_out[keep]
    counts = torch.bincount(idx_out, minlength=out_s.numel())
    return {"in": idx_in, "out": idx_out, "out_agg": _ragged_arange(counts)}


def quadruplets(main_graph: dict, qint_graph: dict, num_atoms: int) -> dict:
    """Reference of jmp_ext.ops.quadruplets."""
    main_s = main_graph["edge_index"][0]
    main_off = main_graph["cell_offset"].long()
    qint_off = qint_graph["cell_offset"].long()
    num_qint = qint_graph["edge_index"].shape[1]
    trip_in = mixed_triplets(main_graph, qint_graph, num_atoms, to_outedge=True)
    trip_out = mixed_triplets(qint_graph, main_graph, num_atoms, to_outedge=False)

    # Every output triplet (b->a, c->a) meets every input triplet of its qint edge b->a.
    per_inter = torch.bincount(trip_in["out"], minlength=num_qint)
    first_in = torch.cumsum(per_inter, 0) - per_inter
    counts = per_inter[trip_out["in"]]
    trip_out_to_quad = torch.arange(counts.numel(), device=counts.device).repeat_interleave(counts)
    inter = trip_out["in"][trip_out_to_quad]
    trip_in_to_quad = first_in[inter] + _ragged_arange(counts)
    out = trip_out["out"][trip_out_to_quad]

    # Drop c == d with off_db + off_ba - off_ca == 0.
    d_b = trip_in["in"][trip_in_to_quad]
    net = main_off[d_b] + qint_off[inter] - main_off[out]
    keep = (main_s[d_b] != main_s[out]) | _any_nonzero(net)
    out = out[keep]
    counts = torch.bincount(out, minlength=main_s.numel())
    return {
        "triplet_in": {"in": trip_in["in"], "out": trip_in["out"]},
        "triplet_out": {"in": trip_out["in"], "out": trip_out["out"]},
        "out": out,
        "trip_in_to_quad": trip_in_to_quad[keep],
        "trip_out_to_quad": trip_out_to_quad[keep],
        "out_agg": _ragged_arange(counts),
    }
