"""Physics of the calculator of a gradient-force + stress checkpoint: symmetries, equivalent
cells, extensivity, the stress as the energy's strain derivative, relaxations. Untrained
weights: these hold for any weights, so they test how the model and the calculator are built,
not their accuracy. Structures are rattled (atoms on straight lines make GemNet-OC's dihedral
basis singular: see jmp_ext.calculator), and the graphs hold every neighbour within the cutoff."""

import ase
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.fd import calculate_numerical_stress
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE

from jmp_ext.calculator import JMPCalculator
from jmp_ext.train import loop
from jmp_ext.train.config import build_config

# No graph leaves a neighbour out here and no structure has atoms on lines unless a test says
# so: the calculator's warnings about either (or any other) are failures.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Energy, gradient forces and stress in float64, trained on molecules in periodic boxes. With
    k = 64 the quadruplet graph keeps int(64 * 8 / 30) = 17 neighbours: every atom's within 4 Å
    here (at most 15, in the cell relaxation's last step)."""
    from helpers import write_molecules

    root = tmp_path_factory.mktemp("physics")
    data = write_molecules(root / "data", 6, seed=3, periodic=True, stress=True)
    targets = [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"},
               {"name": "stress", "kind": "stress"}]
    raw = {"mode": "finetune", "run_dir": str(root / "run"), "threads": 1,
           "graph": {"cutoff": 4.0, "max_neighbors": 64},
           "tasks": [{"name": "box", "train": data, "forces": "gradient", "targets": targets}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "precision": "fp64", "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    return root / "run" / "best.pt"


def rattled_cell() -> ase.Atoms:
    """C, N, O and two H in a small triclinic cell, rattled. Its lattice vectors are all longer
    than the 4 Å cutoff: no atom has an image of itself (or, in a supercell, a copy) as a
    neighbour, so no three atoms line up."""
    cell = [[4.6, 0.2, -0.1], [0.4, 4.4, 0.2], [-0.3, 0.5, 4.8]]
    scaled = [[0.1, 0.1, 0.1], [0.35, 0.15, 0.2], [0.6, 0.55, 0.45], [0.2, 0.6, 0.7], [0.8, 0.3, 0.8]]
    atoms = ase.Atoms("CNOH2", scaled_positions=scaled, cell=cell, pbc=True)
    atoms.rattle(0.05, seed=4)
    return atoms


def evaluate(atoms: ase.Atoms, calc: JMPCalculator) -> tuple[float, np.ndarray, np.ndarray]:
    """Energy, forces and the 3x3 stress of `atoms` (one model call: the forces bring all three)."""
    atoms.calc = calc
    forces = atoms.get_forces()
    return atoms.get_potential_energy(), forces, atoms.get_stress(voigt=False)


def assert_same(actual, expected, rel=1e-10, err_msg=""):
    """Equal within `rel` of the largest component of `expected` (float64 rounding is ~1e-15)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * np.abs(expected).max(), err_msg=err_msg)


def random_rotation(seed: int) -> np.ndarray:
    """A random proper rotation matrix (det +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)


def test_a_rigid_rotation_rotates_the_forces_and_the_stress(checkpoint):
    """Rotating the atoms and the cell together leaves the energy as it is; the forces rotate as
    vectors (rows: F R^T) and the stress as a tensor (R S R^T)."""
    atoms = rattled_cell()
    rotation = random_rotation(0)
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T)
    rotated.positions = atoms.positions @ rotation.T
    calc = JMPCalculator(checkpoint, dtype="float64")
    energy, forces, stress = evaluate(atoms, calc)
    rotated_energy, rotated_forces, rotated_stress = evaluate(rotated, calc)
    assert rotated_energy == pytest.approx(energy, rel=1e-10)
    assert_same(rotated_forces, forces @ rotation.T)
    assert_same(rotated_stress, rotation @ stress @ rotation.T)


def test_a_translation_changes_nothing(checkpoint):
    """Moving every atom by the same vector, not a lattice vector (atoms leave the cell), leaves
    the energy, the forces and the stress as they are."""
    atoms = rattled_cell()
    moved = atoms.copy()
    moved.positions += [1.37, -2.21, 3.53]
    calc = JMPCalculator(checkpoint, dtype="float64")
    energy, forces, stress = evaluate(atoms, calc)
    moved_energy, moved_forces, moved_stress = evaluate(moved, calc)
    assert moved_energy == pytest.approx(energy, rel=1e-10)
    assert_same(moved_forces, forces)
    assert_same(moved_stress, stress)


def test_a_permutation_of_the_atoms_permutes_the_forces(checkpoint):
    """Listing the atoms in another order is the same structure: the same energy and stress,
    and each atom keeps its force."""
    atoms = rattled_cell()
    order = [3, 0, 4, 1, 2]
    calc = JMPCalculator(checkpoint, dtype="float64")
    energy, forces, stress = evaluate(atoms, calc)
    permuted_energy, permuted_forces, permuted_stress = evaluate(atoms[order], calc)
    assert permuted_energy == pytest.approx(energy, rel=1e-10)
    assert_same(permuted_forces, forces[order])
    assert_same(permuted_stress, stress)


@pytest.mark.parametrize("wrap", [False, True], ids=["as_placed", "wrapped"])
def test_equivalent_cells_of_a_crystal_give_the_same_results(checkpoint, wrap):
    """A crystal is its lattice, not the basis that spans it: a lattice vector's sign flipped
    (a left-handed cell) or a unimodular change of basis (cell M @ cell, integer M of det +-1),
    with the atoms as they were or wrapped into the new cell, gives the same energy, forces and stress."""
    atoms = rattled_cell()
    calc = JMPCalculator(checkpoint, dtype="float64")
    energy, forces, stress = evaluate(atoms, calc)
    for basis in ([[1, 0, 0], [0, -1, 0], [0, 0, 1]], [[1, 1, 0], [0, 1, 0], [0, 1, 1]],
                  [[1, 0, 0], [2, 1, 0], [-1, 1, -1]]):
        assert abs(np.linalg.det(basis)) == pytest.approx(1)
        other = atoms.copy()
        other.set_cell(np.array(basis) @ atoms.cell.array)
        if wrap:
            other.wrap()
        other_energy, other_forces, other_stress = evaluate(other, calc)
        assert other_energy == pytest.approx(energy, rel=1e-10), basis
        assert_same(other_forces, forces, err_msg=str(basis))
        assert_same(other_stress, stress, err_msg=str(basis))


def test_a_supercell_has_its_copies_energy_and_their_stress(checkpoint):
    """Energy is extensive and stress intensive: atoms.repeat((2, 1, 1)) has twice the energy of
    the cell it repeats and its stress. The cell's first lattice vector (3.1 Å) is within the
    cutoff, so the repeat lines each atom up with its copies: the forces there are not -dE/dx
    (not compared; the calculator says so), the energy and stress are."""
    cell = [[3.1, 0.2, -0.1], [0.4, 5.0, 0.2], [-0.3, 0.5, 5.2]]
    scaled = [[0.1, 0.1, 0.1], [0.45, 0.35, 0.3], [0.2, 0.6, 0.7], [0.7, 0.8, 0.4]]
    primitive = ase.Atoms("CONH", scaled_positions=scaled, cell=cell, pbc=True)
    primitive.rattle(0.05, seed=4)
    energy, _, stress = evaluate(primitive, JMPCalculator(checkpoint, dtype="float64"))
    supercell = primitive.repeat((2, 1, 1))
    with pytest.warns(UserWarning, match="have three distinct atoms on a straight line"):
        supercell_energy, _, supercell_stress = evaluate(supercell, JMPCalculator(checkpoint, dtype="float64"))
    assert supercell_energy == pytest.approx(2 * energy, rel=1e-10)
    # (the lines' singular terms leave up to ~1e-10 of the stress in rounding: 2e-11 here, 1e-14 without lines)
    assert_same(supercell_stress, stress, rel=1e-9)


def test_a_supercell_without_lines_has_its_copies_forces_too(checkpoint):
    """Where no atom sees a copy of itself within the cutoff, the repeat has no lines: each copy
    of an atom has its force, besides the doubled energy and the same stress."""
    primitive = rattled_cell()
    energy, forces, stress = evaluate(primitive, JMPCalculator(checkpoint, dtype="float64"))
    supercell_energy, supercell_forces, supercell_stress = evaluate(primitive.repeat((2, 1, 1)),
                                                                    JMPCalculator(checkpoint, dtype="float64"))
    assert supercell_energy == pytest.approx(2 * energy, rel=1e-10)
    assert_same(supercell_forces, np.tile(forces, (2, 1)))
    assert_same(supercell_stress, stress)


def test_the_stress_is_the_strain_derivative_of_the_energy_per_volume(checkpoint):
    """ASE's stress is (1/V) dE/d(strain) of cell and atoms strained together, in Voigt order
    xx, yy, zz, yz, xz, xy, positive where stretching raises the energy: as central differences
    of the energy under small strains (ASE's) give it."""
    atoms = rattled_cell()
    atoms.calc = JMPCalculator(checkpoint, dtype="float64")
    stress = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-5)
    # (the differences' truncation error, ~eps^2, is ~1e-9 of the stress here)
    assert_same(stress, numeric, rel=1e-7)


def test_a_relaxation_keeps_fixed_atoms_in_place_and_goes_downhill(checkpoint):
    """FIRE on a rattled molecule with FixAtoms on two of its atoms: those two do not move at all,
    the others do, and the energy goes down."""
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    atoms.set_constraint(FixAtoms(indices=[0, 1]))
    atoms.calc = JMPCalculator(checkpoint, dtype="float64")
    start, energy = atoms.positions.copy(), atoms.get_potential_energy()
    FIRE(atoms, logfile=None).run(fmax=1e-4, steps=10)
    np.testing.assert_array_equal(atoms.positions[:2], start[:2])
    assert (np.abs(atoms.positions[2:] - start[2:]).max(axis=1) > 0).all()
    assert atoms.get_potential_energy() < energy


def test_a_cell_relaxation_goes_downhill(checkpoint):
    """BFGS on a FrechetCellFilter of the rattled cell moves the atoms and the cell along the
    forces and the stress: its first step (a small steepest-descent one) lowers the energy, the
    cell changes, and a few steps end lower than they started."""
    atoms = rattled_cell()
    atoms.calc = JMPCalculator(checkpoint, dtype="float64")
    cell = atoms.cell.array.copy()
    energies = []
    optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
    optimizer.attach(lambda: energies.append(atoms.get_potential_energy()))
    optimizer.run(fmax=1e-4, steps=3)
    assert len(energies) == 4
    assert energies[1] < energies[0] and energies[-1] < energies[0]
    assert np.abs(atoms.cell.array - cell).max() > 1e-3


def test_float32_forces_of_a_small_cell_do_not_depend_on_the_batch(checkpoint):
    """In a cell with a lattice vector under the cutoff, an atom's own images are its neighbours,
    three of them on a line, where the dihedral basis hands the edges between them gradients of
    ~1e6; those went to the atom as +g and -g, which cancel only in exact arithmetic: float32
    forces kept their rounding (0.02 eV/Å in a trained model's 4-atom Cu cells) and changed with
    the batch. They belong to the cell alone: such an edge is its lattice shift wherever the atom is."""
    import torch

    from jmp_ext.train.inference import load_trained, predict_structures

    small = ase.Atoms("CNO", positions=[[0.2, 0.3, 0.4], [0.9, 1.6, 1.7], [0.5, 2.9, 0.8]],
                      cell=[[1.95, 0.1, 0.0], [0.2, 4.5, 0.1], [0.0, 0.3, 4.6]], pbc=True)
    model, _ = load_trained(checkpoint, dtype="float32")
    alone = predict_structures(model, [small])["forces"]
    together = predict_structures(model, [rattled_cell(), small, small])["forces"]
    scale = float(alone.abs().max())
    for forces in (together[5:8], together[8:]):
        torch.testing.assert_close(forces, alone, rtol=0, atol=1e-5 * scale)
