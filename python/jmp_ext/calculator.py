"""ASE Calculator around a trained jmp_ext checkpoint (best.pt / last.pt of a run) or a TaskModel in memory.

    from jmp_ext.calculator import JMPCalculator
    atoms.calc = JMPCalculator("runs/md/best.pt")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Energies in eV, forces in eV/Å, stress in eV/Å^3 (ASE's sign and Voigt order), as trained.
atoms.get_potential_energies() gives each atom's term of the energy (GemNet-OC's energy is a sum
over atoms, each term with its element's reference energy added): they sum to the energy, but
like any model's per-atom energies they are a partition, not an observable.

Forces are -dE/dpos only from a checkpoint trained with `forces: gradient`. A direct force head
(`forces: direct`, JMP's pretraining and the default) predicts forces separately from the energy:
they are not conservative, so MD drifts in energy and a relaxation's forces and energy can
disagree. Fine-tune with `forces: gradient` for MD and relaxations; the calculator warns when
given a direct-force checkpoint.

The graphs keep each atom's k nearest neighbours within the cutoff (JMP: 30 within 12 Å), so in
a dense solid the energy steps (meV to tens of meV) as the neighbour set changes: all four
graphs must hold every neighbour within the cutoff, and the quadruplet graph keeps int(8k/30),
so graph.max_neighbors must be at least 3.75x the neighbour count. The calculator warns
(once) when a structure's graphs leave neighbours out (jmp_ext.graphs.truncated_neighbors).
The energy also steps (1 to 30 meV in our fine-tunes) when a pair of atoms crosses the graph
cutoff below 12 Å: JMP's radial basis goes to zero at absolute_rbf_cutoff (12 Å), not at the
graph's cutoff. A smooth energy for NVE needs graph.cutoff = 12 Å, or a fine-tune with
model.backbone_overrides.absolute_rbf_cutoff equal to graph.cutoff (which changes what the
pre-trained radial features mean).

Near-collinear atoms are a weak spot of JMP's GemNet-OC (kept for parity with its checkpoints):
its quadruplet basis (Legendre polynomials of the dihedral, with no sin factor that would vanish
there) is discontinuous where three atoms line up, as on every row of a perfect lattice, and the
forces grow as 1/distance from the line. Measured on 3x3x3 fcc Cu with a fine-tuned checkpoint,
the largest force was 9293 / 922 / 32 / 2.9 / 0.38 eV/Å after atoms.rattle(stdev) of 0 / 1e-5 /
1e-4 / 1e-3 / 1e-2 Å. Rattle ideal structures before relaxing them, and expect a relaxation that
pulls atoms back onto lattice rows to converge poorly; the calculator warns (once) when a force
exceeds MAX_PLAUSIBLE_FORCE. Exactly on a line the forces need not be large to be wrong (in a
2x2x1 supercell of a rattled 8-atom alloy cell, 6e-4 eV/Å off -dE/dx in float64 and 9.8 eV/Å in
float32): atoms.repeat puts the copies of each atom on lines whatever rattle the repeated cell
had, so rattle after repeating; finite-displacement phonons of a perfect supercell are out of
reach. The calculator warns (once) when a structure has such lines
(jmp_ext.graphs.collinear_quadruplets, checked at every call with forces or stress).
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from jmp_ext.data.convert import atoms_to_entry, is_number
from jmp_ext.data.format import DataError
from jmp_ext.train.tasks import TaskModel
from jmp_ext.warn import warn_user


# eV/Å: far above any force of a relaxation or MD, and far below the ~1e3-1e4 eV/Å that
# near-collinear atoms give (see the module doc).
MAX_PLAUSIBLE_FORCE = 100.0

# The tasks whose truncated neighbour lists a calculator warned of, per checkpoint file (as
# written: a new best.pt at the same path is another) or model in memory: once in a process (a
# finite-difference loop or a screening script makes a calculator per structure).
_TRUNCATION_WARNED_FILES: dict[tuple[str, int, int], set[int]] = {}  # (path, mtime in ns, size) -> tasks
_TRUNCATION_WARNED_MODELS: weakref.WeakKeyDictionary[TaskModel, set[int]] = weakref.WeakKeyDictionary()


class JMPCalculator(Calculator):
    """Energy, forces (and stress when the model predicts it) of a trained checkpoint.

    checkpoint: a run's best.pt or last.pt (EMA weights when the run had an EMA), or a TaskModel
        in memory (load_trained's, or a Trainer's model: its trained weights, not the EMA's),
        used as it is: on its device, in its dtype, in eval mode.
    task: which task's heads to use (needed for a pretraining checkpoint, which has several).
    device: "cpu", "cuda", ... to load the checkpoint on (None: the CPU; on the CPU, load_trained
        makes the process keep freed memory)
    dtype: "float32" or "float64" to evaluate the network in (None: the precision it was trained
        in); float64 for finite-difference checks or long NVE runs. float32 rounds each
        position to its magnitude, and ASE's MD does not wrap atoms back into the cell: the
        calculator evaluates periodic structures with their atoms wrapped into the cell (the
        same structure; a slab's atoms at their mean along its open axis), so one that drifted
        300 cells away loses no precision, and clusters at their centroid."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, checkpoint: str | Path | TaskModel, task: str | None = None, device: str | None = None,
                 dtype: str | None = None):
        from jmp_ext.train.inference import load_trained, task_index

        super().__init__()
        if isinstance(checkpoint, TaskModel):
            # (moving or casting it here would change the caller's model under their feet)
            if device is not None or dtype is not None:
                raise ValueError("device= and dtype= are for loading a checkpoint: move a model yourself "
                                 "(model.to(device), model.net.to(dtype)) before giving it to the calculator")
            self.model, source = checkpoint, "the model"
            self._check_eval_mode()
        else:
            self.model, _ = load_trained(checkpoint, "cpu" if device is None else device, dtype)
            source = str(checkpoint)
        self.task = task_index(self.model.tasks, task, "task=")
        task_config = self.model.tasks[self.task]
        parameter = next(self.model.net.parameters())
        # What trajectories and ASE databases record of the calculator (Calculator.todict).
        self.parameters.update(checkpoint=source, task=task_config.name, device=str(parameter.device),
                               dtype=str(parameter.dtype).removeprefix("torch."))
        self._warned_force = False
        self._warned_collinear = False
        self._warned_charge = False
        self._calculated = False  # (a structure went through: later position errors are the run's)
        kinds = {t.kind for t in task_config.targets}
        if "energy" not in kinds:
            predicts = ", ".join(f"{t.name} ({t.kind})" for t in task_config.targets)
            raise ValueError(f"{source} predicts {predicts} (task {task_config.name!r}), not an energy "
                             "(a target of kind energy), which an ASE calculator needs; its predictions for "
                             "structures: `python -m jmp_ext.train predict`, or jmp_ext.train.inference."
                             "predict_structures from Python")
        # ASE and its optimisers read this to decide what to ask for.
        self.implemented_properties = [p for p in self.implemented_properties if p not in {"forces", "stress"} - kinds]
        # Truncated neighbour lists are checked on each new kind of structure (elements, cell
        # or pbc; tags do not change the count), until one warning is given for the model and
        # task in this process (a finite-difference loop or a screening script makes a
        # calculator per structure): direct forces step with the kept sets too, and they decide
        # a NEB's or a relaxation's path.
        if isinstance(checkpoint, TaskModel):
            self._truncation_warned = _TRUNCATION_WARNED_MODELS.setdefault(self.model, set())
        else:  # (a run that writes the file again, in the same process, warns anew)
            file = Path(checkpoint).resolve()
            stat = file.stat()
            version = (str(file), stat.st_mtime_ns, stat.st_size)
            self._truncation_warned = _TRUNCATION_WARNED_FILES.setdefault(version, set())
        if "forces" in kinds and not task_config.gradient_forces:
            warn_user(f"{source} predicts direct forces (forces: direct), which are not the "
                      "gradient of its energy: MD will not conserve energy. Fine-tune with "
                      "forces: gradient for MD and relaxations")

    def _check_eval_mode(self) -> None:
        # (edge dropout and other training-only behaviour would apply)
        if any(module.training for module in (self.model, self.model.net)):
            raise ValueError("the model is in training mode: call model.eval() before the calculator uses it")

    def check_state(self, atoms, tol=1e-15):
        # ASE compares positions, numbers, cell, pbc...; the tags choose the quadruplet graph too.
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and not np.array_equal(self.atoms.get_tags(), atoms.get_tags()):
            changes.append("tags")
        return changes

    def _warn_if_truncated(self, entry: dict) -> bool:
        """Warns when the graphs of `entry` leave neighbours within the cutoffs out; returns
        whether it did."""
        from jmp_ext.data import collate
        from jmp_ext.graphs import K_PROPORTIONS, truncated_neighbors

        config = self.model.graph_configs[self.task]
        truncated = truncated_neighbors(collate([entry], dtype=torch.float64), config)
        if truncated:
            # The base k each graph needs: it keeps k * K_PROPORTIONS[name] // 30 neighbours.
            needed = max(-(-count * 30 // K_PROPORTIONS[name]) for name, (count, _) in truncated.items())
            kept = ", ".join(f"{name} {k} of up to {count}" for name, (count, k) in truncated.items())
            natoms = len(entry["atomic_numbers"])
            base = int(config.neighbors_per_structure(torch.tensor([natoms]))["main"][0])
            advice = (f"For smooth energies fine-tune with graph.max_neighbors >= {needed} (the quadruplet graph's "
                      f"share grows with it, and GemNet-OC's memory steeply) or a smaller graph.cutoff"
                      if base == config.max_neighbors
                      else f"A structure of {natoms} atoms keeps at most {base} neighbours in these graphs (the "
                           f"MatBench / QMOF presets' rule for large structures, as JMP's), whatever "
                           f"graph.max_neighbors says")
            warn_user(f"the model's graphs keep each atom's nearest neighbours only ({kept} within the "
                      f"cutoffs; a2ee2a: the atom-edge interaction graph, qint: the quadruplet graph): the "
                      f"energy and forces step as those sets change, so MD drifts and relaxations may oscillate, "
                      f"and they depend on the order of the atoms and, where distances tie, on a rigid shift. "
                      f"{advice}; see jmp_ext.calculator")
        return bool(truncated)

    def _warn_if_collinear(self, graphs: dict) -> None:
        """Warns (once) when atoms of a structure lie on the straight lines where the dihedral
        basis is singular (graphs.collinear_quadruplets of its build_graphs `graphs`): its forces
        there are not -dE/dx, at any size, so the force warning alone would miss them."""
        from jmp_ext.graphs import collinear_quadruplets

        count = collinear_quadruplets(graphs)
        if count:
            self._warned_collinear = True
            warn_user(f"{count} of the {graphs['quad']['trip_in_to_quad'].numel()} quadruplets of this structure "
                      "have three distinct atoms on a straight line, where GemNet-OC's dihedral basis is singular and "
                      "the forces are unreliable: an ideal lattice's rows, a linear molecule, and the copies of an "
                      "atom that atoms.repeat makes, whatever rattle the repeated cell had (phonopy's finite "
                      "displacements of a perfect supercell too). Rattle a crystal itself (atoms.rattle(1e-2) after "
                      "repeat): see jmp_ext.calculator's doc")

    def _check_implemented(self, properties) -> None:
        # (ASE's own message, "stress property not implemented", did not say what would give it)
        for name in ("forces", "stress"):
            if name in properties and name not in self.implemented_properties:
                how = "forces: gradient and a stress target" if name == "stress" else "a forces target"
                raise PropertyNotImplementedError(f"{name} property not implemented: this checkpoint was not trained "
                                                  f"with a {name} target (fine-tune with {how})")

    def get_property(self, name, atoms=None, allow_calculation=True):
        self._check_implemented([name])
        return super().get_property(name, atoms, allow_calculation)

    def _warn_if_charged(self) -> None:
        """Warns (once) of a structure with a net charge (info's charge or total_charge, as
        SPICE and OMol25 record it, or initial charges that do not sum to zero): an input the
        model does not take."""
        charges = {f"atoms.info[{key!r}]": self.atoms.info[key] for key in ("charge", "total_charge")
                   if is_number(self.atoms.info.get(key))}
        charges["the initial charges' sum"] = float(self.atoms.get_initial_charges().sum())
        # (partial charges sum to the net charge, an integer, only up to their rounding)
        where, charge = next(((where, q) for where, q in charges.items() if not math.isfinite(q) or round(q) != 0),
                             (None, 0))
        if where is not None:
            self._warned_charge = True
            warn_user(f"this structure has a net charge of {charge:+g} ({where}), which the model does not take "
                      "(GemNet-OC sees elements and positions only): it is evaluated as if neutral")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from jmp_ext.train.inference import structures_batch

        self._check_implemented(properties)  # (also when called directly, as calculate(atoms, ["stress"]))
        self._check_eval_mode()  # (a model in memory that its owner put back into training)
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.any())  # (a non-periodic structure's stress would be its box's)
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs periodic boundary conditions (pbc on some axis): a "
                                              "non-periodic structure's would depend on the box around it")
        new_structure = bool(set(system_changes) & {"numbers", "cell", "pbc"})  # (not only moved atoms)
        if len(self.atoms) == 0:  # (a sum over no atoms, as ASE's calculators give it: a loop over fragments)
            self.results = {"energy": 0.0, "free_energy": 0.0, "energies": np.zeros(0), "forces": np.zeros((0, 3))}
            if "stress" in self.implemented_properties and periodic and abs(self.atoms.cell.volume) > 0:
                self.results["stress"] = np.zeros(6)
            return
        try:
            entry = atoms_to_entry(self.atoms)
        except DataError as e:
            # Only positions or the cell changed since a structure the model took: in a
            # relaxation, MD or NPT, its forces and stress moved them there (a bad element is
            # the caller's, said as it is).
            if not self._calculated or set(system_changes) & {"numbers", "pbc"}:
                raise
            raise DataError(f"{e} (after a structure that was fine, with only its positions or cell changed since: in "
                            "a relaxation, MD or NPT, the run diverged, the model's forces or stress moved the atoms "
                            "there)") from e
        if self.model.graph_configs[self.task].pbc and entry["pbc"].any():
            # The same structure with the atoms outside the cell brought back by whole lattice
            # vectors on periodic axes, and shifted to their mean along open ones (a slab's
            # normal, where any rigid shift is the same structure), in float64: MD does not wrap
            # atoms, and float32 rounds a position to its magnitude. (Not for non-periodic
            # graphs, which see the atoms as given, a cluster.)
            # (ASE completes a cell without vectors on its open axes, with unit normals)
            cell = self.atoms.cell.complete()
            scaled = cell.scaled_positions(self.atoms.positions)
            shift = np.where(self.atoms.pbc, np.floor(scaled), scaled.mean(axis=0))
            if shift.any():
                entry["pos"] = torch.as_tensor(self.atoms.positions - shift @ cell.array, dtype=entry["pos"].dtype)
        else:
            # A cluster (no periodic axis, or non-periodic graphs) at its centroid, which moves
            # nothing else: float32 rounds a position to its magnitude, and a molecule drifting
            # in MD would lose precision with its distance from the origin.
            entry["pos"] = entry["pos"] - entry["pos"].mean(dim=0)
        if not self._warned_charge:
            self._warn_if_charged()
        # (not on every step: the counts change little along a trajectory)
        if new_structure and self.task not in self._truncation_warned and self._warn_if_truncated(entry):
            self._truncation_warned.add(self.task)
        # An energy alone (Monte Carlo, an energy scan) skips the gradient forces and stress.
        derivatives = not set(properties) <= {"energy", "free_energy", "energies"}
        batch = structures_batch(self.model, [entry], self.task)
        with torch.no_grad():  # (gradient forces re-enable autograd inside the network)
            graphs = self.model.graphs(batch)
            # Every call until it warns: a structure with lines may differ from one without by
            # a rattle of the same cell.
            if derivatives and not self._warned_collinear:
                self._warn_if_collinear(graphs)
            preds = self.model(batch, derivatives, graphs)
        self._calculated = True
        energy = float(preds["energy"][0])
        self.results = {"energy": energy, "free_energy": energy}
        if "energies" in preds:
            self.results["energies"] = preds["energies"].detach().double().cpu().numpy()
        if "forces" in preds:
            self.results["forces"] = preds["forces"].detach().double().cpu().numpy()
            largest = float(np.linalg.norm(self.results["forces"], axis=1).max())
            if largest > MAX_PLAUSIBLE_FORCE and not self._warned_force:
                self._warned_force = True
                warn_user(f"a force of {largest:.3g} eV/Å: atoms on (nearly) straight lines, such as "
                          "an ideal lattice's rows, make GemNet-OC's dihedral basis discontinuous; "
                          "rattle the structure (atoms.rattle(1e-2)): see jmp_ext.calculator's doc")
        if "stress" in preds and periodic and not preds["stress"].isnan().any():
            s = preds["stress"][0].detach().double().cpu().numpy()
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        elif "stress" in properties:
            raise PropertyNotImplementedError("stress needs a cell with nonzero volume")
