"""Access to the JMP reference fixtures (/work/shared/fixtures/jmp_ref, see its README.md).

The fixtures hold JMP's graphs and interaction indices; here they become the graphs dict our
backbone consumes, with distances and vectors recomputed from the positions (so they are
differentiable) and out_agg / target ranks derived as JMP derives them."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from jmp_ext.graphs import GraphConfig, graphs_from_a2a, quad_edges

FIXTURES = Path(os.environ.get("JMP_REF_FIXTURES", "/work/shared/fixtures/jmp_ref"))
CASES = ["oc20_slab", "ani_molecules"]

requires_fixtures = pytest.mark.skipif(not (FIXTURES / "weights.pt").exists(),
                                       reason=f"JMP reference fixtures not found at {FIXTURES}")


@functools.cache
def load(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)


def rank_in_group(sorted_index: torch.Tensor) -> torch.Tensor:
    """out_agg of a sorted index: position of each entry within its run of equal values."""
    n = sorted_index.numel()
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = sorted_index[1:] != sorted_index[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    return torch.arange(n) - first


def edge_geometry(pos, cell, batch, edge_index, cell_offset):
    """JMP's distance |r| and unit vector V_st = -r/|r|, r = pos[s] - pos[t] + offset @ cell[batch[s]]."""
    s, t = edge_index
    r = pos[s] - pos[t] + torch.einsum("ej,eji->ei", cell_offset.to(pos.dtype), cell[batch[s]])
    d = r.norm(dim=-1)
    return d, -r / d[:, None]


def fixture_graphs(case: dict, pos: torch.Tensor) -> dict:
    """The graphs dict of jmp_ext's backbone from a fixture case; geometry from `pos` (its dtype)."""
    inputs, idx = case["inputs"], case["indices"]
    cell, batch = inputs["cell"].to(pos.dtype), inputs["batch"]
    L = lambda x: x.long()  # noqa: E731  (indices are stored as int16/int32)

    def graph(edge_index, cell_offset, target_neighbor_idx=None):
        d, v = edge_geometry(pos, cell, batch, edge_index, cell_offset)
        g = {"edge_index": edge_index, "cell_offset": cell_offset.int(), "distance": d, "vector": v}
        if target_neighbor_idx is not None:
            g["target_neighbor_idx"] = L(target_neighbor_idx)
        return g

    G = case["graphs"]
    trip = lambda k: {"in": L(idx[k]["in"]), "out": L(idx[k]["out"]), "out_agg": rank_in_group(L(idx[k]["out"]))}  # noqa: E731
    q = idx["quad"]
    quad = {
        "triplet_in": {k: L(v) for k, v in q["triplet_in"].items()},
        "triplet_out": {k: L(v) for k, v in q["triplet_out"].items()},
        "out": L(q["out"]), "out_agg": rank_in_group(L(q["out"])),
        "trip_in_to_quad": L(q["trip_in_to_quad"]), "trip_out_to_quad": L(q["trip_out_to_quad"]),
    }
    return {
        "num_atoms": pos.shape[0],
        "kmax": {"a2ee2a": int(L(idx["a2ee2a_target_neighbor_idx"]).max()) + 1},  # as build_graphs
        "main": graph(idx["main_sym"]["edge_index"], idx["main_sym"]["cell_offset"]),
        "a2a": graph(G["a2a"]["edge_index"], G["a2a"]["cell_offset"]),
        "a2ee2a": graph(G["a2ee2a"]["edge_index"], G["a2ee2a"]["cell_offset"], idx["a2ee2a_target_neighbor_idx"]),
        "qint": graph(G["qint"]["edge_index"], G["qint"]["cell_offset"]),
        "id_swap": L(idx["id_swap"]),
        "trip_e2e": trip("trip_e2e"),
        "trip_a2e": trip("trip_a2e"),
        "trip_e2a": trip("trip_e2a"),
        "quad": quad,
        "quad_edges": quad_edges(quad),
    }


def edge_keys(edge_index, cell_offset) -> list[tuple]:
    return [tuple(x) for x in torch.cat([edge_index.T, cell_offset.long()], dim=1).tolist()]


def fixture_batch(case: dict, dtype) -> dict:
    inputs = case["inputs"]
    pbc = case["graph_settings"]["pbc"]
    b = inputs["natoms"].shape[0]
    return {"pos": inputs["pos"].to(dtype), "atomic_numbers": inputs["atomic_numbers"], "natoms": inputs["natoms"],
            "batch": inputs["batch"], "cell": inputs["cell"].to(dtype), "tags": inputs["tags"],
            "pbc": torch.full((b, 3), pbc)}


def fixture_config(case: dict) -> GraphConfig:
    s = case["graph_settings"]
    return GraphConfig(cutoff_main=s["cutoff_main"], cutoff_a2ee2a=s["cutoff_a2ee2a"], cutoff_qint=s["cutoff_qint"],
                       cutoff_a2a=s["cutoff_a2a"], max_neighbors=s["max_neighbors_main"], pbc=s["pbc"],
                       qint_tags=tuple(s["qint_tags"]))


def graphs_on_jmps_a2a(case: dict, batch: dict, **kwargs) -> dict:
    """jmp_ext.graphs from the batch, starting from JMP's a2a graph (no radius_graph needed)."""
    a2a = case["graphs"]["a2a"]
    return graphs_from_a2a(batch, {"edge_index": a2a["edge_index"], "cell_offset": a2a["cell_offset"]},
                           fixture_config(case), **kwargs)


def bulk_batch_and_graphs(cutoff=3.0):
    """Two rattled periodic crystals (fcc Cu, 4 atoms, and a sheared 3-atom cell) with a
    brute-force a2a graph over the images within +-2 cells."""
    g = torch.Generator().manual_seed(7)
    frac = [torch.tensor([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]], dtype=torch.float64),
            torch.tensor([[0, 0, 0], [.33, .4, .5], [.7, .6, .2]], dtype=torch.float64)]
    cells = [3.61 * torch.eye(3, dtype=torch.float64),
             torch.tensor([[3.2, 0, 0], [0.8, 3.4, 0], [0.3, -0.5, 3.6]], dtype=torch.float64)]
    pos = torch.cat([f @ c for f, c in zip(frac, cells)]) + 0.05 * torch.randn(7, 3, generator=g, dtype=torch.float64)
    natoms = torch.tensor([4, 3])
    structure = torch.repeat_interleave(torch.arange(2), natoms)
    images = torch.cartesian_prod(*[torch.arange(-2, 3)] * 3)
    edges, offsets = [], []
    for t in range(7):
        for s in range(7):
            if structure[s] != structure[t]:
                continue
            d = (pos[s] + images.double() @ cells[structure[s]] - pos[t]).norm(dim=1)
            for o in images[(d > 1e-4) & (d <= cutoff)]:
                edges.append((s, t))
                offsets.append(o)
    batch = {"pos": pos, "atomic_numbers": torch.tensor([29] * 4 + [13, 28, 8]), "natoms": natoms, "batch": structure,
             "cell": torch.stack(cells), "pbc": torch.ones(2, 3, dtype=torch.bool), "tags": torch.full((7,), 2)}
    a2a = {"edge_index": torch.tensor(edges).T.contiguous(), "cell_offset": torch.stack(offsets).int()}
    return batch, graphs_from_a2a(batch, a2a, GraphConfig.uniform(cutoff, 30, pbc=True))
