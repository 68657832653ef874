"""The calculator, eval and predict on a checkpoint (untrained weights: these test the plumbing
and the physics of the outputs, not accuracy)."""

import json
import os
import re
import warnings

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from ase.units import fs

from jmp_ext.calculator import JMPCalculator
from jmp_ext.data import atoms_to_entry, collate, convert
from jmp_ext.train import TrainError, inference, loop, tasks
from jmp_ext.train.__main__ import main
from jmp_ext.train.config import build_config


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    # (k = 30: the quadruplet graph keeps int(30 * 8 / 30) = 8 neighbours, all of a small molecule's)
    raw = {"mode": "finetune", "run_dir": str(run), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 30},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"), "forces": "gradient",
                      "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "precision": "fp64", "progress": False, "fit_scale_factors": 0}}
    trainer = loop.Trainer(build_config(raw))
    trainer.save_best({})
    return run / "best.pt"


def test_the_readmes_python_api_runs(tiny_data, tmp_path, monkeypatch):
    """The README's Python API snippets are what a user pastes: each runs as it stands (the
    first on a checkpoint at runs/demo/best.pt with a task named molecules, as the demo's)."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Python API"):readme.index("## Where things are")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and "runs/demo/best.pt" in blocks[0]
    raw = {"mode": "finetune", "run_dir": str(tmp_path / "runs" / "demo"), "threads": 1,
           "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "molecules", "train": str(tiny_data / "mol" / "train"), "forces": "direct",
                      "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.fixture(scope="module")
def stress_checkpoint(tmp_path_factory):
    """Energy, gradient forces and stress, trained on molecules in periodic boxes."""
    from helpers import write_molecules

    root = tmp_path_factory.mktemp("stress")
    data = write_molecules(root / "data", 6, seed=3, periodic=True, stress=True)
    targets = [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"},
               {"name": "stress", "kind": "stress"}]
    raw = {"mode": "finetune", "run_dir": str(root / "run"), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "box", "train": data, "forces": "gradient", "targets": targets}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "precision": "fp64", "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    return root / "run" / "best.pt"


@pytest.mark.filterwarnings("ignore:element\\(s\\) Cu \\(29\\) are not in the training data")  # (Cu: expected)
@pytest.mark.filterwarnings("ignore:the model's graphs keep each atom's nearest neighbours only")  # (k = 8 in Cu)
def test_a_stress_model_still_serves_molecules(stress_checkpoint, tmp_path):
    """Stress is undefined without a cell: the molecule gets energy and forces, and stress only
    where there is a cell (NaN in predict's output, an ASE PropertyNotImplementedError)."""
    from ase.build import bulk
    from ase.calculators.calculator import PropertyNotImplementedError

    water, copper = molecule("H2O"), bulk("Cu", "fcc", a=3.6, cubic=True)
    calc = JMPCalculator(stress_checkpoint)
    water.calc = copper.calc = calc
    assert np.isfinite(water.get_potential_energy()) and np.isfinite(water.get_forces()).all()
    # The ideal lattice's rows: the dihedral basis is discontinuous there (jmp_ext.calculator).
    with pytest.warns(UserWarning) as caught:
        assert np.isfinite(copper.get_potential_energy()) and np.isfinite(copper.get_forces()).all()
    messages = [str(w.message) for w in caught if "straight line" in str(w.message)]
    assert len(messages) == 2
    assert re.match(r"\d+ of the \d+ quadruplets of this structure have three distinct atoms on a straight line",
                    messages[0])
    assert re.match(r"a force of .* eV/Å: atoms on \(nearly\) straight lines", messages[1])
    assert np.isfinite(copper.get_stress()).all()
    with pytest.raises(PropertyNotImplementedError, match="stress needs periodic boundary conditions"):
        water.get_stress()

    ase.io.write(tmp_path / "mixed.extxyz", [copper.copy(), water.copy()])  # (without the results)
    npz = tmp_path / "pred.npz"
    assert main(["predict", str(stress_checkpoint), str(tmp_path / "mixed.extxyz"), "--out", str(npz)]) == 0
    pred = np.load(npz)
    assert np.isnan(pred["stress"][1]).all()
    boxed = molecule("H2O", vacuum=4.0)  # (no pbc: its stress would be its box's, which the calculator refuses)
    ase.io.write(tmp_path / "boxed.extxyz", [copper.copy(), boxed])
    assert main(["predict", str(stress_checkpoint), str(tmp_path / "boxed.extxyz"), "--out", str(npz)]) == 0
    boxed_pred = np.load(npz)
    assert np.isnan(boxed_pred["stress"][1]).all() and np.array_equal(boxed_pred["stress"][0], pred["stress"][0])
    np.testing.assert_allclose(pred["stress"][0], copper.get_stress(voigt=False), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(pred["energy"], [copper.get_potential_energy(), water.get_potential_energy()],
                               rtol=1e-12)


def test_calculator_warns_about_atoms_on_lines_however_small_the_forces(stress_checkpoint):
    """The copies of an atom that atoms.repeat makes lie on straight lines, whatever rattle the
    repeated cell had: there the dihedral basis is singular and the forces are off -dE/dx
    (eV/Å in float32) without being large, so the force warning misses them. Warned once, at
    the call with forces; the same supercell rattled after repeating is fine."""
    # One atom per cell: its two nearest neighbours (the quadruplet graph's k of this
    # checkpoint) are its images along the shortest lattice vector, on a line with it. (The
    # repeated cell's exact forces are 0 by symmetry; the model's are not.)
    primitive = ase.Atoms("C", cell=[[2.5, 0.1, 0.0], [0.2, 2.9, 0.1], [0.1, 0.3, 3.3]], pbc=True)
    repeated = primitive.repeat((2, 1, 1))
    rattled_after = repeated.copy()
    rattled_after.rattle(0.01, seed=2)
    calc = JMPCalculator(stress_checkpoint)

    def line_warnings(atoms, properties) -> list[str]:
        # (k = 8 of the checkpoint leaves neighbours out in these cells: that warning is not this test's)
        atoms.calc = calc
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [getattr(atoms, f"get_{name}")() for name in properties]
        assert all(np.isfinite(r).all() for r in results)
        return [(w.filename, str(w.message)) for w in caught if "straight line" in str(w.message)]

    assert line_warnings(primitive, ["forces"]) == line_warnings(rattled_after, ["forces"]) == []
    assert line_warnings(repeated, ["potential_energy"]) == []  # (an energy alone: not checked)
    # The check reads the graphs the prediction uses: one build per call (it took two).
    built, graphs = [], calc.model.graphs
    with pytest.MonkeyPatch.context() as m:
        m.setattr(calc.model, "graphs", lambda batch: built.append(batch) or graphs(batch))
        ((filename, message),) = line_warnings(repeated, ["forces"])
    assert len(built) == 1
    assert filename == __file__
    assert re.match(r"\d+ of the \d+ quadruplets of this structure have three distinct atoms on a straight line, "
                    r".* a linear molecule, .* Rattle a crystal itself", message)
    assert np.abs(repeated.get_forces()).max() < 100  # (no force warning to rely on)
    assert line_warnings(primitive.repeat((3, 1, 1)), ["forces"]) == []  # (once per calculator)


def test_load_jmp_checkpoint_reads_our_run_checkpoints(stress_checkpoint):
    from jmp_ext.models.checkpoint import load_jmp_checkpoint
    from jmp_ext.train.tasks import build_network

    trained, config = inference.load_trained(stress_checkpoint)
    net = load_jmp_checkpoint(stress_checkpoint, build_network(config), load_heads=True)
    expected = trained.net.state_dict()
    assert net.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())


def test_a_stress_label_without_a_cell_or_pbc_is_a_clear_error():
    """A cell-less structure's stress is NaN; a non-periodic one's depends on its arbitrary box (it
    was trained on and scored while predict and the calculator gave none)."""
    cell = torch.stack([torch.eye(3), torch.zeros(3, 3), 2 * torch.eye(3), 3 * torch.eye(3)])
    pbc = torch.tensor([[True] * 3, [False] * 3, [True, True, False], [False] * 3])
    with pytest.raises(TrainError, match=r"'stress': structure\(s\) \[1, 3\] of the batch have a stress label but no "
                                         r"cell \(zero volume\) or no periodic axis"):
        tasks.check_stress_labels({"cell": cell, "pbc": pbc}, "stress")
    tasks.check_stress_labels({"cell": cell[[0, 2]], "pbc": pbc[[0, 2]]}, "stress")


def test_calculator_recomputes_when_only_the_tags_change(checkpoint):
    """ASE's check_state ignores tags, but they choose the quadruplet graph (0: sub-surface)."""
    atoms = molecule("CH3CH2OH")
    atoms.calc = JMPCalculator(checkpoint)
    before = atoms.get_potential_energy()
    atoms.set_tags([0] * 4 + [1] * (len(atoms) - 4))
    fresh = atoms.copy()
    fresh.calc = JMPCalculator(checkpoint)
    assert fresh.get_potential_energy() != before  # (the tags matter to this model)
    assert atoms.get_potential_energy() == fresh.get_potential_energy()


def test_calculator_warns_once_about_implausible_forces(checkpoint, monkeypatch):
    """Near-collinear atoms (an unrattled lattice) give forces of 1e3-1e4 eV/Å (the dihedral
    basis is discontinuous there); such forces would wreck an optimiser's first step silently."""
    import warnings

    atoms = molecule("CH3OH")
    atoms.calc = JMPCalculator(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plausible = atoms.get_forces()
    forward = tasks.TaskModel.forward

    def huge(*args):
        preds = forward(*args)
        return {**preds, "forces": preds["forces"] * 1e3 / preds["forces"].abs().max()}

    monkeypatch.setattr(tasks.TaskModel, "forward", huge)
    atoms.rattle(1e-3)
    with pytest.warns(UserWarning, match=r"a force of 1\.\d+e\+03 eV/Å: atoms on \(nearly\) straight lines") as caught:
        atoms.get_forces()
    # At the user's line, not inside ASE's get_property (which said nothing of where it came from).
    assert [w.filename for w in caught] == [__file__]
    atoms.rattle(1e-3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert np.abs(atoms.get_forces()).max() == pytest.approx(1e3)  # (once per calculator)
    assert np.abs(plausible).max() < 100


def test_an_fp64_checkpoint_loads_without_rounding(checkpoint, tmp_path):
    """The network is made float64 before its weights load, not after (which rounded them to
    float32 on the way). The fixture's weights are float32 values; these are not."""
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v + 1e-12 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "best.pt")
    model, _ = inference.load_trained(tmp_path / "best.pt")
    for name, value in model.state_dict().items():
        assert value.dtype == state["model"][name].dtype and torch.equal(value, state["model"][name]), name


def test_a_checkpoint_whose_weights_do_not_fit_is_a_message(checkpoint, tmp_path):
    """E.g. one fine-tuned with forces by an older jmp_ext, whose energy head had biases."""
    state = torch.load(checkpoint, weights_only=True)
    for i in (0, 2, 4, 6):  # the old layout: biased hidden layers
        width = state["model"][f"net.output.heads.energy.mlp.{i}.weight"].shape[0]
        state["model"][f"net.output.heads.energy.mlp.{i}.bias"] = torch.zeros(width)
    torch.save(state, tmp_path / "best.pt")
    with pytest.raises(TrainError, match=r"best\.pt: its weights do not fit the network its config builds.*"
                                         r"Unexpected key\(s\) in state_dict: \"net\.output\.heads\.energy\.mlp\.0\.bias\""):
        inference.load_trained(tmp_path / "best.pt")


def test_a_config_whose_sizes_its_weights_lack_allocates_nothing(checkpoint, tmp_path, monkeypatch):
    """A 3 kB file whose config asked for emb_size_edge 60000 made load_trained allocate 29 GB
    before comparing a weight: the network is checked on the meta device first."""
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["backbone_overrides"]["emb_size_edge"] = 60000
    torch.save(state, tmp_path / "best.pt")
    built_on = []
    build = inference.build_model

    def recording(*args):
        built_on.append(torch.empty(()).device.type)  # (the device factory functions use here)
        return build(*args)

    monkeypatch.setattr(inference, "build_model", recording)
    with pytest.raises(TrainError, match=r"best\.pt: its weights do not fit .*size mismatch"):
        inference.load_trained(tmp_path / "best.pt")
    assert built_on == ["meta"]


def test_elements_outside_the_training_data_are_pointed_out(checkpoint, tmp_path):
    """Trained on H, C, N, O: a sulfur atom gets an embedding the fine-tune never saw."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        methanol = molecule("CH3OH")
        methanol.calc = JMPCalculator(checkpoint)
        methanol.get_potential_energy()
    thiol = molecule("CH3SH")
    thiol.calc = JMPCalculator(checkpoint)
    with pytest.warns(UserWarning, match=r"element\(s\) S \(16\) are not in the training data of task 'mol'") as caught:
        thiol.get_potential_energy()
    assert [w.filename for w in caught] == [__file__]  # (was jmp_ext/calculator.py)
    thiol.calc = SinglePointCalculator(thiol, energy=-1.0, forces=np.zeros((len(thiol), 3)))
    ase.io.write(tmp_path / "thiol.extxyz", thiol)
    with pytest.warns(UserWarning, match=r"element\(s\) S \(16\)"):
        assert main(["predict", str(checkpoint), str(tmp_path / "thiol.extxyz"), "--out", str(tmp_path / "p.npz")]) == 0
    convert(tmp_path / "thiol.extxyz", tmp_path / "thiol")
    with pytest.warns(UserWarning, match=r"element\(s\) S \(16\) are not in the training data of task 'mol'"):
        assert main(["eval", str(checkpoint), str(tmp_path / "thiol")]) == 0  # (it said nothing)


def test_predict_warns_once_about_the_elements_of_all_batches(checkpoint, tmp_path):
    """predict warned per batch, each time with that batch's elements: a screening run of many
    batches repeated the warning, and no one of them named every element."""
    images = [molecule(n) for n in ("CH3SH", "CH3OH", "CH3Cl", "SiH4")]
    for atoms in images:
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0)
    ase.io.write(tmp_path / "in.extxyz", images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.npz"),
                     "--batch-size", "1"]) == 0
    assert [str(w.message) for w in caught] == ["element(s) Si (14), S (16), Cl (17) are not in the training data of "
                                                "task 'mol': the predictions for them extrapolate"]


def test_predict_to_extxyz_streams_its_input(checkpoint, tmp_path, monkeypatch):
    """An extxyz output held every input structure as Atoms until the end (~7.6 KB a molecule:
    gigabytes for a screening set); it reads the input again to write it, one at a time, and a
    file that changed in between is an error, not predictions beside other structures."""
    import gc
    import weakref

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O")] * 5
    ase.io.write(tmp_path / "in.extxyz", images)
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.npz")]) == 0
    refs, most, read = [], [0], inference.iter_structures  # (Atoms are unhashable: no WeakSet)

    def tracked(path):
        for atoms in read(path):
            gc.collect()
            refs.append(weakref.ref(atoms))
            most[0] = max(most[0], sum(ref() is not None for ref in refs))
            yield atoms

    monkeypatch.setattr(inference, "iter_structures", tracked)
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.extxyz"),
                 "--batch-size", "2"]) == 0
    assert 1 <= most[0] <= 3  # (was 20: all of them)
    npz, frames = np.load(tmp_path / "p.npz"), ase.io.read(tmp_path / "p.extxyz", index=":")
    assert [f.get_chemical_formula() for f in frames] == [a.get_chemical_formula() for a in images]
    assert [f.info["predicted_energy"] for f in frames] == pytest.approx(npz["energy"].tolist(), rel=1e-12)
    # The input rewritten while predict ran: one structure fewer, another one in its place, or
    # one of as many atoms (NH3 for CH4O's... H2O's 3: H2N), or moved.
    moved = images[-1].copy()
    moved.positions[0, 0] += 1e-9
    renamed = images[-1].copy()
    renamed.numbers[0] = 7
    for changed in (images[:-1], [*images[:-1], molecule("C6H6")], [*images[:-1], renamed], [*images[:-1], moved]):
        calls = []

        def rewritten(path, changed=changed):
            calls.append(path)
            yield from (atoms.copy() for atoms in (changed if len(calls) > 1 else images))

        monkeypatch.setattr(inference, "iter_structures", rewritten)
        with pytest.raises(TrainError, match=r"input .*in.extxyz changed while predict ran: run it again"):
            inference.predict_checkpoint(str(checkpoint), str(tmp_path / "in.extxyz"), str(tmp_path / "p.extxyz"),
                                         None, 16, "cpu")
        assert len(ase.io.read(tmp_path / "p.extxyz", index=":")) == 20  # (the previous output, untouched)
    assert not list(tmp_path.glob(".p.extxyz.*"))


def test_eval_of_a_file_on_a_full_temporary_disk_says_where_it_writes(checkpoint, tmp_path):
    """eval converts a file into $TMPDIR first; a full one read "could not be read as a
    labelled structure file". (A file-size limit stands in for the full disk.)"""
    import subprocess
    import sys

    images = [molecule("CH3CH2OH") for _ in range(200)]
    for k, atoms in enumerate(images):
        atoms.rattle(0.05, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    ase.io.write(tmp_path / "big.extxyz", images)
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # (a write past the limit fails, EFBIG)
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            "from jmp_ext.train.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "eval", str(checkpoint), str(tmp_path / "big.extxyz")],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path),
                                                              "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 2, done.stderr
    assert (f"error: eval converts {tmp_path / 'big.extxyz'} into a temporary directory first, and writing it "
            f"failed (writing dataset {tmp_path}/tmp") in done.stderr
    assert "point TMPDIR at a writable disk with room" in done.stderr and "could not be read" not in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["big.extxyz"]  # (the temporary directory is gone)


def test_a_disk_that_fills_while_a_file_converts_is_no_bad_structure(checkpoint, tmp_path, monkeypatch):
    """A full disk met while a structure was written (not at the end, as above) read "structure
    2: writing dataset ... failed", and eval advised leaving such structures out."""
    import errno
    import importlib

    convert_module = importlib.import_module("jmp_ext.data.convert")  # (jmp_ext.data.convert is the function)

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O")]
    for atoms in images:
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    ase.io.write(tmp_path / "in.extxyz", images)
    add = convert_module.DatasetWriter.add

    def add_until_full(writer, entry, where=None):
        if len(writer) == 2:
            raise OSError(errno.ENOSPC, f"writing dataset {writer.path} failed: is the disk full?")
        add(writer, entry, where=where)

    monkeypatch.setattr(convert_module.DatasetWriter, "add", add_until_full)
    with pytest.raises(TrainError, match=r"eval converts .*in.extxyz into a temporary directory first, and writing it "
                                         r"failed .*: point TMPDIR at a writable disk with room"):
        inference.evaluate_checkpoint(checkpoint, str(tmp_path / "in.extxyz"), None, None, 2, "cpu")


def test_per_atom_energies_sum_to_the_energy_and_are_local(checkpoint, tmp_path):
    """ASE's get_potential_energies: each atom's term of GemNet-OC's energy sum, its element's
    reference included. They sum to the energy, and a molecule far from another keeps its own."""
    calc = JMPCalculator(checkpoint)
    one = molecule("CH3OH")
    one.calc = calc
    alone = one.get_potential_energies()
    assert alone.shape == (6,) and alone.sum() == pytest.approx(one.get_potential_energy(), abs=1e-9)
    assert len(set(np.round(alone, 6))) > 2  # (not a constant share: the atoms differ)
    far = one.copy()
    far.positions += [50.0, 0, 0]
    pair = one + far
    pair.calc = calc
    np.testing.assert_allclose(pair.get_potential_energies(), np.concatenate([alone, alone]), atol=1e-9)
    # predict writes them per atom, in .npz and .extxyz
    ase.io.write(tmp_path / "in.extxyz", [one.copy(), pair.copy()])  # (without the shared calculator)
    for out in ("p.npz", "p.extxyz"):
        assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / out)]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "p.npz")["energies"], np.concatenate([alone, alone, alone]),
                               atol=1e-9)
    frames = ase.io.read(tmp_path / "p.extxyz", index=":")
    np.testing.assert_allclose(frames[1].arrays["predicted_energies"], np.concatenate([alone, alone]), atol=1e-6)


def test_the_energy_is_extensive(checkpoint):
    """Two copies of a molecule beyond the cutoff of each other have twice its energy: a
    per-structure mean added to every prediction broke this by that mean (an adsorption energy
    was off by it, a surface energy by n - 1 times it)."""
    calc = JMPCalculator(checkpoint)
    one = molecule("CH3OH")
    far = one.copy()
    far.positions += [50.0, 0, 0]
    energies = []
    for atoms in (one, one + far):
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
    assert energies[1] == pytest.approx(2 * energies[0], abs=1e-9)


@pytest.mark.filterwarnings("ignore:element\\(s\\) Cu \\(29\\) are not in the training data")  # (Cu: expected)
@pytest.mark.filterwarnings("ignore:the model's graphs keep each atom's nearest neighbours only")  # (k = 8 in Cu)
def test_an_energy_alone_skips_the_gradients(stress_checkpoint, monkeypatch):
    """get_potential_energy() ran the gradient forces and stress too (a Monte Carlo step paid
    for them); the energy is the same, and forces asked for later are computed then."""
    from ase.build import bulk

    from jmp_ext.models.network import FinetuneModel

    calls = []
    forward = FinetuneModel.forward
    monkeypatch.setattr(FinetuneModel, "forward", lambda self, batch, graphs, derivatives=True:
                        calls.append(derivatives) or forward(self, batch, graphs, derivatives))
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.rattle(0.05, seed=2)
    crystal.calc = JMPCalculator(stress_checkpoint)
    energy = crystal.get_potential_energy()
    forces = crystal.get_forces()
    assert calls == [False, True]
    both = crystal.copy()
    both.calc = JMPCalculator(stress_checkpoint)
    assert both.get_forces() == pytest.approx(forces, rel=1e-12)
    assert both.get_potential_energy() == pytest.approx(energy, rel=1e-12) and calls == [False, True, True]


def test_calculator_forces_are_minus_the_energy_gradient(checkpoint):
    atoms = molecule("CH3OH")
    atoms.calc = JMPCalculator(checkpoint)
    forces = atoms.get_forces()
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for d in range(3):
            for sign in (1, -1):
                shifted = atoms.copy()
                shifted.calc = atoms.calc
                shifted.positions[i, d] += sign * h
                numeric[i, d] -= sign * shifted.get_potential_energy() / (2 * h)
    np.testing.assert_allclose(forces, numeric, atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="stress"):
        atoms.get_stress()


def test_relaxation_and_md_run(checkpoint):
    atoms = molecule("H2CO")
    atoms.rattle(0.05, seed=1)
    atoms.calc = JMPCalculator(checkpoint)
    e0 = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=5)
    assert atoms.get_potential_energy() < e0  # the optimiser went downhill on this surface
    md = VelocityVerlet(atoms, 0.1 * fs, logfile=None)
    atoms.set_momenta(np.zeros_like(atoms.positions))
    start = atoms.get_total_energy()
    md.run(5)
    assert abs(atoms.get_total_energy() - start) < 1e-3 * max(1.0, abs(start))  # conservative forces


def test_eval_and_predict_cli(checkpoint, tiny_data, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["eval", str(checkpoint), str(tiny_data / "mol" / "test"), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    model, config = inference.load_trained(checkpoint)
    from jmp_ext.data import LmdbDataset
    ds = LmdbDataset(tiny_data / "mol" / "test")
    direct = inference.evaluate(model, [ds], 16, torch.float64, torch.device("cpu"))
    assert metrics == pytest.approx(direct, rel=1e-12)

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO")]
    ase.io.write(tmp_path / "in.extxyz", images)
    npz = tmp_path / "pred.npz"
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(npz), "--batch-size", "2"]) == 0
    pred = np.load(npz)
    assert pred["natoms"].tolist() == [6, 8, 7] and pred["forces"].shape == (21, 3)
    calc = JMPCalculator(checkpoint)
    for k, atoms in enumerate(images):
        atoms.calc = calc
        assert pred["energy"][k] == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
    # --dtype: the network in another precision (this checkpoint was trained in float64).
    single = tmp_path / "single.npz"
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(single), "--dtype", "float32"]) == 0
    calc = JMPCalculator(checkpoint, dtype="float32")
    for k, atoms in enumerate(images):
        atoms.calc = calc
        assert np.load(single)["energy"][k] == pytest.approx(atoms.get_potential_energy(), rel=1e-6)
    assert not np.array_equal(np.load(single)["forces"], pred["forces"])
    assert main(["eval", str(checkpoint), str(tiny_data / "mol" / "test"), "--out", str(out), "--dtype", "float32"]) == 0
    single_metrics = json.loads(out.read_text())
    assert single_metrics != metrics and single_metrics == pytest.approx(metrics, rel=1e-3)


def test_eval_reads_an_extxyz_as_convert_would(checkpoint, tmp_path, capsys):
    """eval refused a file (convert it first) where predict took one: it converts it with
    convert's default label keys, and says how to name another key."""
    from ase.calculators.emt import EMT

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO")]
    for atoms in images:
        atoms.calc = EMT()
        atoms.get_forces()
    ase.io.write(tmp_path / "labelled.extxyz", images)
    convert(tmp_path / "labelled.extxyz", tmp_path / "labelled")
    for source, out in ((tmp_path / "labelled.extxyz", "file.json"), (tmp_path / "labelled", "dir.json")):
        assert main(["eval", str(checkpoint), str(source), "--out", str(tmp_path / out)]) == 0
    assert json.loads((tmp_path / "file.json").read_text()) == json.loads((tmp_path / "dir.json").read_text())
    ase.io.write(tmp_path / "unlabelled.extxyz", [molecule("CH3OH")])
    capsys.readouterr()
    with warnings.catch_warnings():  # (convert's no-labels advice, naming a temporary directory, is not shown)
        warnings.simplefilter("error", UserWarning)
        assert main(["eval", str(checkpoint), str(tmp_path / "unlabelled.extxyz")]) == 2
    assert (f"target 'energy' of the checkpoint is not in {tmp_path / 'unlabelled.extxyz'} (it has: atomic_numbers, "
            f"cell, fixed, pbc, pos, sid, tags); convert it with the label's key: python -m jmp_ext.data convert "
            f"{tmp_path / 'unlabelled.extxyz'} OUT_DIR --energy-key KEY") in capsys.readouterr().err
    # Files convert cannot read: messages, not tracebacks (an OC20 .lmdb needs --allow-pickle, which eval has not)
    (tmp_path / "s2ef.lmdb").write_bytes(b"\0" * 64)
    (tmp_path / "notes.json").write_text('{"a": 1}')
    (tmp_path / "broken.db").write_text("not sqlite")
    for name, message in (("s2ef.lmdb", "is an LMDB file, as OC20's splits are: convert it first, `python -m "
                                        "jmp_ext.data convert"),
                          ("notes.json", "notes.json: ase.db cannot read it (UnknownFileTypeError: "),
                          ("broken.db", "broken.db: ase.db cannot read it (DatabaseError: ")):
        assert main(["eval", str(checkpoint), str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and "--skip-invalid" not in err, name
    assert main(["eval", str(checkpoint), str(tmp_path / "labelled.extxyz"), "--task", "nope"]) == 2
    assert "--task 'nope' is not a task of the checkpoint" in capsys.readouterr().err
    # A structure the data refuses (an isolated atom) is named, with how to leave it out
    lone = molecule("H")
    lone.calc = SinglePointCalculator(lone, energy=-13.6, forces=np.zeros((1, 3)))
    ase.io.write(tmp_path / "with_e0.extxyz", [lone, *images])
    assert main(["eval", str(checkpoint), str(tmp_path / "with_e0.extxyz")]) == 2
    err = capsys.readouterr().err
    assert "structure 0: is a single atom" in err and (f"convert the file yourself, `python -m jmp_ext.data convert "
                                                       f"{tmp_path / 'with_e0.extxyz'} OUT_DIR --stress-key none --skip-invalid`") in err


def test_suggested_commands_can_be_pasted_for_paths_with_spaces_and_quotes(checkpoint, tiny_data, tmp_path, capsys):
    """The commands a message suggests (`python -m jmp_ext.data convert PATH ...`) put the user's
    path in as it stood: a folder named "it's my data" split into three words in the shell."""
    import shlex

    folder = tmp_path / "it's my data"
    folder.mkdir()

    def pasted_path(message):  # the words a shell makes of the suggested command, its path among them
        command = re.search(r"python -m jmp_ext\.data [^`]*", message).group(0)
        return [word for word in shlex.split(command) if word.startswith(str(folder))]

    (folder / "s2ef.lmdb").write_bytes(b"\0" * 64)
    ase.io.write(folder / "unlabelled.extxyz", [molecule("CH3OH")])
    for name in ("s2ef.lmdb", "unlabelled.extxyz"):
        assert main(["eval", str(checkpoint), str(folder / name)]) == 2
        assert pasted_path(capsys.readouterr().err) == [str(folder / name)], name
    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "tasks": [
        {"name": "mol", "train": str(folder / "unlabelled.extxyz"), "targets": [{"name": "energy", "kind": "energy"}]}]}
    with pytest.raises(TrainError) as error:
        loop.Trainer(build_config(raw))
    assert pasted_path(str(error.value)) == [str(folder / "unlabelled.extxyz")]


def test_eval_of_a_file_scores_the_checkpoints_targets_that_it_has(checkpoint, tmp_path, capsys):
    """eval converted every label of a file: a stress only some frames carry stopped an energy
    and forces checkpoint, and a file without forces scored nothing. It converts the labels the
    checkpoint predicts and scores those present (a warning names the others)."""
    from ase.calculators.emt import EMT

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O")]
    for k, atoms in enumerate(images):
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           **({"stress": np.zeros(6)} if k % 2 else {}))
    ase.io.write(tmp_path / "mixed.extxyz", images)
    assert main(["eval", str(checkpoint), str(tmp_path / "mixed.extxyz"), "--out", str(tmp_path / "m.json")]) == 0
    model, _ = inference.load_trained(checkpoint)
    preds = inference.predict_structures(model, [atoms_to_entry(a) for a in images], 0)
    energy = np.array([a.get_potential_energy() for a in images])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mol/energy_mae"] == pytest.approx(np.abs(preds["energy"].numpy() - energy).mean(), rel=1e-9)
    assert "mol/forces_mae" in metrics
    for atoms in images:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    ase.io.write(tmp_path / "energy_only.extxyz", images)
    with pytest.warns(UserWarning, match=r"energy_only.extxyz has no 'forces' label\(s\): the metrics are those of "
                                         r"the checkpoint's other targets"):
        assert main(["eval", str(checkpoint), str(tmp_path / "energy_only.extxyz"), "--out", str(tmp_path / "e.json")]) == 0
    only = json.loads((tmp_path / "e.json").read_text())
    assert only["mol/energy_mae"] == metrics["mol/energy_mae"] and not any("forces" in k for k in only)


def test_eval_of_a_file_with_a_label_on_some_structures_scores_the_others(stress_checkpoint, tmp_path):
    """A stress on only some frames stopped eval with advice that failed too (convert
    --skip-invalid does not skip a frame with a label the frames before it lack): the label is
    left out of the metrics, as one the file lacks, and the warning says why."""
    from ase.calculators.emt import EMT

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O")]
    for atoms in images:
        atoms.center(vacuum=4.0)
        atoms.pbc = True
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           stress=atoms.get_stress())
    model, _ = inference.load_trained(stress_checkpoint)
    preds = inference.predict_structures(model, [atoms_to_entry(a) for a in images], 0)
    energy_mae = np.abs(preds["energy"].numpy() - [a.get_potential_energy() for a in images]).mean()
    for name, unstressed in (("later", [2, 3]), ("first", [0, 1])):
        for k in unstressed:  # (the last frames lack it: a lacking label; the first: an extra one later)
            del images[k].calc.results["stress"]
        ase.io.write(tmp_path / f"{name}.extxyz", images)
        for k in unstressed:
            images[k].calc.results["stress"] = np.zeros(6)
        with pytest.warns(UserWarning, match=rf"{name}.extxyz has no 'stress' label\(s\) \('stress': on some of its "
                                             r"structures only\): the metrics are those of the checkpoint's other"):
            metrics = inference.evaluate_checkpoint(str(stress_checkpoint), str(tmp_path / f"{name}.extxyz"), None,
                                                    None, 2, "cpu")
        assert metrics["box/energy_mae"] == pytest.approx(energy_mae, rel=1e-9), name
        assert "box/forces_mae" in metrics and not any("stress" in key for key in metrics), name
    # Every target on some structures only: nothing to score, and a convert that makes a dataset of
    # those that have them (--skip-invalid skips the structures without a label the first has).
    for name, unlabelled in (("later", [2, 3]), ("first", [0])):
        for k, atoms in enumerate(images):
            atoms.calc.results = {} if k in unlabelled else {"energy": -1.0, "forces": np.zeros((len(atoms), 3)),
                                                             "stress": np.zeros(6)}
        ase.io.write(tmp_path / f"{name}_all.extxyz", images)
        first = "" if name == "later" else r" \(with one of them first\)"
        with pytest.raises(TrainError, match=rf"only some of its structures have it: evaluate a dataset of those, "
                                             rf"`python -m jmp_ext.data convert .*{name}_all.extxyz OUT_DIR "
                                             rf"--skip-invalid`{first}$"):
            inference.evaluate_checkpoint(str(stress_checkpoint), str(tmp_path / f"{name}_all.extxyz"), None, None, 2,
                                          "cpu")
    # (read in other units: the advice reads it so too; it stored kcal/mol as eV)
    with pytest.raises(TrainError, match=r"convert .*first_all.extxyz OUT_DIR --energy-unit kcal/mol --skip-invalid`"):
        inference.evaluate_checkpoint(str(stress_checkpoint), str(tmp_path / "first_all.extxyz"), None, None, 2, "cpu",
                                      energy_unit="kcal/mol")
    with pytest.raises(TrainError, match=r"--subtract-reference applies to an OC20 S2EF extxyz, in eV: not to .*first_"
                                         r"all.extxyz read in kcal/mol"):
        inference.evaluate_checkpoint(str(stress_checkpoint), str(tmp_path / "first_all.extxyz"), None, None, 2, "cpu",
                                      energy_unit="kcal/mol", subtract_reference=True)


def test_eval_names_entries_whose_labels_are_not_finite(checkpoint, tiny_data, tmp_path, capsys):
    """The writer refuses NaN labels and a training split's statistics do too, but a validation
    or test split from elsewhere gave NaN metrics (NaN in the JSON), and as a run's val split
    a best.pt was never written."""
    import shutil

    import lmdb

    from jmp_ext.data import LmdbDataset
    from jmp_ext.data import format as fmt

    split = shutil.copytree(tiny_data / "mol" / "test", tmp_path / "test")
    entry = LmdbDataset(split).read(2)
    entry["forces"][1, 0] = np.nan
    env = lmdb.open(str(split / "data.0000.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"2", fmt.encode_entry(entry))
    env.close()
    assert main(["eval", str(checkpoint), str(split), "--batch-size", "2"]) == 2
    assert f"{split} entry [2]: label 'forces' holds NaN or inf; remove such entries" in capsys.readouterr().err


def test_predict_writes_extxyz_with_the_labels_kept(checkpoint, stress_checkpoint, tiny_data, tmp_path, capsys):
    """--out names the format: .npz or .extxyz/.xyz (the structures with predicted_* beside the
    input's own labels); any other name is refused (a .json got a zip under its name)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO")]
    for k, atoms in enumerate(images):
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0 - k, forces=np.full((len(atoms), 3), 0.5))
    ase.io.write(tmp_path / "in.extxyz", images)
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.npz")]) == 0
    npz = np.load(tmp_path / "p.npz")
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.extxyz"),
                 "--batch-size", "2"]) == 0
    # (the columns it wrote: the npz's names were listed, natoms included)
    assert capsys.readouterr().out.endswith("p.extxyz: predicted_energies, predicted_energy, predicted_forces\n")
    frames = ase.io.read(tmp_path / "p.extxyz", index=":")
    starts = np.cumsum([0, *npz["natoms"]])
    for k, atoms in enumerate(frames):
        assert atoms.get_chemical_formula() == images[k].get_chemical_formula()
        assert atoms.get_potential_energy() == -1.0 - k  # (the input's label, kept)
        assert atoms.info["predicted_energy"] == pytest.approx(npz["energy"][k], rel=1e-12)
        # (extxyz columns hold 8 decimals)
        assert atoms.arrays["predicted_forces"] == pytest.approx(npz["forces"][starts[k]:starts[k + 1]], abs=1e-8)
    # From a dataset directory: its structures, with sid.
    assert main(["predict", str(checkpoint), str(tiny_data / "mol" / "test"), "--out", str(tmp_path / "d.xyz")]) == 0
    from jmp_ext.data import LmdbDataset

    ds = LmdbDataset(tiny_data / "mol" / "test")
    frames = ase.io.read(tmp_path / "d.xyz", index=":")
    assert len(frames) == len(ds)
    assert np.allclose(frames[1].positions, ds[1]["pos"]) and frames[1].numbers.tolist() == ds[1]["atomic_numbers"].tolist()
    # ... with its labels, tags and fixed atoms, as a file's frames keep theirs (the tags choose
    # the quadruplet graph: predictions on the written file must be those written in it).
    assert frames[1].get_potential_energy() == pytest.approx(float(ds[1]["energy"]), rel=1e-12)
    assert frames[1].get_forces() == pytest.approx(np.asarray(ds[1]["forces"]), abs=1e-8)
    assert frames[1].get_tags().tolist() == np.asarray(ds[1]["tags"]).tolist()
    # Stress: a 3x3 per structure, read back as written.
    from ase.build import bulk

    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.rattle(0.05, seed=1)
    ase.io.write(tmp_path / "cu.extxyz", crystal)
    with pytest.warns(UserWarning, match=r"element\(s\) Cu \(29\)"):
        assert main(["predict", str(stress_checkpoint), str(tmp_path / "cu.extxyz"), "--out",
                     str(tmp_path / "cu_pred.extxyz")]) == 0
        assert main(["predict", str(stress_checkpoint), str(tmp_path / "cu.extxyz"), "--out",
                     str(tmp_path / "cu_pred.npz")]) == 0
    stress = np.asarray(ase.io.read(tmp_path / "cu_pred.extxyz").info["predicted_stress"]).reshape(3, 3)
    assert stress == pytest.approx(np.load(tmp_path / "cu_pred.npz")["stress"][0], rel=1e-12)
    # One-atom cells: as many atoms as structures, and forces are still per atom.
    ase.io.write(tmp_path / "prim.extxyz", [bulk("Cu", "fcc", a=a) for a in (3.5, 3.6)])
    with pytest.warns(UserWarning, match=r"element\(s\) Cu \(29\)"):
        assert main(["predict", str(stress_checkpoint), str(tmp_path / "prim.extxyz"), "--out",
                     str(tmp_path / "prim_pred.extxyz")]) == 0
    frames = ase.io.read(tmp_path / "prim_pred.extxyz", index=":")
    assert all(f.arrays["predicted_forces"].shape == (1, 3) and "predicted_forces" not in f.info for f in frames)
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.json")]) == 2
    assert "--out " + str(tmp_path / "p.json") + ": predictions are written as .npz, .extxyz, .xyz" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_predict_names_a_structure_without_edges_by_its_place_in_the_input(checkpoint, tmp_path, capsys):
    from ase import Atoms

    images = [molecule("CH3OH"), molecule("C2H6"), molecule("H2O"), Atoms("O", positions=[[0, 0, 0]])]
    ase.io.write(tmp_path / "in.extxyz", images)
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "p.npz"),
                 "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "input structure(s) [3] (0-based, in the input's order): no pair of atoms within cutoff_main=4.0 Å" in err
    assert "--skip-invalid gives such structures NaN predictions instead" in err  # (predict's own flag)


def test_predict_skip_invalid_gives_nan_for_the_structures_it_cannot_take(checkpoint, tmp_path, capsys):
    """A screening run over many files stopped at the first isolated atom or unknown element;
    with --skip-invalid those get NaN rows (named on stderr) and the others the predictions
    they get alone."""
    from ase import Atoms

    good = [molecule("CH3OH"), molecule("C2H6"), molecule("H2O"), molecule("CH3CHO")]
    lone, alien = Atoms("O", positions=[[0, 0, 0]]), molecule("H2O")
    alien.numbers[0] = 0  # (Z = 0: no element)
    images = [good[0], lone, good[1], alien, good[2], good[3]]
    ase.io.write(tmp_path / "in.extxyz", images)
    ase.io.write(tmp_path / "good.extxyz", good)
    assert main(["predict", str(checkpoint), str(tmp_path / "good.extxyz"), "--out", str(tmp_path / "good.npz")]) == 0
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "all.npz"),
                 "--batch-size", "2", "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 structure(s) (NaN predictions):\n  1: no pair of atoms within cutoff_main" in err
    assert "  3: atoms: unknown element with atomic number 0" in err
    # Several in one batch are listed in the input's order (they came last-first).
    ase.io.write(tmp_path / "two.extxyz", [lone, good[0], lone])
    assert main(["predict", str(checkpoint), str(tmp_path / "two.extxyz"), "--out", str(tmp_path / "two.npz"),
                 "--skip-invalid"]) == 0
    listed = [line.split(":")[0].strip() for line in capsys.readouterr().err.splitlines() if ": no pair" in line]
    assert listed == ["0", "2"]
    ref, got = np.load(tmp_path / "good.npz"), np.load(tmp_path / "all.npz")
    assert got["valid"].tolist() == [True, False, True, False, True, True]
    assert got["natoms"].tolist() == [len(a) for a in images]
    ok = got["valid"]
    assert np.isnan(got["energy"][~ok]).all() and np.allclose(got["energy"][ok], ref["energy"], rtol=1e-12)
    atom_ok = np.repeat(ok, got["natoms"])
    assert np.isnan(got["forces"][~atom_ok]).all() and np.allclose(got["forces"][atom_ok], ref["forces"], rtol=1e-10)
    # As extxyz: the same rows beside every input structure
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "all.extxyz"),
                 "--skip-invalid"]) == 0
    frames = ase.io.read(tmp_path / "all.extxyz", index=":")
    assert len(frames) == 6 and np.isnan(frames[1].info["predicted_energy"])
    assert frames[2].info["predicted_energy"] == pytest.approx(ref["energy"][1], rel=1e-12)
    # Nothing to evaluate is still an error
    ase.io.write(tmp_path / "lone.extxyz", [lone])
    assert main(["predict", str(checkpoint), str(tmp_path / "lone.extxyz"), "--out", str(tmp_path / "l.npz"),
                 "--skip-invalid"]) == 2
    assert "no structure of " in capsys.readouterr().err


def test_the_truncation_warning_of_a_large_structure_names_the_natoms_rule(checkpoint):
    """JMP's MatBench / QMOF graphs keep fewer neighbours for large structures whatever
    graph.max_neighbors says: the advice to raise it would change nothing there."""
    import dataclasses

    benzene = molecule("C6H6")
    benzene.calc = JMPCalculator(checkpoint)
    configs = benzene.calc.model.graph_configs
    configs[0] = dataclasses.replace(configs[0], natoms_max_neighbors=((10, 6),))
    with pytest.warns(UserWarning, match=r"A structure of 12 atoms keeps at most 6 neighbours in these graphs "
                                         r"\(the MatBench / QMOF presets' rule"):
        benzene.get_potential_energy()


def test_predict_on_a_split_says_which_source_frame_each_row_is(checkpoint, tmp_path):
    """A split reorders the source's frames: predict's rows carry their sid (the source frame),
    so that predictions can be matched to structures without opening the LMDB."""
    from jmp_ext.data import LmdbDataset
    from jmp_ext.data.__main__ import main as data_main

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O", "NH3", "CH4")]
    for k, atoms in enumerate(images):
        atoms.info["REF_energy"] = -float(k)
    ase.io.write(tmp_path / "in.extxyz", images)
    assert data_main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "all")]) == 0
    assert data_main(["split", str(tmp_path / "all"), str(tmp_path / "parts"), "--fractions", "a=0.5,b=0.5",
                      "--seed", "1"]) == 0
    assert main(["predict", str(checkpoint), str(tmp_path / "parts" / "b"), "--out", str(tmp_path / "p.npz")]) == 0
    pred = np.load(tmp_path / "p.npz")
    ds = LmdbDataset(tmp_path / "parts" / "b")
    assert pred["sid"].tolist() == [int(e["sid"]) for e in ds] and len(ds) == 3
    calc = JMPCalculator(checkpoint)
    for energy, sid in zip(pred["energy"], pred["sid"]):
        images[sid].calc = calc
        assert energy == pytest.approx(images[sid].get_potential_energy(), rel=1e-10)


def test_predict_carries_oc20s_sid_and_fid(checkpoint, tmp_path):
    """OC20's results are keyed by sid and fid: predict's npz had the sid alone, and its extxyz
    neither, so frames of one system's trajectory could not be told apart."""
    from jmp_ext.data.__main__ import main as data_main

    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O")]
    for k, atoms in enumerate(images):
        atoms.info.update(REF_energy=-float(k), sid=70 + k // 2, fid=k % 2)
    ase.io.write(tmp_path / "in.extxyz", images)
    assert data_main(["convert", str(tmp_path / "in.extxyz"), str(tmp_path / "ds")]) == 0
    assert main(["predict", str(checkpoint), str(tmp_path / "ds"), "--out", str(tmp_path / "p.npz")]) == 0
    pred = np.load(tmp_path / "p.npz")
    assert pred["sid"].tolist() == [70, 70, 71, 71] and pred["fid"].tolist() == [0, 1, 0, 1]
    assert main(["predict", str(checkpoint), str(tmp_path / "ds"), "--out", str(tmp_path / "p.extxyz")]) == 0
    frames = ase.io.read(tmp_path / "p.extxyz", ":")
    assert [(a.info["sid"], a.info["fid"]) for a in frames] == [(70, 0), (70, 1), (71, 0), (71, 1)]
    assert not [key for key in frames[0].info if key.endswith("id") and key.startswith("predicted_")]  # (the input's)
    # A file's own (its frames' info), or those of OC20 S2EF's frame log beside an extxyz: a file
    # gave none, and OC20's results could not be assembled without converting it first.
    assert main(["predict", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(tmp_path / "f.npz")]) == 0
    pred = np.load(tmp_path / "f.npz")
    assert pred["sid"].tolist() == [70, 70, 71, 71] and pred["fid"].tolist() == [0, 1, 0, 1]
    for atoms in images:
        del atoms.info["sid"], atoms.info["fid"]
    ase.io.write(tmp_path / "0.extxyz", images)
    (tmp_path / "0.txt").write_text("".join(f"random{90 + k},frame{3 * k},-1.5\n" for k in range(4)))
    assert main(["predict", str(checkpoint), str(tmp_path / "0.extxyz"), "--out", str(tmp_path / "l.extxyz")]) == 0
    assert [(a.info["sid"], a.info["fid"]) for a in ase.io.read(tmp_path / "l.extxyz", ":")] == [
        (90, 0), (91, 3), (92, 6), (93, 9)]
    # OC20 scores the free atoms' forces: the npz marks the fixed ones, where there are any.
    from ase.constraints import FixAtoms

    images[1].set_constraint(FixAtoms(indices=[0, 2]))
    ase.io.write(tmp_path / "fixed.extxyz", images)
    assert main(["predict", str(checkpoint), str(tmp_path / "fixed.extxyz"), "--out", str(tmp_path / "x.npz")]) == 0
    mask = np.load(tmp_path / "x.npz")["fixed"]
    starts = np.cumsum([0, *(len(atoms) for atoms in images)])
    assert mask.shape == (starts[-1],) and np.flatnonzero(mask).tolist() == [starts[1], starts[1] + 2]
    assert "fixed" not in np.load(tmp_path / "f.npz").files
    (tmp_path / "0.txt").write_text("random90,frame0,-1.5\n")
    with pytest.raises(TrainError, match=r"0\.txt lists 1 frames, fewer than .*0\.extxyz holds: its sid and fid "):
        inference.predict_checkpoint(str(checkpoint), str(tmp_path / "0.extxyz"), str(tmp_path / "x.npz"), None, 2,
                                     "cpu")


def test_eval_reads_a_file_in_its_units(checkpoint, tmp_path, capsys):
    """eval read every file as eV and Å: an MD22 extxyz in kcal/mol scored a force MAE 23 times
    the model's, without a word. --energy-unit and --length-unit read it as convert does; an
    sGDML npz, which records its units, is refused when read in others; predict, which has no
    units to convert, points to convert for an npz."""
    import shlex

    from ase import units

    from jmp_ext.data.__main__ import main as data_main

    kcal = units.kcal / units.mol
    images = [molecule(n) for n in ("CH3OH", "CH3OH", "CH3OH")]
    for k, atoms in enumerate(images):
        atoms.rattle(0.05, seed=k)
        atoms.info["REF_energy"] = -100.0 - k
        atoms.arrays["REF_forces"] = np.random.default_rng(k).normal(size=(len(atoms), 3))
    ase.io.write(tmp_path / "ev.extxyz", images)
    for atoms in images:
        atoms.info["REF_energy"] /= kcal
        atoms.arrays["REF_forces"] /= kcal
    ase.io.write(tmp_path / "kcal.extxyz", images)
    np.savez(tmp_path / "md.npz", R=np.stack([a.positions for a in images]), z=images[0].numbers,
             E=np.array([a.info["REF_energy"] for a in images]), F=np.stack([a.arrays["REF_forces"] for a in images]),
             e_unit=np.array("kcal/mol"), r_unit=np.array("Ang"))
    results = {}
    for name, options in (("ev.extxyz", []), ("kcal.extxyz", ["--energy-unit", "kcal/mol"]),
                          ("md.npz", ["--energy-unit", "kcal/mol"])):
        assert main(["eval", str(checkpoint), str(tmp_path / name), *options, "--out", str(tmp_path / "m.json")]) == 0
        results[name] = json.loads((tmp_path / "m.json").read_text())
    for name in ("kcal.extxyz", "md.npz"):
        assert results[name].keys() == results["ev.extxyz"].keys()
        for key, value in results[name].items():
            assert value == pytest.approx(results["ev.extxyz"][key], rel=1e-6), (name, key)
    capsys.readouterr()
    assert main(["eval", str(checkpoint), str(tmp_path / "md.npz")]) == 2
    assert "md.npz records its e_unit as 'kcal/mol', but it is read as eV: give --energy-unit kcal/mol" in \
        capsys.readouterr().err
    assert data_main(["convert", str(tmp_path / "ev.extxyz"), str(tmp_path / "ds")]) == 0
    for option in (["--energy-unit", "kcal/mol"], ["--subtract-reference"]):
        assert main(["eval", str(checkpoint), str(tmp_path / "ds"), *option]) == 2
        assert "--energy-unit, --length-unit and --subtract-reference apply to a file: dataset" in \
            capsys.readouterr().err
    assert main(["predict", str(checkpoint), str(tmp_path / "md.npz"), "--out", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert "is an sGDML or rMD17 trajectory: convert it first, `python -m jmp_ext.data convert " in err
    # The command it suggests converts the file, and predict takes the result.
    command = shlex.split(re.search(r"`python -m jmp_ext\.data (convert [^`]*)`", err).group(1).replace(
        "OUT_DIR", shlex.quote(str(tmp_path / "md_ds"))))
    assert data_main(command) == 0
    assert main(["predict", str(checkpoint), str(tmp_path / "md_ds"), "--out", str(tmp_path / "p.npz")]) == 0
    assert np.load(tmp_path / "p.npz")["energy"].shape == (3,)
    # An HDF5 file of conformations (ANI-1x's layout), evaluated in its units like the extxyz.
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "ani.h5", "w") as f:
        f["CH4O/atomic_numbers"] = images[0].numbers
        f["CH4O/coordinates"] = np.stack([a.positions for a in images])
        f["CH4O/wb97x_dz.energy"] = np.array([a.info["REF_energy"] for a in images])
        f["CH4O/wb97x_dz.forces"] = np.stack([a.arrays["REF_forces"] for a in images])
    with pytest.warns(UserWarning, match="ANI-1x's files hold Hartree"):  # (kcal/mol here)
        assert main(["eval", str(checkpoint), str(tmp_path / "ani.h5"), "--energy-unit", "kcal/mol", "--out",
                     str(tmp_path / "m.json")]) == 0
    for key, value in json.loads((tmp_path / "m.json").read_text()).items():
        assert value == pytest.approx(results["ev.extxyz"][key], rel=1e-6), key
    assert main(["predict", str(checkpoint), str(tmp_path / "ani.h5"), "--out", str(tmp_path / "p.npz")]) == 2
    assert "is an HDF5 file of conformations: convert it first" in capsys.readouterr().err


def test_calculator_warns_once_of_a_charge_it_does_not_take(checkpoint):
    """A SPICE-style cation and anion gave the same energy for the same geometry, without a word:
    the model takes no charge."""
    atoms = molecule("CH3OH")
    atoms.info.update(charge=0, total_charge=True)  # (a flag is no charge)
    atoms.set_initial_charges([0.4, -0.6, 0.2, 0.0, 0.0, 0.001])  # (a neutral molecule's, rounded)
    atoms.calc = JMPCalculator(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neutral = atoms.get_potential_energy()
    atoms.info["charge"] = -1
    atoms.positions[0, 0] += 1e-3  # (a new calculation)
    with pytest.warns(UserWarning, match=r"a net charge of -1 \(atoms.info\['charge'\]\), which the model does not "
                                         r"take .*evaluated as if neutral"):
        charged = atoms.get_potential_energy()
    atoms.positions[0, 0] -= 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (once per calculator)
        assert atoms.get_potential_energy() == neutral and np.isfinite(charged)
    cation = molecule("CH3OH")
    cation.set_initial_charges([1.0, 0, 0, 0, 0, 0])
    cation.calc = JMPCalculator(checkpoint)
    with pytest.warns(UserWarning, match=r"a net charge of \+1 \(the initial charges' sum\)"):
        cation.get_potential_energy()
    cation.set_initial_charges(None)
    cation.info["charge"] = float("nan")  # (a placeholder: no crash in round())
    cation.calc = JMPCalculator(checkpoint)
    with pytest.warns(UserWarning, match=r"a net charge of \+nan \(atoms.info\['charge'\]\)"):
        cation.get_potential_energy()


def test_a_pretraining_checkpoint_needs_a_task(tiny_data, tmp_path, capsys):
    """Each pretraining task has its own heads: none is a default (the first one silently gave
    another domain's energies)."""
    targets = [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]
    raw = {"mode": "pretrain", "run_dir": str(tmp_path / "run"), "threads": 1,
           "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": n, "train": str(tiny_data / n / "train"), "forces": "direct", "targets": targets}
                     for n in ("mol", "box")],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    checkpoint = str(tmp_path / "run" / "best.pt")
    assert main(["eval", checkpoint, str(tiny_data / "box" / "test")]) == 2
    assert "2 tasks, ['mol', 'box']: choose one with --task" in capsys.readouterr().err
    assert main(["eval", checkpoint, str(tiny_data / "box" / "test"), "--task", "box"]) == 0
    assert main(["eval", checkpoint, str(tiny_data / "box" / "test"), "--task", "bulk"]) == 2
    assert "--task 'bulk' is not a task of the checkpoint (tasks: ['mol', 'box'])" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one with task="):
        JMPCalculator(checkpoint)
    with pytest.raises(ValueError, match="task 'bulk' is not a task of the checkpoint"):
        JMPCalculator(checkpoint, task="bulk")
    atoms = molecule("H2O")
    with pytest.warns(UserWarning, match="direct forces"):  # (pretraining heads are direct)
        atoms.calc = JMPCalculator(checkpoint, task="mol")
    assert np.isfinite(atoms.get_potential_energy())
    # Per-atom energies: the task's own column, summing to its energy; the other task's differ
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-6)
    with pytest.warns(UserWarning, match="direct forces"):
        box = JMPCalculator(checkpoint, task="box")
    assert not np.allclose(box.get_potential_energies(atoms), atoms.get_potential_energies())
    # From Python: predict_structures names the task, by name or index; a TaskModel given a batch
    # without "task" asks for one.
    model, _ = inference.load_trained(checkpoint)
    with pytest.raises(TrainError, match=r"the checkpoint has 2 tasks, \['mol', 'box'\]: choose one with task="):
        inference.predict_structures(model, [atoms])
    by_name = inference.predict_structures(model, [atoms], "box")
    assert torch.equal(by_name["energy"], inference.predict_structures(model, [atoms], 1)["energy"])
    for index in (np.int64(1), torch.tensor(1)):
        assert torch.equal(by_name["energy"], inference.predict_structures(model, [atoms], index)["energy"])
    with pytest.raises(TypeError, match="task must be a task's name, index or None, got bool True"):
        inference.predict_structures(model, [atoms], True)
    assert by_name["energy"].item() == pytest.approx(box.get_potential_energy(atoms), rel=1e-12)
    with pytest.raises(IndexError, match="task 2 is not a task index of the model \\(it has 2 tasks\\)"):
        inference.predict_structures(model, [atoms], 2)
    with pytest.raises(ValueError, match=r"batch has no 'task': \[B\] int64, the index of each structure's task "
                                         r"in \['mol', 'box'\]"):
        model(collate([atoms_to_entry(atoms)]))


def test_predict_structures_takes_ase_atoms_and_a_model_of_one_task_any_batch(checkpoint):
    """ase.Atoms or entries alike; task None is the only task; TaskModel takes a batch of
    jmp_ext.data.collate, which has no "task", when it has one task."""
    model, _ = inference.load_trained(checkpoint)
    structures = [molecule("CH4"), molecule("H2O")]
    from_atoms = inference.predict_structures(model, structures)
    from_entries = inference.predict_structures(model, [atoms_to_entry(a) for a in structures], "mol")
    assert set(from_atoms) == {"energy", "forces", "energies"}
    for name, value in from_atoms.items():
        assert torch.equal(value, from_entries[name]), name
    own = model(collate([atoms_to_entry(a) for a in structures], torch.float64))
    assert torch.equal(own["energy"], from_atoms["energy"]) and torch.equal(own["forces"], from_atoms["forces"])


def test_cli_errors(checkpoint, tiny_data, tmp_path, capsys, monkeypatch):
    assert main(["eval", str(checkpoint), str(tmp_path / "none")]) == 2
    assert "dataset directory" in capsys.readouterr().err
    # Under torchrun every rank ran the whole evaluation, and wrote --out.
    with monkeypatch.context() as torchrun:
        torchrun.setenv("WORLD_SIZE", "2")
        torchrun.setenv("TORCHELASTIC_RUN_ID", "none")
        for command in ("eval", "predict"):
            args = [command, str(checkpoint), str(tiny_data / "mol" / "val"), "--out", str(tmp_path / "o.npz")]
            assert main(args) == 2
            assert f"{command} runs in one process: run it with python, not under torchrun" in capsys.readouterr().err
        assert not (tmp_path / "o.npz").exists()
    with monkeypatch.context() as cluster:  # (a cluster that exports WORLD_SIZE to every process)
        cluster.setenv("WORLD_SIZE", "2")
        assert main(["eval", str(checkpoint), str(tiny_data / "mol" / "val")]) == 0
    capsys.readouterr()
    # A ValueError from the setup (here: LLRD multipliers for the wrong number of blocks) is a
    # message too, not a traceback.
    run = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "model": {"backbone": "tiny"},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"),
                      "targets": [{"name": "energy", "kind": "energy"}]}],
           "optim": {"llrd_blocks": [0.5] * 7}, "loop": {"max_steps": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main([str(tmp_path / "run.yaml")]) == 2
    assert "optim.llrd_blocks has 7 multipliers" in capsys.readouterr().err
    assert main(["finetune", "optim.lr=x"]) == 2
    assert "optim.lr: expected a number" in capsys.readouterr().err
    # (fields of another kind raised a TypeError: dict(list), update(list), from_dict(str))
    for state in [{"w": torch.zeros(1)}, {"model": [1], "config": {}}, {"model": {}, "config": "x"},
                  {"model": {}, "config": {}, "ema": [1]}]:
        torch.save(state, tmp_path / "x.pt")
        with pytest.raises(TrainError, match="not a jmp_ext training checkpoint"):
            inference.load_trained(tmp_path / "x.pt")


def test_eval_and_predict_batches_keep_the_runs_max_atoms(tiny_data, tmp_path, monkeypatch, capsys):
    """A run's data.max_atoms, set for memory, did not cap validation, eval or predict batches
    (16 structures whatever their size): a user of large structures met the out-of-memory there."""
    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "threads": 1, "graph": {"cutoff": 4.0},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"), "forces": "direct",
                      "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "data": {"max_atoms": 10}, "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    seen, original = [], inference.structures_batch

    def counted(model, structures, *args, **kwargs):
        seen.append([len(s["atomic_numbers"]) for s in structures])
        return original(model, structures, *args, **kwargs)

    monkeypatch.setattr(inference, "structures_batch", counted)
    val = tiny_data / "mol" / "val"
    assert main(["predict", str(tmp_path / "run" / "best.pt"), str(val), "--out", str(tmp_path / "p.npz")]) == 0
    batches, original_load = [], inference.load_batches

    def loaded(dataset, indices, *args, **kwargs):
        batches.extend(indices)
        return original_load(dataset, indices, *args, **kwargs)

    monkeypatch.setattr(inference, "load_batches", loaded)
    assert main(["eval", str(tmp_path / "run" / "best.pt"), str(val)]) == 0
    natoms = inference.tasks.open_dataset(str(val), "val", False).natoms
    assert [[int(natoms[i]) for i in b] for b in batches] == seen and len(seen) > 1
    assert all(sum(b) <= 10 or len(b) == 1 for b in seen) and sum(map(len, seen)) == len(natoms)
    capsys.readouterr()
    # Out of memory in predict: the batch and what to lower, as in training.
    monkeypatch.setattr(tasks.TaskModel, "forward", lambda *args: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")))
    assert main(["predict", str(tmp_path / "run" / "best.pt"), str(val), "--out", str(tmp_path / "q.npz")]) == 2
    assert re.search(r"error: out of memory on a batch of \d structures, \d+ atoms .* eval and predict: --batch-size",
                     capsys.readouterr().err)


def test_calculator_gives_no_stress_without_a_periodic_axis(stress_checkpoint):
    """A molecule in a box without pbc got a finite stress, which only the box made: it is an
    error, as without a box, and a call for forces leaves none in the results for get_stress."""
    from ase.calculators.calculator import PropertyNotImplementedError

    boxed = molecule("H2O", vacuum=4.0)
    boxed.calc = JMPCalculator(stress_checkpoint)
    assert np.isfinite(boxed.get_forces()).all()
    assert "stress" not in boxed.calc.results
    with pytest.raises(PropertyNotImplementedError, match=r"stress needs periodic boundary conditions \(pbc on "
                                                          r"some axis\): a non-periodic structure's would depend"):
        boxed.get_stress()
    boxed.pbc = [True, True, False]  # (a slab: the stress of its cell, as ASE's calculators give it)
    assert np.isfinite(boxed.get_stress()).all()


@pytest.mark.filterwarnings("ignore:the model's graphs keep each atom's nearest neighbours only")  # (k = 8)
def test_calculator_of_a_slab_far_along_its_normal_keeps_float32_precision(stress_checkpoint):
    """Periodic axes are wrapped and clusters centred before the float32 cast, but the open axis
    of a slab kept its coordinate, which float32 rounds to its magnitude (an audit's slab 200 Å
    up its normal: forces 1.7e-5 eV/Å off; 1e6 Å here rounds to 0.06 Å). Any shift along the
    open axis is the same structure, so it is centred there."""
    slab = molecule("CH3CHO", vacuum=4.0)
    slab.rattle(0.05, seed=0)
    slab.pbc = [True, True, False]
    results = []
    for shift in (0.0, 1e6):
        atoms = slab.copy()
        atoms.positions[:, 2] += shift
        atoms.calc = JMPCalculator(stress_checkpoint, dtype="float32")
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    (e0, f0, s0), (e1, f1, s1) = results
    assert abs(e1 - e0) < 1e-5 and np.abs(f1 - f0).max() < 1e-5 and np.abs(s1 - s0).max() < 1e-7


def test_calculator_lists_stress_only_when_the_checkpoint_predicts_it(checkpoint, stress_checkpoint):
    assert "stress" not in JMPCalculator(checkpoint).implemented_properties
    assert "stress" in JMPCalculator(stress_checkpoint).implemented_properties
    assert "stress" in JMPCalculator.implemented_properties  # (the class attribute is left alone)


def test_calculator_of_no_atoms_gives_zeros(stress_checkpoint):
    """A sum over no atoms is 0, as ASE's own calculators (EMT) give it; it was a DataError."""
    import ase

    calc = JMPCalculator(stress_checkpoint)
    for atoms in (ase.Atoms(), ase.Atoms(cell=[5.0, 5.0, 5.0], pbc=True)):
        atoms.calc = calc
        assert atoms.get_potential_energy() == 0.0 and atoms.get_forces().shape == (0, 3)
        assert atoms.get_potential_energies().shape == (0,)
    assert np.array_equal(atoms.get_stress(), np.zeros(6))


def test_calculator_without_a_force_head_says_so(tiny_data, tmp_path):
    """An energy-only checkpoint: ASE must not be told it has forces (optimisers ask for them)."""
    from ase.calculators.calculator import PropertyNotImplementedError

    raw = {"mode": "finetune", "run_dir": str(tmp_path), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"),
                      "targets": [{"name": "energy", "kind": "energy"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    calc = JMPCalculator(tmp_path / "best.pt")
    assert calc.implemented_properties == ["energy", "free_energy", "energies"]
    atoms = molecule("H2O")
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="forces property not implemented: this checkpoint was "
                                                          "not trained with a forces target"):
        atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError, match=r"fine-tune with forces: gradient and a stress target"):
        atoms.get_stress()
    # calculate() called directly (as ASE's own code may) said "stress needs a cell with nonzero
    # volume" of a 4 Å box.
    boxed = molecule("H2O", vacuum=4.0, pbc=True)
    for properties in (["energy", "stress"], ["forces"]):
        with pytest.raises(PropertyNotImplementedError, match=rf"{properties[-1]} property not implemented: this "
                                                              "checkpoint was not trained"):
            calc.calculate(boxed, properties)


def test_calculator_without_an_energy_names_the_targets(tmp_path):
    """A scalar-only checkpoint: the error named target kinds (['scalar']), not which targets;
    eval takes the scalar from a file."""
    from helpers import write_molecules

    data = write_molecules(tmp_path / "data", 4, seed=5, u0=True)
    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "threads": 1,
           "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "mol", "train": data, "targets": [{"name": "u0", "kind": "scalar", "reduction": "sum"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    with pytest.raises(ValueError, match=r"best.pt predicts u0 \(scalar\) \(task 'mol'\), not an energy .*: `python -m "
                                         r"jmp_ext.train predict`, or jmp_ext.train.inference.predict_structures"):
        JMPCalculator(tmp_path / "run" / "best.pt")
    # eval of a file reads a property target from the key of its name (it said: not in the file)
    images = [molecule(n) for n in ("CH3OH", "C2H6", "H2O")]
    for k, atoms in enumerate(images):
        atoms.info["u0"] = -100.0 * k
    ase.io.write(tmp_path / "u0.extxyz", images)
    assert main(["eval", str(tmp_path / "run" / "best.pt"), str(tmp_path / "u0.extxyz"), "--out",
                 str(tmp_path / "m.json")]) == 0
    model, _ = inference.load_trained(tmp_path / "run" / "best.pt")
    preds = inference.predict_structures(model, [atoms_to_entry(a) for a in images], 0)["u0"].numpy()
    assert json.loads((tmp_path / "m.json").read_text())["mol/u0_mae"] == pytest.approx(
        np.abs(preds - [a.info["u0"] for a in images]).mean(), rel=1e-9)
    # predict from the dataset to extxyz keeps the property label beside its prediction (it was dropped)
    assert main(["predict", str(tmp_path / "run" / "best.pt"), data, "--out", str(tmp_path / "u0.xyz")]) == 0
    from jmp_ext.data import LmdbDataset

    for frame, entry in zip(ase.io.read(tmp_path / "u0.xyz", index=":"), LmdbDataset(data)):
        assert frame.info["u0"] == pytest.approx(float(entry["u0"]), rel=1e-12) and "predicted_u0" in frame.info
    # ... and scores the energy of a checkpoint with both on a file without u0 (it said: --skip-invalid)
    raw["run_dir"] = str(tmp_path / "both")
    raw["tasks"][0]["targets"].insert(0, {"name": "energy", "kind": "energy"})
    loop.Trainer(build_config(raw)).save_best({})
    for atoms in images:
        atoms.info.pop("u0")
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0)
    ase.io.write(tmp_path / "energy.extxyz", images)
    with pytest.warns(UserWarning, match=r"energy.extxyz has no 'u0' label"):
        assert main(["eval", str(tmp_path / "both" / "best.pt"), str(tmp_path / "energy.extxyz"), "--out",
                     str(tmp_path / "e.json")]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())) == {"mol/energy_mae", "mol/energy_rmse",
                                                                  "mol/energy_per_atom_mae", "mol/energy_per_atom_rmse"}


def test_calculator_warns_once_that_neighbour_lists_are_truncated(checkpoint):
    """The graphs keep each atom's k nearest neighbours (the quadruplet graph 8 here): benzene's
    atoms have up to 11 within 4 Å, so its energy steps as the kept sets change, and MD drifts
    (a user's Cu MD drifted without a word). Methanol's 5 all fit: no warning. Once for the
    checkpoint in a process: a finite-difference loop with a calculator per displaced structure
    warned at every one."""
    import warnings

    methanol, benzene = molecule("CH3OH"), molecule("C6H6")
    calc = JMPCalculator(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        methanol.calc = calc
        methanol.get_potential_energy()
    # The check follows the calculator to a new kind of structure (it looked at the first only).
    benzene.calc = calc
    with pytest.warns(UserWarning, match=r"keep each atom's nearest neighbours only \(qint 8 of up to 11 within "
                                         r"the cutoffs; a2ee2a: the atom-edge .*graph.max_neighbors >= 42 \(the "
                                         r"quadruplet graph's share grows with it, and GemNet-OC's memory steeply\) or "
                                         r"a smaller graph.cutoff") as caught:
        benzene.get_potential_energy()
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(3):
            benzene.rattle(1e-3)
            benzene.get_potential_energy()
            displaced = benzene.copy()
            displaced.positions[0, 0] += 1e-2
            displaced.calc = JMPCalculator(checkpoint)
            displaced.get_potential_energy()
    # The same network in memory is another model as far as the warning goes (its own once).
    benzene.calc = JMPCalculator(calc.model)
    with pytest.warns(UserWarning, match=r"qint 8 of up to 11"):
        benzene.get_potential_energy()
    # So is a checkpoint written again at the same path (a new run in the same notebook).
    os.utime(checkpoint, ns=(os.stat(checkpoint).st_atime_ns, os.stat(checkpoint).st_mtime_ns + 1))
    benzene.calc = JMPCalculator(checkpoint)
    with pytest.warns(UserWarning, match=r"qint 8 of up to 11"):
        benzene.get_potential_energy()


def test_calculator_of_direct_forces_warns_that_neighbour_lists_are_truncated(tiny_data, tmp_path):
    """The check ran for gradient forces only: the demo's checkpoint (direct forces, k = 8), which
    the README's calculator example uses, gave NEB and vibration users forces that a rigid shift
    changed by 0.06-0.09 eV/Å, with only the not-conservative warning."""
    raw = {"mode": "finetune", "run_dir": str(tmp_path), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 30},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"), "forces": "direct",
                      "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    with pytest.warns(UserWarning, match="direct forces"):
        calc = JMPCalculator(tmp_path / "best.pt")
    benzene = molecule("C6H6")
    benzene.calc = calc
    with pytest.warns(UserWarning, match=r"keep each atom's nearest neighbours only \(qint 8 of up to 11 within .*"
                                         r"the energy and forces step as those sets change"):
        benzene.get_potential_energy()  # (forces would warn of benzene's collinear para atoms too)


def test_calculator_options_and_bad_structures(checkpoint, tiny_data, tmp_path):
    """dtype evaluates in float64 (users cast calc.model.net by hand); an unknown option is an
    error, not silently ignored; the checkpoint is recorded (todict); CUDA on a machine without
    it, an atomic number beyond the periodic table and a NaN position are named."""
    calc = JMPCalculator(checkpoint, dtype="float32")
    assert next(calc.model.net.parameters()).dtype == torch.float32
    assert calc.todict() == {"checkpoint": str(checkpoint), "task": "mol", "device": "cpu", "dtype": "float32"}
    atoms = molecule("CH3OH")
    atoms.calc = calc
    e32 = atoms.get_potential_energy()
    atoms.calc = JMPCalculator(checkpoint, dtype="float64")
    assert atoms.get_potential_energy() == pytest.approx(e32, rel=1e-5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        JMPCalculator(checkpoint, foo=1)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64', got 'fp64'"):
        JMPCalculator(checkpoint, dtype="fp64")
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="device cuda: CUDA is not available on this machine"):
            JMPCalculator(checkpoint, device="cuda")
    from jmp_ext.data.format import DataError

    atoms.numbers[0] = 119
    with pytest.raises(DataError, match="atoms: unknown element with atomic number 119"):
        atoms.get_potential_energy()
    atoms.numbers[0] = 6
    atoms.positions[1, 0] = np.nan
    with pytest.raises(DataError, match="atoms: .*not finite|atoms: .*NaN"):
        atoms.get_potential_energy()
    # Two atoms on one spot, as a diverging relaxation leaves them: said to be the run's doing
    # when only positions changed since a structure the model took...
    atoms.positions[1] = atoms.positions[0] + 0.05
    with pytest.raises(DataError, match=r"atoms 0 and 1 are 0.0866 Å apart.* \(after a structure that was fine, "
                                        r"with only its positions or cell changed since: in a relaxation, MD or NPT, "
                                        r"the run diverged"):
        atoms.get_potential_energy()
    # A cell relaxation or NPT changes the cell at every step: a collapse there is the run's too.
    box = molecule("CH4", cell=[6.0, 6.0, 6.0], pbc=True)
    box.calc = JMPCalculator(checkpoint)
    box.get_potential_energy()
    box.set_cell(box.cell * 0.02, scale_atoms=True)
    with pytest.raises(DataError, match=r"\(after a structure that was fine, .* the run diverged"):
        box.get_potential_energy()
    # ... not when the caller built them so.
    fresh = atoms.copy()
    fresh.calc = JMPCalculator(checkpoint)
    with pytest.raises(DataError, match=r"atoms 0 and 1 are 0.0866 Å apart") as raised:
        fresh.get_potential_energy()
    assert "diverged" not in str(raised.value)


def test_calculator_of_a_model_in_memory_is_the_checkpoints(checkpoint):
    """A TaskModel in memory (load_trained's, a Trainer's) serves as the checkpoint it came from,
    where it is; moving or casting it, or a model still in training mode, is refused rather than
    done to the caller's model behind their back."""
    model, _ = inference.load_trained(checkpoint)
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    atoms.calc = JMPCalculator(checkpoint)
    expected = atoms.get_potential_energy(), atoms.get_forces()
    calc = JMPCalculator(model)
    assert calc.todict() == {"checkpoint": "the model", "task": "mol", "device": "cpu", "dtype": "float64"}
    atoms.calc = calc
    assert atoms.get_potential_energy() == expected[0]
    np.testing.assert_array_equal(atoms.get_forces(), expected[1])
    with pytest.raises(ValueError, match=r"move a model yourself \(model.to\(device\)"):
        JMPCalculator(model, device="cpu")
    with pytest.raises(ValueError, match="move a model yourself"):
        JMPCalculator(model, dtype="float32")
    assert next(model.net.parameters()).dtype == torch.float64
    with pytest.raises(TrainError, match=r"task 'bulk' is not a task of the checkpoint \(tasks: \['mol'\]\)"):
        JMPCalculator(model, task="bulk")
    model.train()  # (edge dropout and the like would apply)
    with pytest.raises(ValueError, match=r"the model is in training mode: call model.eval\(\)"):
        JMPCalculator(model)
    with pytest.raises(ValueError, match=r"the model is in training mode: call model.eval\(\)"):
        atoms.positions[0, 0] += 0.01
        atoms.get_potential_energy()
    model.eval().net.train()  # (the network alone back in training)
    with pytest.raises(ValueError, match=r"the model is in training mode: call model.eval\(\)"):
        atoms.get_potential_energy()


@pytest.mark.filterwarnings("ignore:the model's graphs keep each atom's nearest neighbours only")  # (k = 8)
def test_atoms_far_outside_the_cell_keep_float32_precision(stress_checkpoint, checkpoint):
    """ASE's MD does not wrap atoms back into the cell: 300 cells away, float32 positions lost
    ~2 orders of magnitude of precision in the forces. A periodic model evaluates the same
    structure wrapped; a molecule model (non-periodic graphs), and a molecule without pbc, at
    its centroid (1e4 Å from the origin, float32 forces of a trained model moved by 2e-2 eV/Å)."""
    import dataclasses
    import warnings

    atoms = molecule("CH3OH")
    atoms.cell, atoms.pbc = np.eye(3) * 6.0, True
    atoms.center()
    atoms.rattle(0.05, seed=0)
    far = atoms.copy()
    far.positions += 300 * np.array([6.0, -6.0, 6.0])
    for a in (atoms, far):
        a.calc = JMPCalculator(stress_checkpoint, dtype="float32")
    assert far.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), rel=1e-7, abs=1e-7)
    np.testing.assert_allclose(far.get_forces(), atoms.get_forces(), rtol=0, atol=1e-7)
    # A slab's open axis may have no lattice vector at all (ASE's zeros): a singular cell to solve.
    slab = atoms.copy()
    slab.pbc, slab.cell[2] = [True, True, False], 0.0
    far_slab = slab.copy()
    far_slab.positions += 300 * slab.cell[0] - 200 * slab.cell[1]
    for a in (slab, far_slab):
        a.calc = JMPCalculator(stress_checkpoint, dtype="float32")
    assert far_slab.get_potential_energy() == pytest.approx(slab.get_potential_energy(), rel=1e-7, abs=1e-7)
    # A molecule across the box's face, on non-periodic graphs (a molecule preset's): wrapped, it
    # would be cut in two.
    across = atoms.copy()
    across.positions[:, 0] += 6.0 - across.positions[0, 0] - 0.3  # (its first atom 0.3 Å inside the face)
    cluster = across.copy()
    cluster.pbc = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (periodic structures on a molecule model: said elsewhere)
        for a in (across, cluster):
            a.calc = JMPCalculator(checkpoint)
            a.calc.model.graph_configs[0] = dataclasses.replace(a.calc.model.graph_configs[0], pbc=False)
        assert across.get_potential_energy() == cluster.get_potential_energy()
    drifted = cluster.copy()
    drifted.positions += [1e4, -7e3, 3e3]
    for a in (cluster, drifted):
        a.calc = JMPCalculator(checkpoint, dtype="float32")
    assert drifted.get_potential_energy() == pytest.approx(cluster.get_potential_energy(), rel=1e-7, abs=1e-7)
    np.testing.assert_allclose(drifted.get_forces(), cluster.get_forces(), rtol=0, atol=1e-6)


def test_periodic_structures_on_a_molecule_model_are_pointed_out(tiny_data, tmp_path):
    """A checkpoint trained with a molecule graph preset (non-periodic) gave a bulk crystal the
    same energy with and without pbc, without a word."""
    from ase.build import bulk

    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "threads": 1,
           "graph": {"preset": "spice", "cutoff": 4.0, "max_neighbors": 30},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"), "forces": "gradient",
                      "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "precision": "fp64", "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    crystal = bulk("C", "diamond", a=3.57)
    crystal.calc = JMPCalculator(tmp_path / "run" / "best.pt")
    with pytest.warns(UserWarning, match=r"task 'mol' was trained on non-periodic graphs: these structures' periodic "
                                         r"boundary conditions are ignored"):
        crystal.get_potential_energy()
    # eval too (it said nothing), once for the dataset rather than per batch
    with pytest.warns(UserWarning) as caught:
        assert main(["eval", str(tmp_path / "run" / "best.pt"), str(tiny_data / "box" / "val"), "--batch-size", "1"]) == 0
    assert [str(w.message) for w in caught if "non-periodic" in str(w.message)] == [
        "task 'mol' was trained on non-periodic graphs: these structures' periodic boundary conditions are ignored "
        "(each is seen as an isolated cluster)"]


def test_splits_of_oc20_s2ef_energies_must_agree_on_their_reference(checkpoint, tmp_path):
    """A dataset converted with --subtract-reference trained with one converted without as its
    val split (total energies, hundreds of eV apart), without a word; eval of an S2EF file
    scored its total energies, and advised a convert option it does not have."""
    from ase.calculators.emt import EMT

    from jmp_ext.data.convert import convert

    (tmp_path / "s2ef").mkdir()
    images = [molecule(n) for n in ("CH3OH", "C2H6", "CH3CHO", "H2O")]
    for atoms in images:
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    ase.io.write(tmp_path / "s2ef" / "0.extxyz", images)
    (tmp_path / "s2ef" / "0.txt").write_text("".join(f"random7,frame{k},-{100 + k}.5\n" for k in range(4)))
    convert(tmp_path / "s2ef", tmp_path / "referenced", subtract_reference=True)
    with pytest.warns(UserWarning, match="total DFT energies"):
        convert(tmp_path / "s2ef", tmp_path / "total")
    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "oc", "train": str(tmp_path / "referenced"), "val": str(tmp_path / "total"),
                      "targets": [{"name": "energy", "kind": "energy"}]}],
           "model": {"backbone": "tiny"}, "loop": {"fit_scale_factors": 0, "progress": False}}
    with pytest.raises(TrainError, match=r"the val dataset .*total has its OC20 frame logs' reference energies kept, "
                                         r"the train dataset .*referenced subtracted: convert both the same way"):
        loop.Trainer(build_config(raw))
    model, _ = inference.load_trained(checkpoint)
    predicted = inference.predict_structures(model, [atoms_to_entry(a) for a in images], 0)["energy"].numpy()
    total = np.array([atoms.get_potential_energy() for atoms in images])
    with pytest.warns(UserWarning, match=r"0\.extxyz: the energies scored are its total DFT energies, though its OC20 "
                                         r"frame log lists reference energies: .* is evaluated with --subtract-refer"):
        metrics = inference.evaluate_checkpoint(checkpoint, str(tmp_path / "s2ef" / "0.extxyz"), None, None, 2, "cpu")
    assert metrics["mol/energy_mae"] == pytest.approx(np.abs(predicted - total).mean(), rel=1e-9)
    assert main(["eval", str(checkpoint), str(tmp_path / "s2ef" / "0.extxyz"), "--subtract-reference", "--out",
                 str(tmp_path / "m.json")]) == 0
    referenced = total + 100.5 + np.arange(4)
    assert json.loads((tmp_path / "m.json").read_text())["mol/energy_mae"] == pytest.approx(
        np.abs(predicted - referenced).mean(), rel=1e-9)


@pytest.mark.filterwarnings("ignore:tasks.0.val is the training split itself")  # (one small dataset serves both)
def test_a_property_is_scored_only_in_the_unit_it_was_trained_in(tmp_path, capsys):
    """A property converted to eV (--property gap:Hartree) and the same stored as is (Hartree)
    were compared as if in one unit: between the splits of a task, and by eval of the source
    file, which converts properties as stored."""
    from jmp_ext.data.__main__ import main as data_main

    rng = np.random.default_rng(0)
    images = [molecule(n) for n in ("H2O", "NH3", "CH4", "CO2", "HCN", "H2CO", "CH3OH", "C2H4")]
    for atoms in images:
        atoms.info["gap"] = 0.2 + 0.1 * rng.random()  # (Hartree)
    ase.io.write(tmp_path / "mol.extxyz", images)
    assert data_main(["convert", str(tmp_path / "mol.extxyz"), str(tmp_path / "ev"), "--property", "gap:Hartree"]) == 0
    assert data_main(["convert", str(tmp_path / "mol.extxyz"), str(tmp_path / "raw"), "--property", "gap"]) == 0
    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "mol", "train": str(tmp_path / "ev"), "val": str(tmp_path / "raw"),
                      "targets": [{"name": "gap", "kind": "scalar"}]}],
           "model": {"backbone": "tiny"}, "data": {"batch_size": 4},
           "loop": {"max_steps": 1, "val_every": 1, "fit_scale_factors": 0, "progress": False}}
    with pytest.raises(TrainError, match=r"target 'gap' is in '' \(as stored, no unit\) in the val dataset .*raw, "
                                         r"but in 'eV' in the train dataset: convert every split the same way"):
        loop.Trainer(build_config(raw))
    raw["tasks"][0]["val"] = str(tmp_path / "ev")
    loop.Trainer(build_config(raw)).train()
    _, config = inference.load_trained(tmp_path / "run" / "best.pt")
    assert config.tasks[0].targets[0].unit == "eV"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["tasks"][0]["targets"][0]["unit"] == "eV"
    capsys.readouterr()
    best = str(tmp_path / "run" / "best.pt")
    assert main(["eval", best, str(tmp_path / "mol.extxyz")]) == 2
    assert re.search(r"target 'gap' of the checkpoint was trained in 'eV', but .*mol.extxyz has it in '' \(as stored, "
                     r"no unit\): the metrics would compare two units; convert .*mol.extxyz with its unit: python -m "
                     r"jmp_ext.data convert .*mol.extxyz OUT_DIR --property gap:UNIT", capsys.readouterr().err)
    assert main(["eval", best, str(tmp_path / "raw")]) == 2
    assert "convert its source as the training data was" in capsys.readouterr().err
    assert main(["eval", best, str(tmp_path / "ev")]) == 0
    assert "mol/gap_mae" in json.loads(capsys.readouterr().out)
    # The conversion that leaves out a structure eval cannot take converts the checkpoint's labels.
    lone = Atoms("H", positions=[[0, 0, 0]])
    lone.info["gap"] = 0.3
    ase.io.write(tmp_path / "with_lone.extxyz", [*images, lone])
    assert main(["eval", best, str(tmp_path / "with_lone.extxyz")]) == 2
    assert (f"`python -m jmp_ext.data convert {tmp_path / 'with_lone.extxyz'} OUT_DIR --energy-key none --forces-key "
            "none --stress-key none --property gap:UNIT --skip-invalid`") in capsys.readouterr().err
    # A config that names the unit is held to it.
    raw["tasks"][0]["targets"][0]["unit"] = ""
    with pytest.raises(TrainError, match=r"target 'gap' is in 'eV' in the train dataset .*ev, but in '' \(as stored, "
                                         r"no unit\) in the config \(tasks.0.targets.0.unit\): leave the unit out"):
        loop.Trainer(build_config(raw, ["overwrite=true"]))


def test_the_calculator_and_eval_keep_freed_memory_on_the_cpu(checkpoint, tiny_data, monkeypatch):
    """As the trainer does: a 108-atom cell's calls were 20-35% slower with glibc handing its
    large freed tensors back to the kernel every call."""
    from jmp_ext import cpu

    calls = []
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: calls.append(1) or True)
    JMPCalculator(checkpoint)
    assert calls == [1]
    assert main(["eval", str(checkpoint), str(tiny_data / "mol" / "test")]) == 0
    assert calls == [1, 1]


def test_a_half_precision_run_checkpoint_still_predicts(checkpoint, tmp_path):
    """A best.pt shrunk to bfloat16 kept its normalisation buffers in bfloat16, and predicting
    failed inside torch ("index_add_(): self (Double) and source (BFloat16)")."""
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "half.pt")
    with pytest.warns(UserWarning, match=r"half.pt: weights in bfloat16: loaded into a float32 or float64 network"):
        model, _ = inference.load_trained(tmp_path / "half.pt")
    assert model.norm_linref.dtype == torch.float64
    preds = inference.predict_structures(model, [molecule("CH3OH")])
    assert torch.isfinite(preds["energy"]).all() and torch.isfinite(preds["forces"]).all()
