"""Whole networks and heads: gradient forces and stress against finite differences (float64),
training on forces (create_graph), direct-force equivariance, reductions, JMP's head keys."""

from __future__ import annotations

import math

import pytest
import torch
from jmp_fixtures import bulk_batch_and_graphs, fixture_batch, graphs_on_jmps_a2a, load, requires_fixtures

from jmp_ext.graphs import with_geometry
from jmp_ext.models import BackboneConfig, FinetuneModel, HeadConfig, PretrainModel
from jmp_ext.models.heads import reduce_atoms

pytestmark = requires_fixtures

# ScaleFactors fixed at 1 would leave the random network's activations tame; the default 0
# (unfitted) means identity, which is what a fresh model does.
TINY = BackboneConfig.tiny()


def energy_model(stress=False, seed=0):
    torch.manual_seed(seed)
    model = FinetuneModel(TINY, [HeadConfig(target="energy")], forces="gradient", stress=stress)
    return model.double()


def energy_at(model, batch, graphs, pos, cell):
    """Energy [B] with graphs' topology fixed and geometry from pos, cell."""
    g = with_geometry(graphs, pos, cell, batch["batch"])
    return model._heads(batch, g)["energy"]


def fixture_case(case_name):
    if case_name == "bulk":
        return bulk_batch_and_graphs()
    case = load(f"{case_name}.pt")
    batch = fixture_batch(case, torch.float64)
    return batch, graphs_on_jmps_a2a(case, batch)


@pytest.mark.parametrize("case_name", ["bulk", "ani_molecules", pytest.param("oc20_slab", marks=pytest.mark.slow)])
def test_gradient_forces_match_finite_differences(case_name):
    batch, graphs = fixture_case(case_name)
    model = energy_model().eval()
    forces = model(batch, graphs)["forces"]
    assert forces.shape == batch["pos"].shape and forces.dtype == torch.float64
    h = 1e-5
    for atom, axis in [(0, 0), (5, 1), (len(batch["pos"]) - 1, 2)]:
        plus, minus = batch["pos"].clone(), batch["pos"].clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        with torch.no_grad():
            dE = (energy_at(model, batch, graphs, plus, batch["cell"]).sum()
                  - energy_at(model, batch, graphs, minus, batch["cell"]).sum()) / (2 * h)
        assert abs(forces[atom, axis].item() + dE.item()) < 1e-6 * max(1.0, forces.abs().max().item())


@pytest.mark.parametrize("case_name", ["bulk", pytest.param("oc20_slab", marks=pytest.mark.slow)])
def test_stress_matches_finite_differences_of_a_strained_cell(case_name):
    batch, graphs = fixture_case(case_name)
    model = energy_model(stress=True).eval()
    stress = model(batch, graphs)["stress"]
    assert stress.shape == batch["cell"].shape
    torch.testing.assert_close(stress, stress.transpose(1, 2), rtol=0, atol=1e-12)
    b = batch["cell"].shape[0] - 1  # the last structure (strain only it: the energies of the others do not change)
    volume = torch.linalg.det(batch["cell"][b]).abs()
    h = 1e-6
    for i, j in [(0, 0), (2, 2), (0, 1), (1, 2)]:
        S = torch.zeros(3, 3, dtype=torch.float64)
        S[i, j] += 0.5
        S[j, i] += 0.5
        energies = []
        for sign in (1, -1):
            F = torch.eye(3, dtype=torch.float64) + sign * h * S
            pos, cell = batch["pos"].clone(), batch["cell"].clone()
            pos[batch["batch"] == b] = pos[batch["batch"] == b] @ F
            cell[b] = cell[b] @ F
            with torch.no_grad():
                energies.append(energy_at(model, batch, graphs, pos, cell)[b])
        fd = (energies[0] - energies[1]) / (2 * h) / volume
        assert abs(stress[b, i, j].item() - fd.item()) < 1e-6 * max(1e-3, stress.abs().max().item()), (i, j)
    # A float32 cell next to float64 positions (a dataset stored in float32) is cast, as the graphs do.
    mixed = model(dict(batch, cell=batch["cell"].float()), graphs)["stress"]
    assert mixed.dtype == torch.float64 and torch.isfinite(mixed).all()


def test_stress_is_nan_only_for_structures_without_a_cell():
    """A molecule (zero cell) in the batch: NaN stress there, the others' unchanged, and training
    on the others' stress keeps every gradient finite (no 0 / 0 in the backward)."""
    batch, graphs = fixture_case("bulk")
    assert batch["cell"].shape[0] > 1
    model = energy_model(stress=True)
    reference = model.eval()(batch, graphs)["stress"]
    cell = batch["cell"].clone()
    cell[0] = 0
    model.train()
    stress = model(dict(batch, cell=cell), graphs)["stress"]
    assert stress[0].isnan().all()
    torch.testing.assert_close(stress[1:], reference[1:], rtol=1e-12, atol=1e-15)
    stress[1:].square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_float32_forces_and_stress_are_bitwise_reproducible_across_thread_counts():
    """Gradients through the geometry (edge vectors, the strain of every atom's structure) are
    deterministic sums: the same forces and stress on every call and any number of threads."""
    from ase.build import bulk

    from jmp_ext.data import atoms_to_entry
    from jmp_ext.data.collate import collate
    from jmp_ext.graphs import GraphConfig, build_graphs

    structures = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3)) for _ in range(4)]
    for seed, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=seed)
    batch = collate([atoms_to_entry(atoms) for atoms in structures], torch.float32)
    graphs = build_graphs(batch, GraphConfig.uniform(5.0, max_neighbors=12))
    torch.manual_seed(0)
    model = FinetuneModel(TINY, [HeadConfig(target="energy")], forces="gradient", stress=True).eval()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2, 2, 2):
            torch.set_num_threads(threads)
            results.append({k: v.detach() for k, v in model(batch, graphs).items()})
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name in ("energy", "forces", "stress"):
            assert torch.equal(other[name], results[0][name]), name


def test_a_seed_gives_the_same_weights_on_any_number_of_threads():
    """The orthogonal initialisation's QR rounds differently on several threads."""
    before = torch.get_num_threads()
    try:
        states = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            states.append(PretrainModel(BackboneConfig.jmp_s(), ["a"]).state_dict())
    finally:
        torch.set_num_threads(before)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_training_on_gradient_forces_differentiates_the_weights():
    """create_graph while training: d(force loss)/d(weight) equals its finite difference."""
    batch, graphs = bulk_batch_and_graphs()
    model = energy_model().train()
    weight = model.backbone.int_blocks[0].trip_interaction.dense_ba.linear.weight

    def loss():
        return (model(batch, graphs)["forces"] ** 2).sum()

    model.zero_grad()
    loss().backward()
    analytic = weight.grad[3, 5].item()
    assert analytic != 0.0
    h = 1e-6
    with torch.no_grad():
        weight[3, 5] += h
    up = loss().item()
    with torch.no_grad():
        weight[3, 5] -= 2 * h
    down = loss().item()
    assert abs(analytic - (up - down) / (2 * h)) < 1e-5 * abs(analytic)


def random_rotation(seed):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q * torch.det(q)  # proper rotation


def test_direct_forces_rotate_with_the_input():
    torch.manual_seed(0)
    model = PretrainModel(TINY, ["oc20", "ani1x"]).double().eval()
    batch, graphs = bulk_batch_and_graphs()
    R = random_rotation(1)
    rotated = dict(batch, pos=batch["pos"] @ R.T, cell=batch["cell"] @ R.T)
    with torch.no_grad():
        out = model(batch, graphs)
        out_r = model(rotated, with_geometry(graphs, rotated["pos"], rotated["cell"], batch["batch"]))
    assert out["energy"].shape == (2, 2) and out["forces"].shape == (7, 3, 2)
    torch.testing.assert_close(out_r["energy"], out["energy"], rtol=1e-10, atol=0)
    torch.testing.assert_close(out_r["forces"], torch.einsum("ij,njt->nit", R, out["forces"]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_structure_reductions_match_a_loop(reduction):
    natoms = torch.tensor([3, 1, 5])
    x = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = reduce_atoms(x, natoms, reduction)
    expected = torch.stack([getattr(part, reduction)(0) if reduction != "max" else part.max(0).values
                            for part in x.split(natoms.tolist())])
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)


def test_finetune_heads_shapes_and_classification():
    case = load("ani_molecules.pt")
    batch = fixture_batch(case, torch.float64)
    torch.manual_seed(0)
    model = FinetuneModel(TINY, [HeadConfig(target="gap", reduction="mean"),
                                 HeadConfig(target="is_metal", kind="classification", num_outputs=2, reduction="mean"),
                                 HeadConfig(target="dipole", num_outputs=3, reduction="max")]).double().eval()
    assert not hasattr(model.backbone, "out_mlp_F")  # no force branch without direct forces
    out = model(batch, graphs_on_jmps_a2a(case, batch))
    assert out["gap"].shape == (2,) and out["is_metal"].shape == (2, 2) and out["dipole"].shape == (2, 3)
    assert "forces" not in out


def test_a_head_name_torch_cannot_hold_is_a_message():
    """The heads sit in an nn.ModuleDict by target name: a '.' in it was torch's KeyError from
    deep in the constructor, and 'train' or 'training' would replace the ModuleDict's own. Any
    other name torch takes (models trained under them load as before)."""
    for name in ("gap.x", ""):
        with pytest.raises(ValueError, match=f"HeadConfig '{name}': a target's name must be non-empty and without"):
            HeadConfig(target=name)
    for name in ("train", "to", "training", "_modules"):
        with pytest.raises(ValueError, match=f"HeadConfig '{name}': '{name}' is an attribute of torch's nn.ModuleDict"):
            HeadConfig(target=name)
    model = FinetuneModel(TINY, [HeadConfig(target=name) for name in ("U_0-eV", "ΔE", "band gap", "gap(eV)")])
    assert list(model.output.heads) == ["U_0-eV", "ΔE", "band gap", "gap(eV)"]


def test_head_keys_and_sizes_are_jmps():
    model = PretrainModel(TINY, ["oc20", "oc22", "ani1x", "transition1x"])
    keys = [k for k in model.state_dict() if k.startswith("output.out_energy.0.")]
    assert keys == ["output.out_energy.0.0.weight", "output.out_energy.0.0.bias", "output.out_energy.0.2.weight",
                    "output.out_energy.0.2.bias", "output.out_energy.0.4.weight", "output.out_energy.0.4.bias",
                    "output.out_energy.0.6.weight", "output.out_energy.0.6.bias", "output.out_energy.0.8.weight"]
    assert next(iter(model.state_dict())) == "embedding.atom_embedding.weight"
    # (JMP-S/L's published sizes: 4 head pairs are 5.26M parameters for JMP-S, 17.85M for JMP-L.)
    for config, expected in [(BackboneConfig.jmp_s(), 5.26e6), (BackboneConfig.jmp_l(), 17.85e6)]:
        A, E = config.emb_size_atom, config.emb_size_edge
        per_pair = 4 * (A * A + A) + A + 4 * (E * E + E) + E
        assert math.isclose(4 * per_pair, expected, rel_tol=1e-3)
    A, E = TINY.emb_size_atom, TINY.emb_size_edge
    assert sum(p.numel() for p in model.output.parameters()) == 4 * (4 * (A * A + A) + A + 4 * (E * E + E) + E)


def test_the_energy_head_of_a_model_with_forces_has_no_biases():
    """JMP's EnergyForcesModelBase builds it with bias=False (rMD17, MD22, SPICE); a property
    head, or an energy head without forces, keeps JMP's biased MLP."""
    heads = [HeadConfig(target="energy"), HeadConfig(target="gap")]
    for forces in ("gradient", "direct"):
        keys = [k for k in FinetuneModel(TINY, heads, forces=forces).state_dict() if k.startswith("output.heads.")]
        assert [k for k in keys if k.startswith("output.heads.energy.")] == [
            f"output.heads.energy.mlp.{i}.weight" for i in (0, 2, 4, 6, 8)]
        assert "output.heads.gap.mlp.0.bias" in keys
    assert "output.heads.energy.mlp.0.bias" in FinetuneModel(TINY, heads).state_dict()


def test_bad_inputs_raise():
    case = load("ani_molecules.pt")
    batch = fixture_batch(case, torch.float64)
    graphs = graphs_on_jmps_a2a(case, batch)
    model = energy_model()
    bad = dict(batch, atomic_numbers=batch["atomic_numbers"].clone())
    bad["atomic_numbers"][0] = 121
    with pytest.raises(ValueError, match="unknown element\\(s\\) \\[121\\]"):
        model(bad, graphs)
    # A float32 batch for a float64 network: said at once (a kernel deep inside named its own dtypes).
    batch32 = fixture_batch(case, torch.float32)
    with pytest.raises(TypeError, match=r"the batch is torch.float32 but the network is torch.float64: collate the "
                                        r"structures in the network's dtype"):
        model(batch32, graphs_on_jmps_a2a(case, batch32))
    with pytest.raises(ValueError, match="need an 'energy' head"):
        FinetuneModel(TINY, [HeadConfig(target="gap")], forces="gradient")
    for make in (BackboneConfig.from_dict, lambda v: BackboneConfig.tiny(**v), lambda v: BackboneConfig.jmp_l(**v)):
        with pytest.raises(ValueError, match="unknown BackboneConfig field\\(s\\): num_blockz, x \\(known: .*num_blocks"):
            make({"num_blockz": 3, "x": 1})
    # JMP's variant fields accept only JMP's value (a dict default compared, not just scalars).
    for name, value in {"num_spherical": 6, "rbf": {"name": "bessel"}, "rbf_spherical": {}, "activation": "silu",
                        "quad_interaction": False}.items():
        with pytest.raises(ValueError, match=f"BackboneConfig.{name}=.* is not supported: JMP's GemNet-OC uses"):
            BackboneConfig.tiny(**{name: value})


def test_a_batch_without_quadruplets_runs_and_matches_each_structure_alone():
    """Tiny molecules (H2O, H2) have no d->b->a<-c quadruplets: the empty quadruplet branch must
    contribute nothing rather than fail, and batching must not mix structures."""
    from ase.build import molecule

    from jmp_ext.data import collate
    from jmp_ext.graphs import GraphConfig, build_graphs

    def entry(atoms):
        n = len(atoms)
        return {"pos": torch.tensor(atoms.positions), "atomic_numbers": torch.tensor(atoms.numbers),
                "cell": torch.zeros(3, 3, dtype=torch.float64), "pbc": torch.zeros(3, dtype=torch.bool),
                "tags": torch.full((n,), 2), "fixed": torch.zeros(n, dtype=torch.bool)}

    config = GraphConfig.uniform(cutoff=5.0, max_neighbors=8, pbc=False)
    torch.manual_seed(0)
    model = FinetuneModel(BackboneConfig.tiny(), [HeadConfig(target="energy")], forces="gradient").double()
    entries = [entry(molecule("H2O")), entry(molecule("H2"))]
    batch = collate(entries, dtype=torch.float64)
    graphs = build_graphs(batch, config)
    assert graphs["quad"]["out"].numel() == 0
    together = model(batch, graphs)
    for i, one in enumerate(entries):
        alone_batch = collate([one], dtype=torch.float64)
        alone = model(alone_batch, build_graphs(alone_batch, config))
        torch.testing.assert_close(together["energy"][i], alone["energy"][0], rtol=1e-12, atol=1e-12)
        atoms = batch["batch"] == i
        torch.testing.assert_close(together["forces"][atoms], alone["forces"], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(together["forces"]).all()


def test_shared_projection_gradients_are_divided_and_survive_a_copy():
    """JMP divides the gradients of the basis projections shared by all blocks by their number
    of users. The division is part of the module: a deepcopy (and a pickled model) keeps it,
    where tensor hooks would be dropped and the copy would train them num_blocks times harder."""
    import copy

    def grads(model):
        model.zero_grad()
        batch, graphs = bulk_batch_and_graphs()
        out = model(batch, graphs)
        (out["energy"].sum() + out["forces"].square().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    model = PretrainModel(TINY, ["a"]).double()
    reference = grads(model)
    copied = grads(copy.deepcopy(model))
    assert all(torch.equal(copied[n], reference[n]) for n in reference)
    bases = model.backbone.bases
    shared = {name: layer.users for name, layer in bases.named_children() if getattr(layer, "users", 1) > 1}
    assert shared["mlp_rbf_out"] == TINY.num_blocks + 1 and shared["mlp_rbf_tint"] == TINY.num_blocks
    for layer in bases.children():
        if getattr(layer, "users", 1) > 1:
            layer.users = 1
    undivided = grads(model)
    for name, users in shared.items():
        key = next(k for k in reference if k.startswith(f"backbone.bases.{name}."))
        torch.testing.assert_close(reference[key] * users, undivided[key], rtol=1e-12, atol=0)


def test_head_dropout_is_on_the_atom_features_not_in_the_backbone(tmp_path):
    """JMP's mp_is_metal dropout (0.5) is one Dropout on the per-atom features before the head's
    MLP; the backbone has none. The trainer's model.dropout goes there."""
    from jmp_ext.train.config import build_config
    from jmp_ext.train.tasks import build_network

    torch.manual_seed(0)
    model = FinetuneModel(TINY, [HeadConfig(target="metal", kind="classification", num_outputs=2, dropout=0.5)],
                          forces=None).double()
    dropouts = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == ["output.heads.metal.dropout"]
    batch, graphs = bulk_batch_and_graphs()
    model.train()
    assert not torch.equal(model(batch, graphs)["metal"], model(batch, graphs)["metal"])
    model.eval()
    assert torch.equal(model(batch, graphs)["metal"], model(batch, graphs)["metal"])
    raw = {"mode": "finetune", "model": {"backbone": "tiny", "dropout": 0.5},
           "tasks": [{"name": "m", "train": str(tmp_path),
                      "targets": [{"name": "metal", "kind": "classification", "num_classes": 2}]}]}
    net = build_network(build_config(raw))
    assert [n for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)] == ["output.heads.metal.dropout"]


def molecule_entry(name):
    from ase.build import molecule

    atoms = molecule(name)
    n = len(atoms)
    return {"pos": torch.tensor(atoms.positions), "atomic_numbers": torch.tensor(atoms.numbers),
            "cell": torch.zeros(3, 3, dtype=torch.float64), "pbc": torch.zeros(3, dtype=torch.bool),
            "tags": torch.full((n,), 2), "fixed": torch.zeros(n, dtype=torch.bool)}


@pytest.mark.parametrize("names", [("H2O", "H2"), ("H2",)])
def test_edge_dropout_may_leave_a_structure_without_edges(names):
    """JMP's edge dropout (p = 0.1 in pre-training) can drop every edge of a small molecule, as
    the original's dropout_edge can: the step must go on (a demo pre-training run stopped at step
    585 on this). H2 then has atom-embedding energies only: no direct force, no position
    gradient; with H2 alone the whole batch has no edge."""
    from jmp_ext.data import collate
    from jmp_ext.graphs import GraphConfig, build_graphs

    config = GraphConfig.uniform(cutoff=5.0, max_neighbors=8, pbc=False)
    batch = collate([molecule_entry(n) for n in names], dtype=torch.float64)
    h2 = batch["batch"] == len(names) - 1
    for seed in range(100):  # the first seed that drops both of H2's edges and keeps another
        graphs = build_graphs(batch, config, edge_dropout=0.5, generator=torch.Generator().manual_seed(seed))
        targets = graphs["a2a"]["edge_index"][1]  # every other graph is a subset of a2a
        if not h2[targets].any() and (len(names) == 1 or graphs["main"]["edge_index"].numel() > 0):
            break
    else:
        raise AssertionError("no seed dropped H2's edges")
    torch.manual_seed(0)
    model = PretrainModel(TINY, ["ani1x"]).double()
    pos = batch["pos"].requires_grad_()
    out = model(batch, with_geometry(graphs, pos, None, batch["batch"]))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert torch.equal(out["forces"][h2], torch.zeros_like(out["forces"][h2]))
    (out["energy"].sum() + out["forces"].square().sum()).backward()
    assert torch.isfinite(pos.grad).all()
    assert torch.equal(pos.grad[h2], torch.zeros_like(pos.grad[h2]))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cos_angle_between_is_cos_of_gemnet_ocs_atan2_angle():
    """The dihedral's cos without atan2 / cos: same values and gradient as GemNet-OC's
    cos(atan2(max(|a x b|, 1e-9), a.b)), also for (anti)parallel pairs, where the clamp holds."""
    from jmp_ext.models.gemnet_oc.bases import cos_angle_between

    def reference(a, b):
        y = torch.linalg.cross(a, b).norm(dim=-1).clamp(min=1e-9)
        return torch.cos(torch.atan2(y, (a * b).sum(dim=-1)))

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(64, 3, generator=gen, dtype=torch.float64) * 3
    b[:4] = a[:4] * torch.tensor([2.0, -0.5, 1.0, -3.0], dtype=torch.float64)[:, None]  # (anti)parallel
    a.requires_grad_(), b.requires_grad_()
    ours, ref = cos_angle_between(a, b), reference(a, b)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    w = torch.randn(64, generator=gen, dtype=torch.float64)
    for g_ours, g_ref in zip(torch.autograd.grad((ours * w).sum(), (a, b)), torch.autograd.grad((ref * w).sum(), (a, b))):
        assert torch.isfinite(g_ours).all()
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radial_basis_is_the_enveloped_gaussians_without_subnormals(dtype, compiled):
    """envelope(d/c) * gaussians(d/c), except that products below the smallest normal number are 0.
    (The Gaussians themselves are tested against their torch expression in tests/ops.) Under
    torch.compile the basis is a torch expression for Inductor to fuse instead of the kernel: the
    same values. (aot_eager: traced as Inductor would see it, without compiling C++.)"""
    from jmp_ext.models.gemnet_oc.bases import RadialBasis

    basis = RadialBasis(num_radial=128, cutoff=12.0, exponent=5).to(dtype)
    run = torch.compile(basis, backend="aot_eager", dynamic=True) if compiled else basis
    d = torch.linspace(0.0, 13.0, 4001, dtype=dtype)
    x = d * (1 / 12.0)
    env = torch.where(x < 1, 1 - 21 * x**5 + 35 * x**6 - 15 * x**7, torch.zeros_like(x))
    expected = env[:, None] * basis.rbf(x)
    tiny = torch.finfo(dtype).tiny
    out = run(d)
    assert not ((out != 0) & (out.abs() < tiny)).any()
    # (Away from the threshold, where one rounding could tip it. Rounding makes the envelope
    # slightly negative just below the cutoff: those values are kept, sign and all.)
    kept = expected.abs() >= tiny * 1.01
    torch.testing.assert_close(out[kept], expected[kept], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert (out[expected.abs() < tiny * 0.99] == 0).all()
    # Without the flush, the envelope would have made subnormals here: the test can fail.
    assert ((expected != 0) & (expected.abs() < tiny)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_autocast_step_runs_and_stays_near_float32(dtype):
    """Under torch.autocast (the trainer's loop.precision bf16 / fp16 on a GPU, run here on the
    CPU) the Linear layers return bf16 or fp16 next to float32 bases; jmp_ext's ops take both (in
    float32). The outputs stay within half precision of float32's, and the backward runs to
    finite grads."""
    torch.manual_seed(0)
    model = PretrainModel(TINY, ["oc20"])
    batch, graphs = bulk_batch_and_graphs()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    graphs = with_geometry(graphs, batch["pos"], batch["cell"], batch["batch"])
    with torch.no_grad():
        out = model(batch, graphs)
    with torch.autocast("cpu", dtype=dtype):
        out_half = model(batch, graphs)
    (out_half["energy"].sum() + out_half["forces"].square().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for key in ("energy", "forces"):
        scale = out[key].abs().max()
        torch.testing.assert_close(out_half[key].float(), out[key], rtol=0, atol=0.05 * scale)


def test_spatial_extent_head_is_jmps_r2_with_ases_centre_of_mass():
    """QM9's R² head: sum_i s_i |r_i - COM|^2 with the mass-weighted centre (ASE's), a bias-free
    MLP of num_mlps + 1 layers (JMP's SpatialExtentOutputHead), invariant under rotations and
    translations of a molecule, and its keys without the mass table."""
    from ase.build import molecule

    from jmp_ext.data import collate

    names = ["CH3OH", "H2O", "C6H6"]
    batch = collate([molecule_entry(n) for n in names])
    batch.update(pos=batch["pos"].double(), cell=batch["cell"].double())
    torch.manual_seed(0)
    model = FinetuneModel(TINY, [HeadConfig(target="R2", reduction="spatial_extent", num_mlps=3)]).double().eval()
    head = model.output.heads["R2"]
    assert list(head.state_dict()) == [f"mlp.{i}.weight" for i in (0, 2, 4, 6)]
    features = torch.randn(batch["pos"].shape[0], TINY.emb_size_atom, dtype=torch.float64)
    with torch.no_grad():
        s = head.mlp(features)[:, 0].split(batch["natoms"].tolist())
        out = head(features, batch)
    for k, (name, pos) in enumerate(zip(names, batch["pos"].split(batch["natoms"].tolist()))):
        atoms = molecule(name)
        atoms.positions = pos.numpy()  # (collate rounded them to float32)
        expected = (s[k].numpy() * ((atoms.positions - atoms.get_center_of_mass()) ** 2).sum(1)).sum()
        assert out[k].item() == pytest.approx(expected, rel=1e-12)

    from jmp_ext.graphs import GraphConfig, build_graphs

    graph_config = GraphConfig.uniform(cutoff=5.0, max_neighbors=8, pbc=False)
    R = random_rotation(2)
    moved = dict(batch, pos=batch["pos"] @ R.T + torch.tensor([3.0, -1.0, 7.5], dtype=torch.float64))
    with torch.no_grad():
        r2, r2_moved = (model(b, build_graphs(b, graph_config))["R2"] for b in (batch, moved))
    assert r2.shape == (3,)
    torch.testing.assert_close(r2_moved, r2, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="spatial_extent predicts one scalar"):
        HeadConfig(target="R2", reduction="spatial_extent", num_outputs=3)


def rattled_molecules(names, seed=1):
    from jmp_ext.data import collate

    entries = [molecule_entry(n) for n in names]
    gen = torch.Generator().manual_seed(seed)
    for e in entries:  # (off the symmetric geometries, where forces cancel to ~0)
        e["pos"] = e["pos"] + 0.1 * torch.randn(e["pos"].shape, generator=gen, dtype=e["pos"].dtype)
    return collate(entries)


def test_force_scaler_keeps_small_fp16_gradient_forces():
    """Under float16 autocast the backward pass of F = -dE/dpos is half precision: forces of
    1e-6 (a normalised energy's, in the network's units) lose their digits unless the energy is
    scaled first (JMP's ForceScaler); outside autocast the scaler changes nothing."""
    from jmp_ext.graphs import GraphConfig, build_graphs
    from jmp_ext.models.force_scaler import ForceScaler

    torch.manual_seed(0)
    model = FinetuneModel(TINY, [HeadConfig(target="energy")], forces="gradient").eval()
    with torch.no_grad():
        model.output.heads["energy"].mlp[-1].weight.mul_(1e-3)  # forces of about 3e-6
    batch = rattled_molecules(["CH3OH", "C6H6", "H2O"])
    graphs = build_graphs(batch, GraphConfig.uniform(cutoff=5.0, max_neighbors=8, pbc=False))
    exact = model(batch, graphs)["forces"]
    pos = batch["pos"].detach().requires_grad_(True)
    energy = model._heads(batch, with_geometry(graphs, pos, None, batch["batch"]))["energy"].sum()
    assert torch.equal(exact, -torch.autograd.grad(energy, pos)[0])  # (no scaling outside autocast)

    def fp16_error(scaler):
        model.force_scaler = scaler
        with torch.autocast("cpu", dtype=torch.float16):
            forces = model(batch, graphs)["forces"]
        return ((forces - exact).norm() / exact.norm()).item()

    assert fp16_error(ForceScaler(init_scale=1.0)) > 0.1
    assert fp16_error(ForceScaler()) < 0.01


def test_force_scaler_backs_off_from_an_overflow_and_grows_after_finite_steps():
    from jmp_ext.models.force_scaler import ForceScaler

    pos = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        energy = torch.nn.functional.linear(pos, torch.full((4, 3), 300.0)).sum()  # dE/dpos = 1200 per entry
        scaler = ForceScaler(init_scale=2.0**10, growth_interval=2)
        (grad,) = scaler.gradients(energy, [pos], create_graph=False)  # 1200 * 2^10 overflows float16
        assert scaler.scale == 2.0**5 and scaler.finite_in_a_row == 1
        torch.testing.assert_close(grad, torch.full((2, 3), 1200.0), rtol=1e-3, atol=0)
        scaler.gradients(energy, [pos], create_graph=False)
        assert scaler.scale == 2.0**6 and scaler.finite_in_a_row == 0
        # A batch that no scale helps leaves the scale alone (JMP's would halve it 50 times, and
        # every later force would underflow to zero); the loop skips its step.
        scaler = ForceScaler(init_scale=2.0**40, max_tries=3)
        (grad,) = scaler.gradients(energy, [pos], create_graph=False)
        assert not torch.isfinite(grad).all() and scaler.scale == 2.0**40
        scaler = ForceScaler(init_scale=2.0**5)
        (grad,) = scaler.gradients(energy * torch.nan, [pos], create_graph=False)
        assert torch.isnan(grad).all() and scaler.scale == 2.0**5
        (grad,) = scaler.gradients(energy, [pos], create_graph=False)
        torch.testing.assert_close(grad, torch.full((2, 3), 1200.0), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="max_tries >= 1"):
        ForceScaler(max_tries=0)


def test_force_scaler_gives_up_on_a_hopeless_batch_early_and_changes_nothing():
    """Gradients that no scale makes finite (d|x|/dx at 0 is NaN): the retries stop once the
    scale is below float16's smallest number (not after 50 double backwards), and the scale and
    the count of finite batches stay as they were."""
    from jmp_ext.models.force_scaler import ForceScaler

    tries = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            tries.append(1)
            return grad

    pos = torch.zeros(2, 3, requires_grad=True)
    scaler = ForceScaler(init_scale=2.0**-20)
    scaler.finite_in_a_row = 7
    with torch.autocast("cpu", dtype=torch.float16):
        energy = Probe.apply(pos).square().sum().sqrt()
        (grad,) = scaler.gradients(energy, [pos], create_graph=True)
    assert torch.isnan(grad).all() and len(tries) == 6  # 2^-20 ... 2^-25
    assert scaler.state_dict() == {"scale": 2.0**-20, "finite_in_a_row": 7}
    restored = ForceScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
