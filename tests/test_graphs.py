"""jmp_ext.graphs: the four GemNet-OC graphs against JMP's (fixtures), brute force and edge cases.

End to end: from the fixtures' raw inputs (and JMP's a2a graph, or our radius_graph where it is
available) build_graphs + the backbone reproduce JMP's outputs and position gradient."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "models"))
from jmp_fixtures import CASES, edge_keys, fixture_batch, fixture_config, graphs_on_jmps_a2a, load, requires_fixtures  # noqa: E402

from jmp_ext import graphs as G  # noqa: E402
from jmp_ext.models import BackboneConfig, GemNetOCBackbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TAG = {torch.float64: "f64", torch.float32: "f32"}
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def model_f64():
    w = load("weights.pt")
    backbone = GemNetOCBackbone(BackboneConfig.from_dict(w["meta"]["config"]))
    backbone.load_state_dict(w["backbone_state_dict"])
    emb = torch.nn.Embedding(120, 32)
    emb.load_state_dict(w["embedding_state_dict"])
    return backbone, emb


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@requires_fixtures
@pytest.mark.parametrize("case_name", CASES)
def test_subselected_graphs_are_jmps(case_name):
    case = load(f"{case_name}.pt")
    graphs = graphs_on_jmps_a2a(case, fixture_batch(case, torch.float64))
    for name in ("a2a", "a2ee2a", "qint"):
        ref = case["graphs"][name]
        ours = graphs[name]
        assert sorted(edge_keys(ours["edge_index"], ours["cell_offset"])) == sorted(
            edge_keys(ref["edge_index"], ref["cell_offset"])), name
        keys = dict(zip(edge_keys(ref["edge_index"], ref["cell_offset"]), ref["distance_f64"].tolist()))
        expected = torch.tensor([keys[k] for k in edge_keys(ours["edge_index"], ours["cell_offset"])], dtype=torch.float64)
        torch.testing.assert_close(ours["distance"], expected, rtol=1e-12, atol=0)
    sym = case["indices"]["main_sym"]
    main = graphs["main"]
    assert sorted(edge_keys(main["edge_index"], main["cell_offset"])) == sorted(
        edge_keys(sym["edge_index"], sym["cell_offset"]))
    # id_swap maps every edge to its reverse.
    assert torch.equal(main["edge_index"][:, graphs["id_swap"]], main["edge_index"].flip(0))
    assert torch.equal(main["cell_offset"][graphs["id_swap"]], -main["cell_offset"])
    # Triplet / quadruplet counts are JMP's (their content is tested in tests/ops).
    for name in ("trip_e2e", "trip_a2e", "trip_e2a"):
        assert graphs[name]["out"].numel() == case["indices"][name]["out"].numel(), name
    assert graphs["quad"]["out"].numel() == case["indices"]["quad"]["out"].numel()


def check_outputs(case, graphs, backbone, emb, dtype, pos):
    out = backbone.to(dtype)(emb.to(dtype)(case["inputs"]["atomic_numbers"] - 1), graphs)
    ref = case[f"outputs_{TAG[dtype]}"]
    assert rel_err(out["energy"], ref["energy"]) < TOL[dtype]
    ref_keys = {k: i for i, k in enumerate(edge_keys(case["indices"]["main_sym"]["edge_index"],
                                                     case["indices"]["main_sym"]["cell_offset"]))}
    main = graphs["main"]
    perm = torch.tensor([ref_keys[k] for k in edge_keys(main["edge_index"], main["cell_offset"])])
    assert rel_err(out["forces"], ref["forces"][perm]) < TOL[dtype]
    assert rel_err(out["V_st"], ref["V_st"][perm]) < TOL[dtype]
    value = (out["energy"] @ case["scalar_test"]["proj"].to(dtype)).sum()
    (grad,) = torch.autograd.grad(value, pos)
    assert rel_err(grad, case["scalar_test"][f"grad_pos_{TAG[dtype]}"]) < TOL[dtype]


@requires_fixtures
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_name", CASES)
def test_backbone_on_our_graphs_matches_jmp(model_f64, case_name, dtype):
    """Graphs from JMP's raw a2a graph: subselection, symmetrisation, indices and geometry are ours."""
    case = load(f"{case_name}.pt")
    backbone, emb = model_f64
    batch = fixture_batch(case, dtype)
    batch["pos"].requires_grad_(True)
    graphs = graphs_on_jmps_a2a(case, batch)
    check_outputs(case, graphs, backbone, emb, dtype, batch["pos"])


@requires_fixtures
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_name", CASES)
def test_build_graphs_end_to_end_matches_jmp(model_f64, case_name, dtype):
    case = load(f"{case_name}.pt")
    backbone, emb = model_f64
    batch = fixture_batch(case, dtype)
    batch["pos"].requires_grad_(True)
    graphs = G.build_graphs(batch, fixture_config(case))
    for name in ("a2a", "a2ee2a", "qint"):
        ref = case["graphs"][name]
        assert sorted(edge_keys(graphs[name]["edge_index"], graphs[name]["cell_offset"])) == sorted(
            edge_keys(ref["edge_index"], ref["cell_offset"])), name
    check_outputs(case, graphs, backbone, emb, dtype, batch["pos"])


@requires_fixtures
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_second_gpu_matches_the_cpu_while_the_first_is_current(model_f64):
    """The kernels launch on the current GPU; jmp_ext makes that the inputs' GPU."""
    case = load("oc20_slab.pt")
    backbone, emb = (m.double() for m in model_f64)  # (check_outputs may have left them float32)
    numbers = case["inputs"]["atomic_numbers"] - 1
    batch = fixture_batch(case, torch.float64)
    graphs = G.build_graphs(batch, fixture_config(case))
    energy = backbone(emb(numbers), graphs)["energy"]
    gpu = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    batch_gpu = {k: v.to(gpu) if torch.is_tensor(v) else v for k, v in batch.items()}
    graphs_gpu = G.build_graphs(batch_gpu, fixture_config(case))
    energy_gpu = copy.deepcopy(backbone).to(gpu)(copy.deepcopy(emb).to(gpu)(numbers.to(gpu)), graphs_gpu)["energy"]
    main, main_gpu = graphs["main"], graphs_gpu["main"]
    assert sorted(edge_keys(main_gpu["edge_index"].cpu(), main_gpu["cell_offset"].cpu())) == sorted(
        edge_keys(main["edge_index"], main["cell_offset"]))
    torch.testing.assert_close(energy_gpu.cpu(), energy, rtol=1e-9, atol=1e-9)


# ---- pieces against brute force ----


def random_graph(seed, num_atoms=12, num_edges=200):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, num_atoms, (2, num_edges), generator=g)
    edge_index = edge_index[:, torch.argsort(edge_index[1], stable=True)]
    return {"edge_index": edge_index, "cell_offset": torch.randint(-1, 2, (num_edges, 3), generator=g, dtype=torch.int32),
            "distance": torch.rand(num_edges, generator=g, dtype=torch.float64) * 10}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("cutoff", [None, 6.0])
@pytest.mark.parametrize("by_distance", [False, True], ids=["by_target", "by_target_distance"])
def test_subselect_is_topk_per_target(seed, cutoff, by_distance):
    graph = random_graph(seed)
    if by_distance:  # radius_graph's order, which subselect ranks without sorting
        order = torch.argsort(graph["edge_index"][1] * 100 + graph["distance"])
        graph = G._select(graph, order)
    k = torch.randint(1, 12, (12,), generator=torch.Generator().manual_seed(seed + 100))
    ours = G.subselect(graph, None if cutoff is None else torch.full((12,), cutoff, dtype=torch.float64), k)
    expected = set()
    for t in range(12):
        edges = [e for e in range(graph["distance"].numel()) if graph["edge_index"][1, e] == t
                 and (cutoff is None or graph["distance"][e] <= cutoff)]
        edges.sort(key=lambda e: graph["distance"][e].item())
        expected |= set(edges[: k[t]])
    keys = lambda g: sorted(zip(*g["edge_index"].tolist(), g["distance"].tolist()))  # noqa: E731
    assert keys(ours) == keys(G._select(graph, torch.tensor(sorted(expected), dtype=torch.long)))
    assert (ours["edge_index"][1].diff() >= 0).all()  # order kept


def test_tag_filter_keeps_edges_touching_qint_tags():
    graph = random_graph(0)
    tags = torch.tensor([0, 1, 2, 0, 0, 1, 0, 2, 0, 0, 1, 0])
    ours = G.tag_filter(graph, tags, (1, 2))
    s, t = graph["edge_index"]
    expected = [e for e in range(s.numel()) if tags[s[e]] > 0 or tags[t[e]] > 0]
    assert ours["edge_index"].shape[1] == len(expected)
    assert torch.equal(ours["edge_index"], graph["edge_index"][:, expected])


def test_natoms_dependent_neighbors_and_presets():
    config = G.GraphConfig.preset("matbench")
    k = config.neighbors_per_structure(torch.tensor([10, 200, 201, 300, 301]))
    assert k["main"].tolist() == [30, 30, 10, 10, 5]
    assert k["a2ee2a"].tolist() == [20, 20, 6, 6, 3]
    assert k["qint"].tolist() == [8, 8, 2, 2, 1]
    assert k["a2a"].tolist() == [1000, 1000, 333, 333, 166]
    assert G.GraphConfig.preset("qmof").cutoff_a2a == 19.0
    assert G.GraphConfig.preset("rmd17").max_neighbors == 100 and not G.GraphConfig.preset("rmd17").pbc
    with pytest.raises(ValueError, match="unknown GraphConfig preset"):
        G.GraphConfig.preset("oc21")
    with pytest.raises(ValueError, match="exceeds cutoff_a2a"):
        G.GraphConfig(cutoff_main=8.0, cutoff_a2ee2a=6.0, cutoff_qint=6.0, cutoff_a2a=6.0)


@requires_fixtures
def test_edge_dropout_is_seeded_and_drops_about_p():
    case = load("oc20_slab.pt")
    a2a = {"edge_index": case["graphs"]["a2a"]["edge_index"], "cell_offset": case["graphs"]["a2a"]["cell_offset"]}
    batch, config = fixture_batch(case, torch.float64), fixture_config(case)
    run = lambda seed: G.graphs_from_a2a(batch, a2a, config, edge_dropout=0.3,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a["a2a"]["edge_index"], b["a2a"]["edge_index"])
    assert not torch.equal(a["a2a"]["edge_index"], c["a2a"]["edge_index"])
    kept = a["a2a"]["edge_index"].shape[1] / a2a["edge_index"].shape[1]
    assert 0.65 < kept < 0.75  # 5812 edges: the binomial std is 0.6 %
    # The other graphs come from the dropped a2a graph.
    a2a_keys = set(edge_keys(a["a2a"]["edge_index"], a["a2a"]["cell_offset"]))
    assert set(edge_keys(a["a2ee2a"]["edge_index"], a["a2ee2a"]["cell_offset"])) <= a2a_keys


@requires_fixtures
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_geometry_is_not_rounded_under_autocast(dtype):
    """The trainer builds graphs inside torch.autocast (loop.precision bf16 / fp16). Distances
    and vectors must come out as without it: a bf16 bmm of a lattice shift is ~0.03 Å off."""
    case = load("oc20_slab.pt")
    batch = fixture_batch(case, torch.float32)
    config = fixture_config(case)
    plain = G.build_graphs(batch, config)
    with torch.autocast("cpu", dtype=dtype):
        mixed = G.build_graphs(batch, config)
    for name in G.GRAPH_NAMES:
        assert torch.equal(mixed[name]["distance"], plain[name]["distance"]), name
        assert torch.equal(mixed[name]["vector"], plain[name]["vector"]), name
    from jmp_ext.ops import edge_vectors

    main = plain["main"]
    args = (batch["pos"], main["edge_index"], main["cell_offset"], batch["cell"], batch["batch"])
    with torch.autocast("cpu", dtype=dtype):
        mixed_vectors = edge_vectors(*args)
    assert mixed_vectors.dtype == torch.float32 and torch.equal(mixed_vectors, edge_vectors(*args))


# ---- bad input ----


@requires_fixtures
def test_bad_batches_raise_clear_errors():
    case = load("ani_molecules.pt")
    batch = fixture_batch(case, torch.float64)
    config = fixture_config(case)
    bad = dict(batch, pos=batch["pos"].clone())
    bad["pos"][3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite values at atoms \\[3\\]"):
        G.check_batch(bad)
    with pytest.raises(ValueError, match="sum to the 21 atoms"):
        G.check_batch(dict(batch, natoms=torch.tensor([9, 11])))
    for natoms in (torch.tensor(21), torch.zeros(0, dtype=torch.int64)):  # 0-d, B = 0
        with pytest.raises(ValueError, match=r"natoms'\] must be an int64 \[B\] tensor with B >= 1"):
            G.check_batch(dict(batch, natoms=natoms))
    with pytest.raises(ValueError, match="tags"):
        G.check_batch(dict(batch, tags=batch["tags"][:-1]))
    with pytest.raises(ValueError, match="batch\\['batch'\\] does not match"):
        G.check_batch(dict(batch, batch=batch["batch"].flip(0)))
    # A periodic cell in nm rather than Å: refused before a graph of minutes and gigabytes.
    slab = fixture_batch(load("oc20_slab.pt"), torch.float64)
    G.check_batch(slab)
    with pytest.raises(G.BatchStructureError, match=r"structure\(s\) \[0\] of the batch: \d+ atom\(s\) in a periodic cell "
                                                  r"of .* Å\^3 \(the densest solids hold ~0.2 atoms/Å\^3\): cells are "
                                                  r"in Å"):
        G.check_batch(dict(slab, cell=slab["cell"] * 0.1))
    # An atom duplicated onto another of the second structure (which the graphs would not pair).
    first = int(batch["natoms"][0])
    twice = dict(batch, pos=batch["pos"].clone())
    twice["pos"][first + 4] = twice["pos"][first + 1]
    with pytest.raises(G.BatchStructureError, match=r"structure\(s\) \[1\] of the batch: atoms 1 and 4 are 0 Å "
                                                  r"apart, closer than any two atoms can be \(0.1 Å\): a duplicated atom"):
        G.build_graphs(twice, config)
    twice["pos"][first + 4, 0] += 0.07
    with pytest.raises(G.BatchStructureError, match=r"\[1\] of the batch: atoms 1 and 4 are 0.07 Å apart"):
        G.build_graphs(twice, config)
    # A structure whose atoms are all beyond the cutoff of each other has no edge.
    far = dict(batch, pos=batch["pos"] * torch.where(batch["batch"] == 1, 100.0, 1.0)[:, None])
    keep = case["graphs"]["a2a"]["edge_index"][1] < 9
    a2a_far = {"edge_index": case["graphs"]["a2a"]["edge_index"][:, keep],
               "cell_offset": case["graphs"]["a2a"]["cell_offset"][keep]}
    with pytest.raises(ValueError, match="structure\\(s\\) \\[1\\] of the batch: no pair of atoms within cutoff_main"):
        G.graphs_from_a2a(far, a2a_far, config)


# ---- batches mixing tasks with different graph settings ----


def test_mixed_task_batch_gives_each_structure_its_own_tasks_graphs():
    """JMP builds OC20's graphs at 12 Å and ANI-1x's at 8 Å, the latter without periodicity. In a
    batch mixing tasks every structure must get exactly the graphs it gets alone under its
    task's GraphConfig (the a2a graph is built once at the largest cutoff, then filtered)."""
    from ase.build import fcc111, molecule

    from jmp_ext.data import collate

    def entry(atoms, tags):
        n = len(atoms)
        return {"pos": torch.tensor(atoms.positions), "atomic_numbers": torch.tensor(atoms.numbers),
                "cell": torch.tensor(atoms.cell.array), "pbc": torch.tensor(atoms.pbc),
                "tags": torch.tensor(tags), "fixed": torch.zeros(n, dtype=torch.bool)}

    slab = fcc111("Cu", (2, 2, 3), vacuum=4.0)
    slab.rattle(0.05, seed=1)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=2)
    entries = [entry(slab, [0] * 4 + [1] * 8), entry(mol, [2] * len(mol)),
               entry(slab, [1] * 12), entry(mol, [2] * len(mol))]
    configs = [G.GraphConfig.uniform(6.0, 12, pbc=True),
               G.GraphConfig(cutoff_main=2.5, cutoff_a2ee2a=3.0, cutoff_qint=2.5, cutoff_a2a=3.5, max_neighbors=6,
                             pbc=False)]
    task = torch.tensor([0, 1, 1, 0])  # the slab also as a molecule (pbc=False), the molecule at 6 Å
    batch = collate(entries, dtype=torch.float64)
    batch["task"] = task
    mixed = G.build_graphs(batch, configs)
    first = torch.cumsum(batch["natoms"], 0) - batch["natoms"]
    for i, e in enumerate(entries):
        alone = G.build_graphs(collate([e], dtype=torch.float64), configs[int(task[i])])
        for name in G.GRAPH_NAMES:
            g = mixed[name]
            mine = batch["batch"][g["edge_index"][1]] == i
            ours = dict(zip(edge_keys(g["edge_index"][:, mine] - first[i], g["cell_offset"][mine]),
                            g["distance"][mine].tolist()))
            ref = dict(zip(edge_keys(alone[name]["edge_index"], alone[name]["cell_offset"]),
                           alone[name]["distance"].tolist()))
            assert ours.keys() == ref.keys() and len(ref) > 0, (i, name)
            assert all(ours[k] == pytest.approx(ref[k], rel=1e-12) for k in ref), (i, name)
    assert (mixed["a2a"]["cell_offset"][batch["batch"][mixed["a2a"]["edge_index"][1]] == 2] == 0).all()
    with pytest.raises(ValueError, match="need batch\\['task'\\]"):
        G.build_graphs({k: v for k, v in batch.items() if k != "task"}, configs)
    with pytest.raises(ValueError, match="indices into the 2 GraphConfigs"):
        G.build_graphs(dict(batch, task=torch.tensor([0, 1, 2, 0])), configs)


def test_subgraph_cutoffs_compare_in_the_distance_dtype():
    """JMP filters its float32 distances against a Python float cutoff, i.e. in float32: a pair at
    exactly float32(5.3) Å is inside cutoff_main = 5.3 (in float64 it would be 2e-7 Å outside)."""
    from jmp_ext.data import collate

    x = float(torch.tensor(5.3, dtype=torch.float32))
    assert x > 5.3
    entry = {"pos": torch.tensor([[0.0, 0.0, 0.0], [x, 0.0, 0.0], [0.0, 7.0, 0.0]]),
             "atomic_numbers": torch.tensor([1, 1, 1]), "cell": torch.zeros(3, 3), "pbc": torch.zeros(3, dtype=torch.bool),
             "tags": torch.full((3,), 2), "fixed": torch.zeros(3, dtype=torch.bool)}
    batch = collate([entry], dtype=torch.float32)
    config = G.GraphConfig(cutoff_main=5.3, cutoff_a2ee2a=5.3, cutoff_qint=5.3, cutoff_a2a=8.0, pbc=False)
    graphs = G.build_graphs(batch, config)
    for name in ("main", "a2ee2a", "qint"):
        assert sorted(map(tuple, graphs[name]["edge_index"].t().tolist())) == [(0, 1), (1, 0)], name
    assert graphs["a2a"]["edge_index"].shape[1] == 4  # (atoms 1 and 2 are 8.8 Å apart)


def test_a_close_pair_is_judged_alike_wherever_its_structure_sits_in_a_batch():
    """Two atoms 0.09995 Å apart (under the 0.1 Å limit) were refused after an odd number of
    molecules in the batch and accepted after an even one, and 0.10005 Å the other way round (a
    review): the search moves each atom by ~1e-4 Å by its index, which was the batch's. Now the
    structure's own, and the verdict is on the distance as given."""
    from ase import Atoms
    from ase.build import molecule

    from jmp_ext.data import atoms_to_entry, collate

    config = G.GraphConfig.uniform(4.0, 30)
    for gap, refused in ((0.09995, True), (0.10005, False)):
        pair = atoms_to_entry(Atoms("CHH", positions=[[0, 0, 0], [1.1, 0, 0], [1.6, 0, 0]]))
        pair["pos"][2, 0] = 1.1 + gap  # (after the entry's own check, which is the same function's)
        for before in range(6):
            batch = collate([atoms_to_entry(molecule("H2O"))] * before + [pair], dtype=torch.float64)
            if refused:
                with pytest.raises(G.BatchStructureError, match=rf"structure\(s\) \[{before}\] of the batch: atoms 1 "
                                                              r"and 2 are 0\.0999 Å apart"):
                    G.build_graphs(batch, config)
            else:
                G.build_graphs(batch, config)


def test_collinear_quadruplets_are_distinct_atoms_on_a_line():
    """atoms.repeat puts the copies of an atom on lines (where the dihedral basis is singular)
    whatever rattle the repeated cell had; a rattle after repeating removes them. A perfect
    primitive cell's lines are images of one atom, which move together: not counted. A linear
    molecule (C2H2) lies on a line, CH4 does not. Each count equals numpy's, from
    the positions and lattice shifts of every quadruplet's edges."""
    import numpy as np
    from ase import Atoms
    from ase.build import bulk, molecule

    from jmp_ext.data import atoms_to_entry, collate

    def brute_force(atoms, graphs) -> int:
        pos, cell = atoms.positions, atoms.cell.array

        def edges(graph, index):
            (source, target), shift = graph["edge_index"][:, index].numpy(), graph["cell_offset"][index].numpy()
            return source, target, pos[source] + shift @ cell - pos[target]

        def singular(main, qint, main_edge, qint_edge, at):
            c, a, u = edges(graphs[main], main_edge)
            b = graphs[qint]["edge_index"][1 - at, qint_edge].numpy()
            v = edges(graphs[qint], qint_edge)[2]
            sine = np.linalg.norm(np.cross(u, v), axis=1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
            return (sine < 1e-4) & ~((c == a) & (a == b))

        quad = graphs["quad"]
        t_out, t_in = quad["triplet_out"], quad["triplet_in"]
        at_a = singular("main", "qint", t_out["out"].long(), t_out["in"].long(), 1)[quad["trip_out_to_quad"].long()]
        at_b = singular("main", "qint", t_in["in"].long(), t_in["out"].long(), 0)[quad["trip_in_to_quad"].long()]
        return int((at_a | at_b).sum())

    primitive = Atoms("CuAuAg", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0.25]],
                      cell=[[3.0, 0.2, 0.1], [0.3, 3.2, 0.0], [0.1, 0.4, 3.4]], pbc=True)
    primitive.rattle(0.05, seed=1)
    repeated = primitive.repeat((2, 1, 1))
    rattled_after = repeated.copy()
    rattled_after.rattle(0.01, seed=2)
    acetylene = Atoms("HCCH", positions=[[-1.66, 0, 0], [-0.6, 0, 0], [0.6, 0, 0], [1.66, 0, 0]])
    config = G.GraphConfig.uniform(5.0, 30)
    counts = {}
    for name, atoms in [("primitive", primitive), ("repeated", repeated), ("rattled after", rattled_after),
                        ("perfect Cu", bulk("Cu")), ("C2H2", acetylene), ("CH4", molecule("CH4"))]:
        graphs = G.build_graphs(collate([atoms_to_entry(atoms)], dtype=torch.float64), config)
        assert graphs["quad"]["trip_in_to_quad"].numel() > 0, name
        counts[name] = G.collinear_quadruplets(graphs)
        assert counts[name] == brute_force(atoms, graphs), name
    assert counts["repeated"] > 0 and counts["C2H2"] > 0
    assert counts["primitive"] == counts["rattled after"] == counts["perfect Cu"] == counts["CH4"] == 0


def test_truncated_neighbors_counts_every_neighbour_like_ase():
    """fcc Cu at 6 Å: 78 neighbours per atom (ASE's neighbour list), more than k = 30 keeps in
    the main graph and int(8 * 30 / 30) = 8 in the quadruplet graph; k = 300 keeps them all."""
    import numpy as np
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    from jmp_ext.data import collate
    from jmp_ext.data.convert import atoms_structure

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(0.01, seed=0)
    most = int(np.bincount(neighbor_list("i", atoms, 6.0)).max())
    assert most == 78
    batch = collate([{k: torch.as_tensor(v) for k, v in atoms_structure(atoms).items()}], dtype=torch.float64)
    assert G.truncated_neighbors(batch, G.GraphConfig.uniform(6.0, 30)) == {"main": (most, 30), "a2ee2a": (most, 20),
                                                                         "qint": (most, 8)}
    assert G.truncated_neighbors(batch, G.GraphConfig.uniform(6.0, 293)) == {}
    assert G.truncated_neighbors(batch, G.GraphConfig.uniform(6.0, 292)) == {"qint": (most, 77)}
    # A batch build_graphs takes without pbc (periodic along every axis) or without a cell (a
    # cluster), as build_graphs reads it (a KeyError before)
    no_pbc = {k: v for k, v in batch.items() if k != "pbc"}
    assert G.truncated_neighbors(no_pbc, G.GraphConfig.uniform(6.0, 30)) == {"main": (most, 30), "a2ee2a": (most, 20),
                                                                          "qint": (most, 8)}
    no_cell = {k: v for k, v in no_pbc.items() if k != "cell"}
    G.build_graphs(no_cell, G.GraphConfig.uniform(6.0, 30))
    atoms.pbc = False
    cluster = int(np.bincount(neighbor_list("i", atoms, 6.0)).max())
    assert G.truncated_neighbors(no_cell, G.GraphConfig.uniform(6.0, 30)) == {"a2ee2a": (cluster, 20),
                                                                           "qint": (cluster, 8)}


def test_symmetrize_keeps_pairs_s_before_t_and_self_images_of_negative_offset():
    """JMP's rule against an independent one: every edge (s, t, S) of a symmetric graph is kept
    once, as s < t or, for an atom's own images, as the one of the pair (S, -S) whose offset is
    lexicographically negative (Python's tuple order); the second half is the first reversed."""
    from itertools import product

    images = [o for o in product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]
    edges = [(0, 0, o) for o in images] + [(s, t, o) for s, t in ((0, 1), (1, 0)) for o in [(0, 0, 0), *images]]
    edges = [edges[i] for i in torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))]
    graph = {"edge_index": torch.tensor([[s for s, _, _ in edges], [t for _, t, _ in edges]]),
             "cell_offset": torch.tensor([o for _, _, o in edges], dtype=torch.int32)}
    sym, id_swap = G.symmetrize(graph)
    triples = [(s, t, tuple(o)) for (s, t), o in zip(sym["edge_index"].T.tolist(), sym["cell_offset"].tolist())]
    half = len(triples) // 2
    assert set(triples[:half]) == {(s, t, o) for s, t, o in edges if s < t or (s == t and o < (0, 0, 0))}
    assert triples[half:] == [(t, s, tuple(-x for x in o)) for s, t, o in triples[:half]]
    assert sorted(triples) == sorted(edges)
    assert [triples[j] for j in id_swap.tolist()] == [(t, s, tuple(-x for x in o)) for s, t, o in triples]
