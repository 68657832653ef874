"""The four GemNet-OC graphs of JMP and their interaction indices, built on the fly from a batch.

`build_graphs` builds the a2a graph (step 1), `graphs_from_a2a` the rest, in this order:
  1. a2a ("aint") graph: every neighbour within cutoff_a2a, at most k_a2a per target atom
     (jmp_ext.ops.radius_graph); edge dropout on it while training (JMP pretraining: p = 0.1).
  2. main, a2ee2a and qint are subselected from a2a: a distance filter where their cutoff is
     smaller, then the k nearest per target atom (strict: exactly min(k, available)).
  3. qint keeps only edges touching an atom whose tag is in qint_tags.
  4. main is symmetrised (every edge gets its reverse; id_swap maps an edge to its reverse).
  5. Triplet and quadruplet indices (jmp_ext.ops), neighbour ranks, and Kmax of the padded
     edge-to-atom block (a2ee2a), computed once here so the backbone never syncs with the host.
  6. Distances and unit vectors of all four graphs, recomputed differentiably from the batch's
     positions and cell (so gradient forces and stress flow through them).

Edge convention (JMP's): edge e goes from the source s = edge_index[0, e] (the neighbour) to the
target t = edge_index[1, e] (the centre, where messages aggregate); cell_offset[e] is the integer
lattice shift of the source image, at pos[s] + cell_offset[e] @ cell. distance = |that - pos[t]|,
vector = (pos[t] - source image) / distance (JMP's V_st).

Neighbour counts follow JMP's proportions for a base k (30 for OC20): main k, a2ee2a int(20k/30),
qint int(8k/30), a2a int(1000k/30). MatBench and QMOF lower k for large structures
(natoms_max_neighbors); k is then per structure. So are the cutoffs in a batch that mixes tasks
with different GraphConfigs (JMP pretraining: OC20 at 12 Å, ANI-1x at 8 Å): the a2a graph is
built once at the largest cutoff and each structure's edges are filtered to its own, which gives
exactly the graphs each structure would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from jmp_ext import ops
from jmp_ext.ops.radius_graph import radius_graph

GRAPH_NAMES = ("main", "a2ee2a", "qint", "a2a")
# Neighbours per target relative to the main graph's k (JMP's MaxNeighbors.from_goc_base_proportions).
K_PROPORTIONS = {"main": 30, "a2ee2a": 20, "qint": 8, "a2a": 1000}


class BatchStructureError(ValueError):
    """Structures of a batch (their positions in it, `structures`) that the graphs cannot be
    built for, and why (`problem`): the trainer, eval and predict name the dataset entries or
    input structures they are."""

    def __init__(self, structures: list[int], problem: str):
        super().__init__(f"structure(s) {structures} of the batch: {problem}")
        self.structures, self.problem = structures, problem


class StructuresWithoutEdges(BatchStructureError):
    """Structures without a pair of atoms within the main cutoff: GemNet-OC has nothing to pass
    messages along."""

    def __init__(self, structures: list[int], cutoff):
        super().__init__(structures, f"no pair of atoms within cutoff_main={cutoff} Å, which GemNet-OC needs: "
                                     "leave them out (an isolated atom, which no cutoff helps; atoms all farther "
                                     "apart than that would need a larger graph.cutoff)")


@dataclass(frozen=True, kw_only=True)
class GraphConfig:
    """How the four graphs of one task are built (GemNet-OC's main, a2ee2a, qint and a2a graphs).
    Cutoffs in Å. JMP uses one cutoff for all four: GraphConfig.uniform(cutoff), or a dataset's
    settings by name, GraphConfig.preset("oc20")."""

    cutoff_main: float
    cutoff_a2ee2a: float
    cutoff_qint: float
    cutoff_a2a: float
    """The a2a graph is built first and the others are taken from it, so it has the largest cutoff."""
    max_neighbors: int = 30
    """Base k: the main graph's neighbours per target; the others follow K_PROPORTIONS."""
    pbc: bool = True
    """False ignores the batch's cell and pbc: every structure is an isolated cluster, a crystal
    included (JMP's molecule datasets); True uses the batch's pbc flags, structure by structure."""
    qint_tags: tuple[int, ...] = (1, 2)
    """The quadruplet (qint) graph keeps only edges that touch an atom with one of these tags
    (OC20's: 0 sub-surface, 1 surface, 2 adsorbate; molecules and bulk are all 2)."""
    natoms_max_neighbors: tuple[tuple[int, int], ...] = ()
    """(threshold, k) pairs: a structure with more than `threshold` atoms uses base k (the
    smallest k among the thresholds it exceeds). MatBench / QMOF: ((200, 10), (300, 5))."""

    def __post_init__(self) -> None:
        for name in GRAPH_NAMES:
            c = getattr(self, f"cutoff_{name}")
            if not c > 0:
                raise ValueError(f"GraphConfig.cutoff_{name} must be > 0 Å, got {c}")
            if c > self.cutoff_a2a:
                raise ValueError(f"GraphConfig.cutoff_{name}={c} exceeds cutoff_a2a={self.cutoff_a2a}: the "
                                 "other graphs are subselected from the a2a graph")
        ks = [self.max_neighbors] + [k for _, k in self.natoms_max_neighbors]
        if any(not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"GraphConfig max neighbours must be positive ints, got {ks}")
        object.__setattr__(self, "qint_tags", tuple(int(t) for t in self.qint_tags))
        object.__setattr__(self, "natoms_max_neighbors",
                           tuple((int(n), int(k)) for n, k in self.natoms_max_neighbors))

    @classmethod
    def uniform(cls, cutoff: float, max_neighbors: int = 30, **kwargs) -> "GraphConfig":
        """All four graphs with the same cutoff (what every JMP task does)."""
        return cls(cutoff_main=cutoff, cutoff_a2ee2a=cutoff, cutoff_qint=cutoff, cutoff_a2a=cutoff,
                   max_neighbors=max_neighbors, **kwargs)

    @classmethod
    def preset(cls, name: str) -> "GraphConfig":
        """JMP's graph settings for a dataset: oc20, oc22 (periodic, 12 Å, k 30), ani1x,
        transition1x, qm9 (molecules, 8 Å), rmd17 (7 Å, k 100), md22, spice (molecules, 12 Å),
        matbench (periodic, 12 Å), qmof (periodic, 19 Å; both with k 10 above 200 atoms and 5
        above 300)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GraphConfig preset {name!r}; known: {', '.join(sorted(_PRESETS))}")
        return _PRESETS[name]

    def neighbors_per_structure(self, natoms: Tensor) -> dict[str, Tensor]:
        """{graph name: k [B] int64} for structures with natoms [B] atoms."""
        k = torch.full_like(natoms, self.max_neighbors)
        for threshold, k_large in self.natoms_max_neighbors:
            k = torch.where(natoms > threshold, torch.minimum(k, torch.full_like(k, k_large)), k)
        return {name: k * p // 30 for name, p in K_PROPORTIONS.items()}


_LARGE_STRUCTURES = ((200, 10), (300, 5))
_PRESETS = {
    "oc20": GraphConfig.uniform(12.0, 30, pbc=True),
    "oc22": GraphConfig.uniform(12.0, 30, pbc=True),
    "ani1x": GraphConfig.uniform(8.0, 30, pbc=False),
    "transition1x": GraphConfig.uniform(8.0, 30, pbc=False),
    "qm9": GraphConfig.uniform(8.0, 30, pbc=False),
    "rmd17": GraphConfig.uniform(7.0, 100, pbc=False),
    "md22": GraphConfig.uniform(12.0, 30, pbc=False),
    "spice": GraphConfig.uniform(12.0, 30, pbc=False),
    "matbench": GraphConfig.uniform(12.0, 30, pbc=True, natoms_max_neighbors=_LARGE_STRUCTURES),
    "qmof": GraphConfig.uniform(19.0, 30, pbc=True, natoms_max_neighbors=_LARGE_STRUCTURES),
}


# ---- checks ----


def check_batch(batch: dict) -> None:
    """Raises a ValueError naming the problem when the batch fields the graphs need disagree."""
    for key in ("pos", "atomic_numbers", "natoms"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r} (keys: {sorted(batch)})")
    pos, natoms = batch["pos"], batch["natoms"]
    if pos.dim() != 2 or pos.shape[1] != 3 or not pos.is_floating_point():
        raise ValueError(f"batch['pos'] must be a float [N, 3] tensor, got {pos.dtype} {tuple(pos.shape)}")
    if natoms.dim() != 1 or natoms.dtype != torch.int64 or natoms.shape[0] == 0:
        raise ValueError(f"batch['natoms'] must be an int64 [B] tensor with B >= 1, got {natoms.dtype} "
                         f"{tuple(natoms.shape)}")
    n, b = pos.shape[0], natoms.shape[0]
    if int(natoms.sum()) != n or int(natoms.min()) < 1:
        raise ValueError(f"batch['natoms'] {natoms.tolist()} must be positive and sum to the {n} atoms of pos")
    expected = {"atomic_numbers": (n,), "batch": (n,), "tags": (n,), "cell": (b, 3, 3), "pbc": (b, 3)}
    for key, shape in expected.items():
        if key in batch and tuple(batch[key].shape) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape} "
                             f"for {n} atoms in {b} structures")
    if "batch" in batch and not torch.equal(batch["batch"], _structure_index(natoms)):
        raise ValueError("batch['batch'] does not match batch['natoms'] (atoms must be grouped by structure)")
    if not torch.isfinite(pos).all():
        bad = (~torch.isfinite(pos)).any(dim=1).nonzero().flatten()
        raise ValueError(f"batch['pos'] has non-finite values at atoms {bad[:10].tolist()}")
    if "cell" in batch and not torch.isfinite(batch["cell"]).all():
        raise ValueError("batch['cell'] has non-finite values")
    if "cell" in batch and "pbc" in batch:
        # A cell in the wrong unit (nm, or a scaled cell) packs thousands of images of each atom
        # into the cutoff sphere: the graph would take minutes and gigabytes before failing.
        # (Imported here, once per process: at module level, `import jmp_ext.graphs` would load
        # jmp_ext.data's package and ASE with it, ~0.4 s, for users of the graphs alone.)
        from jmp_ext.data.format import MAX_ATOMS_PER_A3, dense_cell_problem

        volume = torch.linalg.det(batch["cell"].double()).abs()
        dense = batch["pbc"].all(dim=1) & (volume * MAX_ATOMS_PER_A3 < natoms)
        if dense.any():
            b = int(dense.nonzero()[0])
            raise BatchStructureError([b], dense_cell_problem(int(natoms[b]), float(volume[b])))


def close_pair(pos: Tensor, structure: Tensor, natoms: Tensor, cell: Tensor | None,
               pbc: Tensor) -> tuple[int, int, int, float] | None:
    """The closest pair of atoms of one structure nearer than jmp_ext.data.format.MIN_PAIR_DISTANCE
    (Å), periodic images included, as (structure, i, j, distance Å) with i <= j counted within the
    structure (i == j: an atom and its own image); None when there is none. pos [N, 3] float Å,
    structure [N] int64 (each atom's), natoms [B] int64, cell [B, 3, 3] or None, pbc [B, 3] bool."""
    from jmp_ext.data.format import MIN_PAIR_DISTANCE

    pos, cell = pos.detach().double(), None if cell is None else cell.detach().double()
    # radius_graph never pairs two atoms at distance zero (on one spot, or one on the other's
    # periodic image: a site a file lists at fractional 0 and 1). Searched with each atom moved by
    # its own fixed ~1e-4 Å, they are a pair; the distance is then measured without it, and the
    # search reaches past the limit by twice the largest move. The move follows the atom's index
    # in its structure, not in the batch: a structure is judged alike wherever a batch puts it.
    starts = torch.cumsum(natoms, 0) - natoms
    index = (torch.arange(pos.shape[0], device=pos.device) - starts[structure]).double()
    nudge = 1e-4 * torch.stack([torch.sin(index), torch.cos(1.3 * index), torch.sin(2.1 * index + 0.5)], dim=1)
    edge_index, cell_offset, _ = radius_graph(pos + nudge, MIN_PAIR_DISTANCE + 4e-4, natoms=natoms, cell=cell,
                                              pbc=pbc)
    if edge_index.shape[1] == 0:  # (the usual answer; three custom-op dispatches saved, per entry written)
        return None
    distance = ops.edge_vectors(pos, edge_index, cell_offset, cell, structure).norm(dim=-1)
    close = distance < MIN_PAIR_DISTANCE
    if not bool(close.any()):
        return None
    edge_index, distance = edge_index[:, close], distance[close]
    e = int(distance.argmin())
    i, j = sorted(edge_index[:, e].tolist())
    b = int(structure[i])
    first = int(starts[b])
    return b, i - first, j - first, float(distance[e])


def _structure_index(natoms: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(natoms.shape[0], device=natoms.device), natoms)


def _structure_of_atoms(batch: dict) -> Tensor:
    """[N] each atom's structure: the batch's own index, else computed from natoms."""
    return batch["batch"] if "batch" in batch else _structure_index(batch["natoms"])


# ---- subselection ----


def _rank_in_sorted(target: Tensor) -> Tensor:
    """Rank of every edge among the edges of its target, for edges grouped by target."""
    n = target.numel()
    start = torch.ones(n, dtype=torch.bool, device=target.device)
    start[1:] = target[1:] != target[:-1]
    first = torch.cummax(torch.where(start, torch.arange(n, device=target.device), 0), 0).values
    return torch.arange(n, device=target.device) - first


def _rank_in_target(target: Tensor, key: Tensor) -> Tensor:
    """Rank of every edge among the edges of its target, ordered by key (ties: by edge index)."""
    # jmp_ext.ops.radius_graph already orders edges by (target, distance): then no sort is needed.
    if bool(((target[1:] > target[:-1]) | ((target[1:] == target[:-1]) & (key[1:] >= key[:-1]))).all()):
        return _rank_in_sorted(target)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(target[order], stable=True)]
    rank = torch.empty_like(target)
    rank[order] = _rank_in_sorted(target[order])
    return rank


def _select(graph: dict, edges: Tensor) -> dict:
    """The edges of `graph` that `edges` names: a bool mask [E] or indices, in their order. (One
    nonzero for every field: a mask indexes each field with its own, 2.5x the time.)"""
    index = edges.nonzero().squeeze(1) if edges.dtype == torch.bool else edges
    return {key: value.index_select(1 if key == "edge_index" else 0, index) for key, value in graph.items()}


def subselect(graph: dict, cutoff: Tensor | None, k_per_atom: Tensor) -> dict:
    """Edges of `graph` within cutoff[t] of their target t (None: no filter), then the
    k_per_atom[t] nearest per target t.

    graph: {"edge_index" [2, E], "cell_offset" [E, 3], "distance" [E]}; cutoff [N] (Å; inf: no
    limit) and k_per_atom [N] per atom; keeps the edge order."""
    target = graph["edge_index"][1]
    keep = torch.ones_like(graph["distance"], dtype=torch.bool)
    if cutoff is not None:
        keep = graph["distance"] <= cutoff[target]
    rank = _rank_in_target(target, torch.where(keep, graph["distance"], torch.inf))
    return _select(graph, keep & (rank < k_per_atom[target]))


def tag_filter(graph: dict, tags: Tensor, qint_tags: tuple[int, ...]) -> dict:
    """Edges whose source or target has a tag in qint_tags (JMP's tag_mask)."""
    allowed = torch.isin(tags, torch.tensor(qint_tags, dtype=tags.dtype, device=tags.device))
    s, t = graph["edge_index"]
    return _select(graph, allowed[s] | allowed[t])


def symmetrize(graph: dict) -> tuple[dict, Tensor]:
    """JMP's symmetrize_edges: keep s < t (and, for s == t, the image with a lexicographically
    negative offset), then append every kept edge reversed. Returns (graph, id_swap [E])."""
    (s, t), off = graph["edge_index"], graph["cell_offset"]
    negative = (off[:, 0] < 0) | ((off[:, 0] == 0) & (off[:, 1] < 0)) | (
        (off[:, 0] == 0) & (off[:, 1] == 0) & (off[:, 2] < 0))
    kept = _select(graph, (s < t) | ((s == t) & negative))
    half = kept["cell_offset"].shape[0]
    sym = {"edge_index": torch.cat([kept["edge_index"], kept["edge_index"].flip(0)], dim=1),
           "cell_offset": torch.cat([kept["cell_offset"], -kept["cell_offset"]])}
    arange = torch.arange(half, device=s.device)
    return sym, torch.cat([arange + half, arange])


# ---- geometry ----


def edge_geometry(graph: dict, pos: Tensor, cell: Tensor | None, structure: Tensor) -> tuple[Tensor, Tensor]:
    """(distance [E] Å, vector [E, 3] unit, source image -> target) of a graph, differentiable
    in pos [N, 3] and cell [B, 3, 3] (rows are lattice vectors; None: no periodic images)."""
    r = ops.edge_vectors(pos, graph["edge_index"], graph["cell_offset"], cell, structure)
    d = torch.linalg.vector_norm(r, dim=-1)
    return d, -r / d[:, None]


def with_geometry(graphs: dict, pos: Tensor, cell: Tensor | None, structure: Tensor) -> dict:
    """A copy of graphs whose four graphs get distance and vector recomputed from pos and cell
    (for a strained cell or positions that require grad). cell None: non-periodic."""
    out = dict(graphs)
    for name in GRAPH_NAMES:
        g = dict(graphs[name])
        g["distance"], g["vector"] = edge_geometry(g, pos, cell, structure)
        out[name] = g
    return out


# ---- everything together ----


def _kmax(rank: Tensor) -> int:
    return int(rank.max()) + 1 if rank.numel() else 0


@dataclass(frozen=True)
class _BatchSettings:
    """Each structure's graph settings in a batch, from the GraphConfig of its task."""

    configs: list[GraphConfig]
    k: dict[str, Tensor]
    """graph name -> [B] int64, neighbours per target atom."""
    cutoff: dict[str, Tensor]
    """graph name -> [B] float64, Å."""
    pbc: Tensor
    """[B] bool: the config uses the batch's pbc flags (else the structure is a molecule)."""
    periodic: bool
    """Some config uses pbc and the batch has cells: periodic images may enter."""


def _batch_settings(batch: dict, config: GraphConfig | list[GraphConfig]) -> _BatchSettings:
    natoms = batch["natoms"]
    configs = [config] if isinstance(config, GraphConfig) else list(config)
    if len(configs) == 1:
        task = torch.zeros_like(natoms)
    else:
        if "task" not in batch:
            raise ValueError(f"{len(configs)} GraphConfigs need batch['task'] [B], the config index of each structure")
        task = batch["task"]
        low, high = torch.aminmax(task) if task.numel() else (0, 0)
        if task.shape != natoms.shape or not 0 <= int(low) <= int(high) < len(configs):
            raise ValueError(f"batch['task'] must be [B] indices into the {len(configs)} GraphConfigs")
        if len({c.qint_tags for c in configs}) > 1:
            raise ValueError(f"GraphConfigs of one batch must share qint_tags, got {[c.qint_tags for c in configs]}")
    per_config = [c.neighbors_per_structure(natoms) for c in configs]
    structures = torch.arange(natoms.shape[0], device=natoms.device)
    cutoff = torch.tensor([[getattr(c, f"cutoff_{name}") for name in GRAPH_NAMES] for c in configs],
                          dtype=torch.float64).to(natoms.device)[task]
    return _BatchSettings(
        configs=configs,
        k={name: torch.stack([k[name] for k in per_config])[task, structures] for name in GRAPH_NAMES},
        cutoff={name: cutoff[:, i] for i, name in enumerate(GRAPH_NAMES)},
        pbc=torch.tensor([c.pbc for c in configs]).to(natoms.device)[task],
        periodic=any(c.pbc for c in configs) and "cell" in batch)


def _search_cell_pbc(batch: dict, settings: _BatchSettings) -> tuple[Tensor | None, Tensor]:
    """The cell (None when nothing is periodic) and pbc [B, 3] the a2a radius graph searches
    with: a batch without pbc is periodic along every axis, and a structure whose GraphConfig is
    not periodic is searched as a molecule."""
    pos, natoms = batch["pos"], batch["natoms"]
    pbc = torch.zeros(natoms.shape[0], 3, dtype=torch.bool, device=pos.device)
    if not settings.periodic:
        return None, pbc
    pbc = (batch["pbc"] if "pbc" in batch else ~pbc) & settings.pbc[:, None]
    return batch["cell"].detach().to(pos.dtype), pbc


def graphs_from_a2a(batch: dict, a2a: dict, config: GraphConfig | list[GraphConfig], *,
                    edge_dropout: float | None = None, generator: torch.Generator | None = None) -> dict:
    """Steps 2-6 of the module docstring (and step 1's edge dropout), given the a2a graph
    {"edge_index", "cell_offset"} (e.g. JMP's own, in the parity tests) and optionally its
    "distance" [E]. See build_graphs for `config` and the result."""
    return _graphs_from_a2a(batch, a2a, _batch_settings(batch, config), edge_dropout, generator)


def _cutoffs_per_atom(settings: _BatchSettings, structure: Tensor, dtype: torch.dtype) -> dict[str, Tensor | None]:
    """Per atom [N] (dtype), the cutoff of each graph where it is below the one of the graph it
    is taken from (a2a from the batch's, the largest a2a cutoff; the others from the structure's
    a2a), else inf; None for a graph no config filters. Decided from the configs (no device
    sync), a filter runs only where some config needs it, so an edge within the larger cutoff is
    never dropped by a last-bit distance difference. Compared in the distances' dtype, as JMP
    does. (So in float32 a pair within half an ulp of a smaller a2a cutoff of a mixed batch is
    kept, where radius_graph, deciding in float64, leaves it out of the structure's graph alone;
    the envelope is zero there.)"""
    configs, a2a_cutoff = settings.configs, settings.cutoff["a2a"]
    radius = max(c.cutoff_a2a for c in configs)
    cutoff_atom = {"a2a": torch.where(a2a_cutoff < radius, a2a_cutoff, torch.inf).to(dtype)[structure]
                   if any(c.cutoff_a2a < radius for c in configs) else None}
    for name in ("main", "a2ee2a", "qint"):
        c = settings.cutoff[name]
        cutoff_atom[name] = (torch.where(c < a2a_cutoff, c, torch.inf).to(dtype)[structure]
                             if any(getattr(g, f"cutoff_{name}") < g.cutoff_a2a for g in configs) else None)
    return cutoff_atom


def _check_main_edges(a2a: dict, settings: _BatchSettings, structure: Tensor, natoms: Tensor) -> None:
    """Raises StructuresWithoutEdges for the structures none of whose a2a edges is within their
    main cutoff (the backbone needs one)."""
    main_cutoff = settings.cutoff["main"].to(a2a["distance"].dtype)[structure]
    in_main = a2a["edge_index"][1][a2a["distance"] <= main_cutoff[a2a["edge_index"][1]]]
    per_structure = torch.zeros_like(natoms).index_add_(0, structure[in_main], torch.ones_like(in_main))
    if (per_structure == 0).any():
        empty = (per_structure == 0).nonzero().flatten().tolist()
        cutoffs = sorted({c.cutoff_main for c in settings.configs})
        raise StructuresWithoutEdges(empty, cutoffs[0] if len(cutoffs) == 1 else cutoffs)


def _graphs_from_a2a(batch: dict, a2a: dict, settings: _BatchSettings, edge_dropout: float | None,
                     generator: torch.Generator | None) -> dict:
    pos, natoms = batch["pos"], batch["natoms"]
    num_atoms = pos.shape[0]
    structure = _structure_of_atoms(batch)
    configs = settings.configs
    cell = batch["cell"].to(pos.dtype) if settings.periodic else None
    k_atom = {name: k[structure] for name, k in settings.k.items()}
    distance = a2a.get("distance")
    a2a = {"edge_index": a2a["edge_index"], "cell_offset": a2a["cell_offset"].to(torch.int32)}
    if distance is None:
        with torch.no_grad():
            distance, _ = edge_geometry(a2a, pos.detach(), None if cell is None else cell.detach(), structure)
    # Subselection ranks edges by this distance. radius_graph's own comes sorted by (target,
    # distance), so the ranks need no sort; a recomputed one can differ in the last bit and
    # reorder near-ties.
    a2a["distance"] = distance.detach()
    cutoff_atom = _cutoffs_per_atom(settings, structure, distance.dtype)
    if cutoff_atom["a2a"] is not None:
        a2a = _select(a2a, a2a["distance"] <= cutoff_atom["a2a"][a2a["edge_index"][1]])
    # Checked before edge dropout: dropout may leave a small molecule without edges (the
    # original's dropout_edge does too); it then trains on its atom embeddings for one step.
    _check_main_edges(a2a, settings, structure, natoms)
    if edge_dropout:
        keep = torch.rand(a2a["distance"].shape, generator=generator, dtype=torch.float32,
                          device=generator.device if generator is not None else pos.device) >= edge_dropout
        a2a = _select(a2a, keep.to(pos.device))
    a2a = subselect(a2a, None, k_atom["a2a"])

    graphs = {"a2a": a2a}
    for name in ("main", "a2ee2a", "qint"):
        graphs[name] = subselect(a2a, cutoff_atom[name], k_atom[name])
    if "tags" in batch:
        graphs["qint"] = tag_filter(graphs["qint"], batch["tags"], configs[0].qint_tags)
    graphs["main"], id_swap = symmetrize(graphs["main"])

    # a2a is summed per target (a CSR pointer), a2ee2a padded by neighbour rank: group by target.
    for name in ("a2a", "a2ee2a"):
        g = graphs[name]
        if not bool((g["edge_index"][1].diff() >= 0).all()):
            g = _select(g, torch.argsort(g["edge_index"][1], stable=True))
        graphs[name] = g
    graphs["a2ee2a"]["target_neighbor_idx"] = _rank_in_sorted(graphs["a2ee2a"]["edge_index"][1])
    for g in graphs.values():
        g.pop("distance", None)  # recomputed with autograd below

    graphs["num_atoms"] = num_atoms
    graphs["id_swap"] = id_swap
    # int32 interaction indices: half the bytes of int64 to write here and to read in every
    # gather of the model. A batch whose triplets or quadruplets overflow int32 (their int64
    # indices alone would take over 32 GB) gets a ValueError that names the count.
    index = {"index_dtype": torch.int32}
    graphs["trip_e2e"] = ops.triplets(graphs["main"], num_atoms, **index)
    graphs["trip_a2e"] = ops.mixed_triplets(graphs["a2ee2a"], graphs["main"], num_atoms, **index)
    graphs["trip_e2a"] = ops.mixed_triplets(graphs["main"], graphs["a2ee2a"], num_atoms, **index)
    graphs["quad"] = ops.quadruplets(graphs["main"], graphs["qint"], num_atoms, **index)
    graphs["quad_edges"] = quad_edges(graphs["quad"])
    # Only the edge-to-atom block is padded; everything else is summed ragged (ops.segment_outer).
    graphs["kmax"] = {"a2ee2a": _kmax(graphs["a2ee2a"]["target_neighbor_idx"])}
    return with_geometry(graphs, pos, cell, structure)


def quad_edges(quad: dict) -> Tensor:
    """Main edges that end an output triplet, ascending [E_q]: the only ones with a quadruplet
    message (about half of them on OC20 slabs), so the model projects the quadruplet basis for
    these alone. quad: jmp_ext.ops.quadruplets' dict (output triplets sorted by out edge).
    int64, whatever the dtype of quad: the model index_copy's by it, which takes only int64."""
    return torch.unique_consecutive(quad["triplet_out"]["out"]).long()


def truncated_neighbors(batch: dict, config: GraphConfig) -> dict[str, tuple[int, int]]:
    """{graph name: (most neighbours of an atom within the graph's cutoff, the k it keeps)} for
    the graphs whose k leaves some atom's neighbours out: there the energy steps as the k-nearest
    set changes (MD drifts, relaxations oscillate). The quadruplet graph is counted before its
    tag filter, an upper bound."""
    check_batch(batch)
    pos, natoms = batch["pos"].detach(), batch["natoms"]
    cell, pbc = _search_cell_pbc(batch, _batch_settings(batch, config))  # (as build_graphs reads the batch)
    edge_index, _, distance = radius_graph(pos, config.cutoff_a2a, natoms=natoms, cell=cell, pbc=pbc)
    structure = _structure_index(natoms)
    out = {}
    for name, k in config.neighbors_per_structure(natoms).items():
        k_atom = k[structure]
        targets = edge_index[1][distance <= getattr(config, f"cutoff_{name}")]
        counts = torch.bincount(targets, minlength=pos.shape[0])
        over = counts > k_atom
        if over.any():
            out[name] = (int(counts.max()), int(k_atom[over].min()))
    return out


def collinear_quadruplets(graphs: dict, max_sine: float = 1e-4) -> int:
    """How many quadruplets d->b->a<-c of build_graphs' `graphs` have an angle c-a-b or d-b-a
    within `max_sine` (its sine) of 0 or 180 degrees, its three atoms distinct: there GemNet-OC's
    dihedral (between the planes c-a-b and a-b-d) is undefined, its basis singular and the
    forces unreliable. Translated copies of an atom in a supercell lie on such lines, whatever
    rattle the cell they copy had; three images of one atom do too, but move together, so they
    are not counted."""
    main, qint, quad = graphs["main"], graphs["qint"], graphs["quad"]

    def singular(main_edge: Tensor, qint_edge: Tensor, at: int) -> Tensor:
        # Triplets of a main edge and a qint edge meeting at atom `at` of the qint edge (row 1:
        # its target a, row 0: its source b).
        u, v = main["vector"][main_edge].detach(), qint["vector"][qint_edge].detach()
        sine = torch.linalg.cross(u, v).norm(dim=-1) / (u.norm(dim=-1) * v.norm(dim=-1))
        # The main edge's atoms (the shared one second) and the qint edge's other atom.
        (first, shared), third = main["edge_index"][:, main_edge], qint["edge_index"][1 - at, qint_edge]
        images = (first == shared) & (shared == third)
        return (sine < max_sine) & ~images

    t_in, t_out = quad["triplet_in"], quad["triplet_out"]
    at_a = singular(t_out["out"].long(), t_out["in"].long(), 1)[quad["trip_out_to_quad"].long()]
    at_b = singular(t_in["in"].long(), t_in["out"].long(), 0)[quad["trip_in_to_quad"].long()]
    return int((at_a | at_b).sum())


def build_graphs(batch: dict, config: GraphConfig | list[GraphConfig], *, edge_dropout: float | None = None,
                 generator: torch.Generator | None = None) -> dict:
    """The graphs dict GemNetOCBackbone.forward(h, graphs) takes, from a collated batch.

    batch: jmp_ext.data.collate's dict; uses pos [N, 3] (Å), natoms [B], batch [N], cell [B, 3, 3],
    pbc [B, 3], tags [N] (optional: without tags every edge enters qint), and with several
    configs task [B] (int64, which config each structure uses).
    config: one GraphConfig for every structure, or a list of them (one per task; they must share
    qint_tags).
    edge_dropout: probability of dropping each a2a edge (pass it only while training).

    Returns {"num_atoms": N,
             "main", "a2ee2a", "qint", "a2a": {"edge_index" [2, E] int64, "cell_offset" [E, 3] int32,
                 "distance" [E] Å, "vector" [E, 3]} (a2a and a2ee2a grouped by target, a2ee2a with
                 "target_neighbor_idx" [E]),
             "id_swap" [E_main],
             "trip_e2e", "trip_a2e", "trip_e2a": {"in", "out", "out_agg"} int32,
             "quad": jmp_ext.ops.quadruplets' dict (int32), "quad_edges" [E_q] (see quad_edges),
             "kmax": {"a2ee2a": int}}.
    Distances and vectors are differentiable in batch["pos"] and batch["cell"]."""
    check_batch(batch)
    if edge_dropout is not None and not 0.0 <= edge_dropout < 1.0:
        raise ValueError(f"edge_dropout must be in [0, 1), got {edge_dropout}")
    pos, natoms = batch["pos"], batch["natoms"]
    settings = _batch_settings(batch, config)
    cell, pbc = _search_cell_pbc(batch, settings)
    pair = close_pair(pos, _structure_of_atoms(batch), natoms, cell, pbc)
    if pair is not None:
        from jmp_ext.data.format import close_pair_problem

        raise BatchStructureError([pair[0]], close_pair_problem(*pair[1:]))
    edge_index, cell_offset, distance = radius_graph(
        pos.detach(), max(c.cutoff_a2a for c in settings.configs), natoms=natoms, cell=cell, pbc=pbc,
        max_neighbors=int(settings.k["a2a"].max()))
    return _graphs_from_a2a(batch, {"edge_index": edge_index, "cell_offset": cell_offset, "distance": distance},
                            settings, edge_dropout, generator)
