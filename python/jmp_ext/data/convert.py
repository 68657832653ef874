"""Converters into the jmp_ext format from what users have: extxyz (or any file ase.io reads),
ASE databases, and OC20/OC22/JMP-style LMDBs of pickled torch_geometric Data objects.

Every source becomes a stream of (where, entry) pairs; convert() validates and writes them
atomically, stopping at the first bad entry with its file and index, or skipping bad entries
and reporting them (skip_invalid).
"""

from __future__ import annotations

import importlib
import io
import itertools
import pickle
import re
import reprlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.data import chemical_symbols
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixCartesian
from ase.stress import voigt_6_to_full_3x3_stress
from tqdm import tqdm

from jmp_ext.data import format as fmt
from jmp_ext.data.writer import DatasetWriter
from jmp_ext.warn import warn_user

ENERGY_UNITS = {"eV": 1.0, "meV": 1e-3, "Hartree": units.Hartree, "Ry": units.Ry,
                "kcal/mol": units.kcal / units.mol, "kJ/mol": units.kJ / units.mol}
LENGTH_UNITS = {"Å": 1.0, "A": 1.0, "Bohr": units.Bohr, "nm": 10.0}
LABELS = ("energy", "forces", "stress")
# Keys holding a virial W (energy; W = -V stress): libAtoms/GAP's (dft_virial), MACE's (REF_virials;
# virials before); these names in any case (Virial, DFT_virial) too, as a key given with --stress-key
# (otherwise stored as a stress: sign flipped, times the volume). Only these: a stress under another
# name with "virial" in it (virial_stress) is a stress.
VIRIAL_KEYS = ("REF_virial", "REF_virials", "virial", "virials", "dft_virial")
_VIRIAL_NAMES = {key.lower() for key in VIRIAL_KEYS}
# The usual source keys, in order: MACE's REF_*, ASE's, OC20's force, libAtoms/GAP's dft_*.
DEFAULT_KEYS = {"energy": ("REF_energy", "energy", "dft_energy"),
                "forces": ("REF_forces", "forces", "force", "dft_force", "dft_forces"),
                "stress": ("REF_stress", "stress", *VIRIAL_KEYS)}


@dataclass(kw_only=True)
class KeyMap:
    """Where labels are found in the source and what units they are in.

    energy, forces, stress: the source's key for each label; None tries the usual names in
        order (DEFAULT_KEYS; energy: REF_energy, energy, dft_energy, and y in pickled OC20/JMP
        LMDBs; forces: REF_forces, forces, force, dft_force, dft_forces; stress: REF_stress,
        stress, then the virials of VIRIAL_KEYS) in atoms.info / atoms.arrays / the attached
        calculator (ASE) or the Data object (LMDB). A stress key of VIRIAL_KEYS (in any case)
        holds a virial W (energy), stored as the stress -W / V. The first entry holding a label
        fixes where it is read from, and every later entry must hold it there. Give a key explicitly to pick,
        e.g., free_energy or y_relaxed; an entry without it is then invalid. "none" drops the
        label, e.g. a stress only some frames carry: every entry must hold the same labels.
    properties: extra per-structure labels, {stored name: source key}.
    property_units: energy units of properties, {stored name: unit}, converted to eV (QM9's
        U_0 etc. in Hartree); the others are stored as they are, with the unit "".
    energy_unit, length_unit: units of the source's energy, forces, stress and structure
        (converted to eV and Å).
    """

    energy: str | None = None
    forces: str | None = None
    stress: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    property_units: dict[str, str] = field(default_factory=dict)
    energy_unit: str = "eV"
    length_unit: str = "Å"

    def __post_init__(self):
        self.length_unit = "Å" if self.length_unit == "A" else self.length_unit  # (one name, as recorded)
        if self.energy_unit not in ENERGY_UNITS:
            raise ValueError(f"energy_unit {self.energy_unit!r} is not one of {list(ENERGY_UNITS)}")
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"length_unit {self.length_unit!r} is not one of {list(LENGTH_UNITS)}")
        from jmp_ext.models.heads import head_name_problem  # (a label is trained under its name)

        for name in self.properties:
            # (and extxyz's syntax: predict writes predicted_NAME, which these would break)
            problem = head_name_problem(name) or ("it may not hold whitespace, '=', ':' or '\"' (extxyz's syntax)"
                                                  if any(c.isspace() or c in '=:"' for c in name) else None)
            if problem:
                raise ValueError(f"property {name!r}: {problem}")
        for name, unit in self.property_units.items():
            if name not in self.properties:
                raise ValueError(f"property_units names {name!r}, which is not a property")
            if unit not in ENERGY_UNITS:
                raise ValueError(f"property {name!r}: unit {unit!r} is not an energy unit ({list(ENERGY_UNITS)})")

    def drops(self, label: str) -> bool:
        chosen = getattr(self, label)
        return chosen is not None and chosen.lower() == "none"

    def candidates(self, label: str, pickled: bool = False) -> tuple[str, ...]:
        """The source keys tried for `label`, in order. y is the energy in pickled OC20/JMP
        LMDBs only: in an extxyz or ASE db it is another target (MatBench's), which was stored
        as a total energy."""
        chosen = getattr(self, label)
        if chosen is not None:
            return (chosen,)
        return DEFAULT_KEYS[label] + (("y",) if pickled and label == "energy" else ())

    def to_ev_angstrom(self, entry: dict) -> dict:
        e, length = ENERGY_UNITS[self.energy_unit], LENGTH_UNITS[self.length_unit]
        factors = {"pos": length, "cell": length, "energy": e, "forces": e / length,
                   "stress": e / length**3,
                   **{name: ENERGY_UNITS[unit] for name, unit in self.property_units.items()}}
        return {k: _numbers(k, v) * factors[k] if k in factors else v for k, v in entry.items()}


def _numbers(name: str, value) -> np.ndarray:
    try:
        too_many = isinstance(value, (list, tuple)) and _expanded_size(value, {}) > _MAX_LIST_VALUES
    except RecursionError:  # (a list that holds itself, or nested thousands deep)
        too_many = True
    if too_many:
        raise fmt.DataError(f"{name} is a nested list of more than {_MAX_LIST_VALUES} values, or holds itself")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise fmt.DataError(f"{name} is not numeric: {reprlib.repr(value)}")
    return array


# A pickle can nest one shared list in itself ten times over (245 bytes, 10^10 values when
# numpy or a message expands it); no field of a structure is a list of more values than this.
_MAX_LIST_VALUES = 10**8


def _expanded_size(value, sizes: dict[int, int]) -> int:
    """The number of values a nested list or tuple holds once expanded, each shared one counted
    (not walked) again: sizes memoises by id."""
    if not isinstance(value, (list, tuple)):
        return 1
    if id(value) not in sizes:
        sizes[id(value)] = sum(_expanded_size(v, sizes) for v in value)
    return sizes[id(value)]


class SourceError(fmt.DataError):
    """A problem of a whole source (its layout, its recorded units), not of one entry: no
    --skip-invalid skips it."""


class UnreadableSource(fmt.DataError):
    """A source file that ase.io or ase.db cannot read, whole or from some structure on: not an
    entry to skip."""


class MissingProperty(fmt.DataError):
    """An entry without the key of a property (`name`, as stored)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass
class ConvertReport:
    """What a conversion wrote and skipped (entry descriptions with the reason)."""

    written: int = 0
    skipped: list[str] = field(default_factory=list)
    # stored label -> where every entry's label was read, e.g. "info['REF_energy']" (ASE) or
    # "y" (LMDB); fixed by the first entry that has the label
    labels: dict[str, str] = field(default_factory=dict)
    first_keys: str = ""  # the keys the first entry offered ("available: ..."), for a missing-label warning
    # element symbol -> energy (eV) of the first single-atom frame without periodic images of it:
    # MACE's isolated-atom E0s, which a model takes as its energy target's references (skipped here)
    isolated_atom_energies: dict[str, float] = field(default_factory=dict)
    # structures written with a stress, and those of them with a component over PLAUSIBLE_STRESS
    stresses: int = 0
    implausible_stresses: int = 0
    # eV: the largest |free_energy - energy| where energy was read beside a free_energy
    free_energy_gap: float = 0.0
    # key of CHARGE_SPIN_KEYS -> the distinct values the structures carry (_STATES_LISTED + 1 at most)
    charge_spin: dict[str, set] = field(default_factory=dict)
    # the identifiers ("sid", "fid") taken from the source rather than numbered: decided by the
    # first entry written (None before it), _take_identifiers
    identifiers: set[str] | None = None
    # the first source sid or fid met that is no integer (OC22's and OMat24's sids are strings),
    # (key, its value shortened), warned of: numbered instead, or -1
    unusable_identifier: tuple[str, str] | None = None
    # a directory of source files: file name -> what the indices of its structures (frame indices,
    # ASE db row ids) are shifted by to make sids unique across the files
    index_offsets: dict[str, int] = field(default_factory=dict)
    # OC20 S2EF frame logs read (each extxyz's .txt: sid, fid and reference energy per frame), and
    # those of them with reference energies (not the test splits')
    oc20_logs: int = 0
    oc20_logs_with_references: int = 0
    # structures written with forces and both fixed and free atoms, and those of them whose fixed
    # atoms' forces are all exactly zero while a free atom's is not (constrained forces)
    fixed_with_forces: int = 0
    zero_fixed_forces: int = 0


# ----- labels ----------------------------------------------------------------------------------


def _take_labels(entry: dict, sources: dict[str, dict], keys: KeyMap, report: ConvertReport,
                 pickled: bool = False) -> None:
    """Copy energy, forces and stress into `entry` from `sources` ({prefix: mapping}; the
    location of a label is described as prefix[key], or key alone for the prefix "") of an
    ASE structure or, `pickled`, of an OC20/JMP Data object.

    The first entry holding a label fixes its location in report.labels; a later entry holding
    it elsewhere is a DataError, so one dataset never mixes, e.g., REF_energy and energy.
    """
    report.first_keys = report.first_keys or _available(sources)
    for label in LABELS:
        if keys.drops(label):
            continue
        found = {(f"{prefix}[{key!r}]" if prefix else key): (key, mapping)
                 for key in keys.candidates(label, pickled) for prefix, mapping in sources.items()
                 if key in mapping}
        if not found:
            if getattr(keys, label) is not None:
                raise fmt.DataError(f"{label}: key {getattr(keys, label)!r} not found "
                                    f"({_available(sources)})")
            continue
        location = report.labels.setdefault(label, next(iter(found)))
        if location not in found:
            raise fmt.DataError(f"{label} is in {', '.join(found)}, but earlier entries took it "
                                f"from {location}; pick one with --{label}-key (from Python: "
                                f"KeyMap({label}=...))")
        key, mapping = found[location]
        value = mapping[key]
        if label == "energy" and key == "energy" and "free_energy" in mapping:
            try:  # (for a warning only: a free_energy of another shape or not a number is not the entry's fault)
                gap = float(np.abs(_numbers("free_energy", mapping["free_energy"]) - _numbers(label, value)).max())
            except (ValueError, TypeError, fmt.DataError):
                gap = 0.0
            report.free_energy_gap = max(report.free_energy_gap, gap * ENERGY_UNITS[keys.energy_unit])
        if np.asarray(value).dtype.kind == "b":  # (before the unit conversion turns True into 1.0)
            raise fmt.DataError(f"{label} is a boolean ({np.asarray(value).tolist()}) in {location}, not a number")
        if label == "stress":
            value = _stress_3x3(value)
            if key.lower() in _VIRIAL_NAMES:
                value = _virial_to_stress(value, entry["cell"], entry["pbc"])
        entry[label] = value


def _virial_to_stress(virial: np.ndarray, cell, pbc) -> np.ndarray:
    """libAtoms' virial W (energy; W = -V stress) of a periodic structure -> stress (energy/length^3)."""
    volume = abs(np.linalg.det(np.asarray(cell, dtype=np.float64)))
    if not np.asarray(pbc).all() or volume == 0:
        raise fmt.DataError("has a virial but no 3-D periodic cell to divide it by (stress = -virial / volume)")
    return -np.asarray(virial, dtype=np.float64) / volume


def _available(sources: dict[str, dict]) -> str:
    """The keys an entry offers, per source, for a "key not found" message: a misspelt or
    guessed key is then fixed from the message instead of by inspecting the file."""
    return "available: " + "; ".join(f"{prefix + ': ' if prefix else ''}{', '.join(map(str, mapping)) or 'none'}"
                                     for prefix, mapping in sources.items())


class PartialLabels(fmt.DataError):
    """An entry's labels are not those of the entries written before it: it lacks `labels`
    (`lacking`: --skip-invalid skips it), or carries them where those lack them (not skipped:
    that would keep the unlabelled entries and drop the labelled ones)."""

    def __init__(self, message: str, labels: list[str], lacking: bool):
        super().__init__(message)
        self.labels, self.lacking = labels, lacking


def _check_labels(entry: dict, labels: set[str], written: int, first: str, ase_db: bool) -> None:
    """An entry must carry the `labels` of the `written` entries before it (the first from
    `first`; of an ASE database when `ase_db`). The writer would refuse it too, but could not
    say how to drop a label that only some entries carry."""
    lacking = [label for label in LABELS if label in labels and label not in entry]
    extra = [label for label in LABELS if label in entry and label not in labels]
    if lacking:
        raise PartialLabels(f"lacks {', '.join(lacking)}, unlike the first entry written (every "
                            f"entry must carry the same labels): skip such entries with "
                            f"--skip-invalid, or drop {_drop_hint(lacking)}", lacking, lacking=True)
    if extra:
        select = " (or --select energy: the rows with an energy)" if ase_db and "energy" in extra else ""
        raise PartialLabels(f"has {', '.join(extra)}, which the entries written before it lack "
                            f"({written}, from {first}): every entry must carry the same labels, "
                            f"which the first entry written decides; remove the entries without "
                            f"them from the source{select}, or drop {_drop_hint(extra)}", extra, lacking=False)


def _drop_hint(labels: list[str]) -> str:
    flags = " ".join(f"--{label}-key none" for label in labels)
    python = ", ".join(f"{label}='none'" for label in labels)
    return f"{', '.join(labels)} with {flags} (from Python: KeyMap({python}))"


def _stress_3x3(stress) -> np.ndarray:
    """A stress label as [3,3]: Voigt [xx, yy, zz, yz, xz, xy] (ASE's (6,)), 9 numbers row by row
    (MACE's REF_stress read back from extxyz), and [1,3,3] (PyG batches) are accepted; any
    other shape is left for validation to report."""
    stress = np.asarray(stress)
    if stress.shape in ((6,), (1, 6)):
        return voigt_6_to_full_3x3_stress(stress.reshape(6))
    if stress.size == 9:
        return stress.reshape(3, 3)
    return stress


# ----- ASE sources -------------------------------------------------------------------------


def oc20_tags(tags: np.ndarray) -> np.ndarray:
    """OC20 tags (0 sub-surface, 1 surface, 2 adsorbate) of a structure's ASE tags [n]: its own
    when any is set, else 2 everywhere, as JMP's fine-tuning sets them for molecules and bulk.
    ASE's default (all 0) would read as all sub-surface, leaving the quadruplet graph (edges
    touching a 1 or a 2) empty."""
    tags = fmt.as_integers(np.asarray(tags), "tags")
    return tags if tags.any() else np.full(tags.shape, 2, dtype=np.int64)


def _warn_non_oc20_tags(tags: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    """Warns (at the caller of atoms_structure) about ase.build's layer numbers (fcc111 etc.: 1
    top, 2, 3, ...; add_adsorbate's 0) where OC20 tags are meant: tags outside {0, 1, 2}, or the
    two layers of a two-layer slab, whose numbers are all valid OC20 tags: as many atoms tagged 2
    (adsorbate) as tagged 1 (surface), all below them. The tags are kept as they are: the user
    may mean them."""
    other = np.setdiff1d(tags, [0, 1, 2])
    if other.size:
        problem = f"tags {other.tolist()} are not OC20 tags"
    elif (tags == 1).any() and (tags == 2).sum() == (tags == 1).sum():
        # Heights along the surface normal (a x b, towards the third lattice vector; z without a
        # cell), from the surface atoms, the nearest image when the cell repeats along it.
        normal = np.cross(cell[0], cell[1])
        length = np.linalg.norm(normal)
        normal = normal / length if length > 0 else np.array([0.0, 0.0, 1.0])
        if normal @ cell[2] < 0:
            normal = -normal
        height = (positions - positions[tags == 1].mean(axis=0)) @ normal
        period = cell[2] @ normal
        if pbc[2] and period > 0:
            height -= period * np.round(height / period)
        if height[tags == 2].max() >= height[tags == 1].min():
            return
        problem = ("the atoms tagged 2 (adsorbate) lie below those tagged 1 (surface), as many of them as of a "
                   "layer: these tags look like ase.build's layer numbers, not OC20 tags")
    else:
        return
    warn_user(f"{problem} (0 sub-surface, 1 surface, 2 adsorbate; GemNet-OC's quadruplet graph keeps only "
              "edges touching a 1 or a 2), and are used as they are. ase.build's slabs tag their layers 1 "
              "(top), 2, 3, ... and add_adsorbate tags the adsorbate 0: set OC20 tags first, for such a slab "
              "t = atoms.get_tags(); atoms.set_tags(np.select([t == 1, t == 0], [1, 2], 0))")


def atoms_structure(atoms: Atoms) -> dict[str, np.ndarray]:
    """The structure fields of an entry (pos, atomic_numbers, cell, pbc, tags, fixed) of ASE
    Atoms: one rule for the converters and the calculator, so that a model sees a structure
    alike in training and in use. Tags: oc20_tags. An atom is fixed when FixAtoms holds it or
    FixCartesian masks hold all three of its axes (extxyz stores constraints as move_mask,
    which reads back as FixCartesian), or a per-atom "fixed" array (a column some exports write,
    1 or True for a fixed atom) marks it. Tags outside {0, 1, 2} are kept, with a
    warning."""
    fixed_axes = np.zeros((len(atoms), 3), bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed_axes[constraint.index] = True
        elif isinstance(constraint, FixCartesian):
            fixed_axes[constraint.index] |= constraint.mask
    if "fixed" in atoms.arrays:
        column = np.asarray(atoms.arrays["fixed"])
        if column.shape != (len(atoms),) or column.dtype.kind not in "biuf" or not np.isin(column, (0, 1)).all():
            raise fmt.DataError(f"its per-atom 'fixed' array (shape {list(column.shape)}, values "
                                f"{np.unique(column)[:5].tolist()}) is not one 0/1 or True/False per atom")
        fixed_axes[column.astype(bool)] = True
    tags = oc20_tags(atoms.get_tags())
    _warn_non_oc20_tags(tags, atoms.positions, atoms.cell.array, atoms.pbc)
    return {
        "pos": atoms.positions,
        "atomic_numbers": atoms.numbers,
        "cell": atoms.cell.array,
        "pbc": atoms.pbc,
        "tags": tags,
        "fixed": fixed_axes.all(axis=1),
    }


def atoms_to_entry(atoms: Atoms) -> dict[str, torch.Tensor]:
    """One structure as LmdbDataset returns it: pos, atomic_numbers, cell, pbc, tags, fixed.

    Tags: the Atoms' own when any is set (OC20 slabs), else 2 for every atom (molecules and bulk,
    as JMP's fine-tuning sets them). They follow OC20: 0 sub-surface, 1 surface, 2 adsorbate;
    the quadruplet graph keeps edges that touch a 1 or a 2. ase.build's slabs tag their layers
    1 (top) to n and add_adsorbate tags the adsorbate 0, so set OC20 tags on such a slab before
    a relaxation (tags outside {0, 1, 2} are used as they are, with a warning). Fixed: FixAtoms,
    or FixCartesian on all three axes. Fields and dtypes are those of a converted structure
    (atoms_structure, as the writer stores it), so that the model sees a structure as in
    training."""
    structure = fmt.normalize_entry(atoms_structure(atoms), "atoms")
    fmt.validate_entry(structure, "atoms")  # (an unknown element or a NaN position, said as such)
    return {name: torch.from_numpy(array) for name, array in structure.items()}


def entry_to_atoms(entry: dict) -> Atoms:
    """A dataset entry as Atoms (Å): its tags, fixed atoms (FixAtoms), labels (energy, forces,
    stress as a SinglePointCalculator's results, as an extxyz file holds them), sid, fid and scalar
    properties (info, by name: U_0, a class index, ...), for writing a dataset's structures back
    to a file. Read back by atoms_structure it gives the same entry, except that fixed atoms are
    a FixAtoms whatever constraint the source had, and all-zero tags read as 2 (oc20_tags)."""
    atoms = Atoms(numbers=np.asarray(entry["atomic_numbers"]), positions=np.asarray(entry["pos"], dtype=np.float64),
                  cell=np.asarray(entry["cell"], dtype=np.float64).reshape(3, 3),
                  pbc=np.asarray(entry["pbc"]).reshape(3), tags=np.asarray(entry["tags"]))
    fixed = np.asarray(entry["fixed"], dtype=bool)
    if fixed.any():
        atoms.set_constraint(FixAtoms(mask=fixed))
    labels = {name: np.asarray(entry[name], dtype=np.float64) for name in LABELS if name in entry}
    if labels:
        if "energy" in labels:
            labels["energy"] = float(labels["energy"])
        atoms.calc = SinglePointCalculator(atoms, **labels)
    for key in ("sid", "fid"):
        if key in entry:
            atoms.info[key] = int(entry[key])
    for name, value in entry.items():  # (properties; the structure fields and labels are placed above)
        if name not in fmt.INPUT_FIELDS and name not in LABELS and np.ndim(value) == 0:
            atoms.info[name] = np.asarray(value).item()
    return atoms


# ASE calculator results with a value per atom.
_PER_ATOM_RESULTS = {"forces", "charges", "magmoms", "energies", "stresses"}
# A structure's net charge and spin state, as OMol25 and SPICE-like sets record them: inputs the
# model does not take.
CHARGE_SPIN_KEYS = ("charge", "total_charge", "spin", "multiplicity", "spin_multiplicity")
_STATES_LISTED = 5


def _atoms_entry(atoms: Atoms, keys: KeyMap, report: ConvertReport, index: int) -> dict:
    """An entry of ASE Atoms `index` of its source (a frame index, an ASE db row id), its sid and
    fid from the Atoms' info (an ASE db row's key-value pairs included) by _take_identifiers."""
    entry = atoms_structure(atoms)
    _take_identifiers(entry, atoms.info, report, index)
    results = atoms.calc.results if atoms.calc is not None else {}
    sources = {"info": atoms.info, "arrays": atoms.arrays, "calculator": results}
    _take_labels(entry, sources, keys, report)
    for key in CHARGE_SPIN_KEYS:
        value = atoms.info.get(key)
        if is_number(value):
            seen = report.charge_spin.setdefault(key, set())
            if len(seen) <= _STATES_LISTED:  # (one more says that there are more)
                seen.add(value.item() if isinstance(value, np.generic) else value)
    for name, key in keys.properties.items():
        found = next((where for where, d in sources.items() if key in d), None)
        if found is None:
            raise MissingProperty(name, f"property {name!r}: key {key!r} not found ({_available(sources)})")
        if found == "arrays" or (found == "calculator" and key in _PER_ATOM_RESULTS):
            raise fmt.DataError(f"property {name!r}: {found}[{key!r}] is per atom; properties are per "
                                f"structure (a number or a vector per structure)")
        entry[name] = sources[found][key]
    return keys.to_ev_angstrom(entry)


def _take_identifiers(entry: dict, values: dict, report: ConvertReport, index: int | None) -> None:
    """sid and fid of `entry` from its source's `values` (an Atoms' info, a Data object's fields)
    by one rule for every entry of a dataset, which the first entry written decides: the source's
    own integers where it has them (OC20's system and frame; an entry without gets -1), else for
    sid the entry's `index` in its source (a frame, an ASE db row id; None: no sid), and no fid.
    Mixing the two kinds in one column could give unrelated structures one sid."""
    found = {key: integer_identifier(values.get(key)) for key in ("sid", "fid")}
    if report.unusable_identifier is None:
        report.unusable_identifier = next(((key, str(values[key])[:40]) for key, value in found.items()
                                           if value is None and values.get(key) is not None), None)
    if report.identifiers is None:
        report.identifiers = {key for key, value in found.items() if value is not None}
    for key, value in found.items():
        if key in report.identifiers:
            entry[key] = value if value is not None else -1
        elif key == "sid" and index is not None:
            entry[key] = index


def integer_identifier(value) -> int | None:
    """value as an integer identifier (an integer, a one-element array of one, as torch_geometric
    stores them, or a whole-number float), or None (absent, a string such as OC22's sids)."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        return None
    number = array.reshape(()).item()
    return int(number) if float(number).is_integer() else None


def is_number(value) -> bool:
    """A number in an Atoms' info (a charge, a spin): an int or float, numpy's too, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# Structures ase.io fails to parse one after the other before convert gives up on a file (not
# an extxyz: each of its structures is parsed on its own).
_MAX_UNPARSED_IN_A_ROW = 10


def iter_ase_file(path: Path, keys: KeyMap, report: ConvertReport, progress: bool = False,
                  subtract_reference: bool = False) -> Iterator[tuple[str, object]]:
    """(where, entry or exception) for every structure of a file ase.io reads (extxyz, traj), or
    of a directory of extxyz / xyz files (structure_files; a structure's index, its sid unless it
    has its own, counts on from the earlier files': report.index_offsets). An extxyz with OC20
    S2EF's frame log beside it (frame_log_file) takes each frame's sid and fid from it, and with
    `subtract_reference` has its reference energy subtracted from the energy, as OC20's S2EF
    LMDBs do; in a directory, every file or none has a log. A structure ase.io cannot parse is
    yielded as a DataError, and reading goes on after it; a file that ase.io would read only in
    part is a DataError raised (not one to skip)."""
    files = structure_files(path) if path.is_dir() else [path]
    logs = [frame_log_file(file) for file in files]  # (each read when its file is: OC20's 134M frames)
    if any(logs) and not all(logs):
        logged, unlogged = (next(f for f, log in zip(files, logs) if bool(log) == has) for has in (True, False))
        names = ", ".join(_log_names(unlogged)) or "only extxyz files have one"
        raise SourceError(f"{path}: {logged.name} has an OC20 frame log and {unlogged.name} none ({names}): its "
                          "frames would get no sid and fid, or another kind of sid; give every file its log, or "
                          "convert those without apart")
    if subtract_reference and not all(logs):
        names = ", ".join(_log_names(files[0])) or "only extxyz files have one"
        raise SourceError(f"{files[0]}: no OC20 frame log beside it ({names}) to take the reference energies from")
    offset = 0
    for k, (file, log) in enumerate(zip(files, logs)):
        if path.is_dir():
            report.index_offsets[file.name] = offset
        label = f"{file} ({k + 1} of {len(files)} files)" if path.is_dir() else str(file)
        log = read_frame_log(log, file) if log is not None else None
        offset += yield from _iter_structure_file(file, label, log, keys, report, progress, offset, subtract_reference)


def _iter_structure_file(path: Path, label: str, log: FrameLog | None, keys: KeyMap, report: ConvertReport,
                         progress: bool, offset: int, subtract_reference: bool) -> Iterator[tuple[str, object]]:
    """iter_ase_file's work for one file (its progress bar `label`), its structures' indices after
    `offset`; returns how many structures it holds."""
    from ase.io.formats import filetype

    try:
        kind = filetype(str(path))
        if kind == "extxyz":  # (its framing checked to the end before any structure is converted)
            for _ in _extxyz_structures(path, text=False):
                pass
    except fmt.DataError:
        raise
    except Exception as error:  # (ase.io's UnknownFileTypeError, a compressed file that is not)
        raise UnreadableSource(f"{path}: ase.io cannot read it ({type(error).__name__}: {error})") from error
    if log is not None:
        references = all(reference is not None for _, _, reference in log.frames)
        if subtract_reference and not references:
            raise SourceError(f"{log.path} has no reference energies (OC20's test logs list sid and fid alone)")
        report.oc20_logs += 1
        report.oc20_logs_with_references += references
    index = -1
    # (the bar closed with the stream, before an error is printed: not on the same line after it)
    with tqdm(desc=label, unit="structure", disable=not progress) as bar:
        frames = _parsed_extxyz_structures(path) if kind == "extxyz" else _parsed_structures(path, kind)
        for index, atoms in enumerate(frames):
            where = f"{path} structure {index}"
            if log is not None and index >= len(log.frames):
                raise SourceError(f"{log.path} lists {len(log.frames)} frames, fewer than {path} holds")
            if isinstance(atoms, fmt.DataError):
                yield where, atoms
                continue
            bar.update()
            try:
                if log is not None:
                    atoms.info["sid"], atoms.info["fid"], reference = log.frames[index]
                entry = _atoms_entry(atoms, keys, report, offset + index)
                if subtract_reference and "energy" in entry:
                    entry["energy"] = entry["energy"] - reference
                yield where, entry
            except Exception as error:
                yield where, error
    if log is not None and index + 1 != len(log.frames):
        raise SourceError(f"{log.path} lists {len(log.frames)} frames, {path} holds {index + 1}")
    return index + 1


# The suffix of a compressed file, which ase.io reads as it is (OC20's S2EF: 0.extxyz.xz, 0.txt.xz).
_COMPRESSED = r"(\.(xz|gz|bz2))?"
# Files of structures a directory may hold for iter_ase_file.
_STRUCTURE_FILE = re.compile(r"(.+\.(extxyz|xyz))" + _COMPRESSED)


def structure_files(path: Path) -> list[Path]:
    """The extxyz and xyz files (compressed ones too) of directory `path`, in natural order
    (2.extxyz before 10.extxyz); one held both compressed and not (half decompressed) is an error."""
    def natural(file: Path) -> tuple:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", file.name)], file.name

    files = sorted((f for f in path.iterdir() if _STRUCTURE_FILE.fullmatch(f.name) and f.is_file()), key=natural)
    stems = [_STRUCTURE_FILE.fullmatch(f.name)[1] for f in files]
    if twice := sorted({stem for stem in stems if stems.count(stem) > 1}):
        copies = [f.name for f, stem in zip(files, stems) if stem == twice[0]]
        raise SourceError(f"{path} holds {twice[0]} twice ({', '.join(copies)}): its structures would be read "
                          "twice; keep one of them")
    return files


def _log_names(path: Path) -> list[str]:
    """Where OC20 S2EF keeps the frame log of an extxyz (none for other files)."""
    found = re.fullmatch(r"(.+)\.extxyz" + _COMPRESSED, path.name)
    return [f"{found[1]}.txt{suffix}" for suffix in ("", ".xz")] if found else []


@dataclass
class FrameLog:
    """OC20 S2EF's frame log of an extxyz: its path, and per frame (sid, fid, reference energy in
    eV or None)."""

    path: Path
    frames: list[tuple[int, int, float | None]]


def frame_log_file(path: Path) -> Path | None:
    """OC20 S2EF's frame log of the extxyz `path` (0.extxyz or 0.extxyz.xz: 0.txt or 0.txt.xz
    beside it), or None: no such file, or one whose first line is no frame's (random<sid>,...),
    which is warned of and left alone (notes of the user's own)."""
    log = next((path.with_name(name) for name in _log_names(path) if path.with_name(name).is_file()), None)
    if log is None:
        return None
    first = next((line for line in _log_lines(log) if line), "")
    if not first.startswith("random"):
        warn_user(f"{log} beside {path.name} is no OC20 frame log (its first line reads {first[:60]!r}): left out")
        return None
    return log


def read_frame_log(log: Path, path: Path) -> FrameLog:
    """The frame log `log` of the extxyz `path` (frame_log_file): lines
    "random<sid>,frame<fid>,<reference energy>" (the test splits' have no energy); blank lines
    are none, a line of another form is an error."""
    frames = []
    for number, line in enumerate(_log_lines(log), 1):
        if not line:  # (a blank line, such as an editor leaves at the end)
            continue
        found = re.fullmatch(r"random(\d+),frame(\d+)(?:,(.*))?", line)
        try:
            reference = None if found is None or not found[3] else float(found[3])
        except ValueError:
            found = None
        if found is None:
            raise SourceError(f"{log}: line {number} reads {line[:60]!r}, not random<sid>,frame<fid>,"
                              f"<reference energy> as OC20's frame logs (which {path.name} has beside it)")
        frames.append((int(found[1]), int(found[2]), reference))
    return FrameLog(log, frames)


def _log_lines(log: Path) -> Iterator[str]:
    """The lines of a frame log (compressed too), stripped (of a byte order mark too: Windows
    Notepad's); a damaged file is a SourceError naming it."""
    import lzma

    from ase.io.formats import open_with_compression

    try:
        with open_with_compression(str(log)) as file:
            for line in file:
                yield line.strip().lstrip("\ufeff")
    except (EOFError, lzma.LZMAError, OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{log}: the frame log cannot be read ({type(error).__name__}: {error})") from error


def _parsed_extxyz_structures(path: Path) -> Iterator[Atoms | fmt.DataError]:
    """Each structure of an extxyz file parsed by ase.io on its own, or the DataError saying why
    it could not be: one bad structure costs nothing but itself."""
    from ase.io import read

    structures = _extxyz_structures(path)
    if (first := next(structures, None)) is None:
        raise _no_structure_read(path, "extxyz")
    for line_number, text, complete in itertools.chain([first], structures):
        if not complete:
            natoms = int(text.partition("\n")[0])
            yield fmt.DataError(f"cut short: the file ends inside it (it starts at line {line_number}, with an atom "
                                f"count of {natoms})")
            return
        try:
            yield read(io.StringIO(text), format="extxyz")
        except Exception as error:
            yield fmt.DataError(f"cannot parse (line {line_number} on; {type(error).__name__}: {error})")


def _parsed_structures(path: Path, kind: str) -> Iterator[Atoms | fmt.DataError]:
    """Each structure of a file ase.io reads, or the DataError of one it cannot parse. ase.io's
    reader ends at a parse error: a new one goes on after that structure, scanning the file again."""
    from ase.io import iread

    frames, index, failures = iread(str(path), index=":"), 0, 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            if index == 0:  # (an extxyz named .out reads as Quantum ESPRESSO output: nothing)
                raise _no_structure_read(path, kind) from None
            return
        except Exception as error:
            failures += 1
            if failures > _MAX_UNPARSED_IN_A_ROW:
                raise UnreadableSource(f"{path}: ase.io could not parse structures {index - failures + 1} to "
                                       f"{index} in a row (the last: {type(error).__name__}: {error}); rather "
                                       "than try every structure of a file that may be unreadable from there "
                                       "on, convert stops: fix the file") from error
            yield fmt.DataError(f"cannot parse ({type(error).__name__}: {error})")
            index += 1
            frames = iread(str(path), index=f"{index}:")
            continue
        failures = 0
        yield atoms
        index += 1


def _no_structure_read(path: Path, kind: str) -> UnreadableSource:
    return UnreadableSource(f"{path}: ase.io read no structure from it, reading it as format {kind!r} (which it "
                            "takes from the name and contents; a file of another format needs that format's "
                            "suffix: .extxyz, .traj, ...)")


def _extxyz_structures(path: Path, text: bool = True) -> Iterator[tuple[int, str | None, bool]]:
    """(its first line number, its text or None when not `text`, whether the file holds all of
    it) for each structure of an extxyz file, framed as ase.io's extxyz reader frames them: an
    atom count, a comment line, the atoms, up to three VEC lines. Raises an UnreadableSource
    where that reader would stop before the end of `path`: it ends the file at a blank line
    where a structure's first line (its atom count) should be, as `cat a.extxyz; echo; cat
    b.extxyz` makes, and leaves the rest out without a word; or where it would read nothing (an
    atom count that does not match its atom lines, which the reader reports as a bad first
    structure). Reads each line once (a seek back in a compressed file decompresses it again
    from its start)."""
    from ase.io.formats import open_with_compression

    with open_with_compression(str(path)) as file:
        line, line_number, structures = file.readline(), 1, 0
        while line.strip():
            try:
                natoms = int(line)
            except ValueError:
                natoms = -1
            if natoms < 0:
                after = (f"structure {structures - 1}'s atom count does not match its atom lines, or a stray line "
                         "follows it" if structures else "the file does not start with an atom count")
                raise UnreadableSource(f"{path}: line {line_number}, where structure {structures} should start "
                                       f"with its atom count, reads {line.strip()[:60]!r}: {after}, and ase.io's "
                                       "extxyz reader reads nothing of such a file; fix the file")
            first, lines = line_number, [line]
            for _ in range(natoms + 1):  # (the comment line, the atoms)
                line = file.readline()
                if not line:
                    yield first, "".join(lines) if text else None, False
                    return
                if text:
                    lines.append(line)
            structures += 1
            line, line_number = file.readline(), line_number + natoms + 2
            vectors = 0
            while line.lstrip().startswith("VEC"):
                vectors += 1
                if vectors > 3:
                    raise UnreadableSource(f"{path}: line {line_number}: structure {structures - 1} has more than "
                                           "three VEC lines (lattice vectors), and ase.io's extxyz reader reads "
                                           "nothing of such a file; fix the file")
                if text:
                    lines.append(line)
                line, line_number = file.readline(), line_number + 1
            yield first, "".join(lines) if text else None, True
        if not line:
            return
        blank = line_number
        for line in file:
            line_number += 1
            if line.strip():
                raise UnreadableSource(f"{path}: line {blank} is blank where a structure's first line (its atom "
                                       f"count) should be: ase.io's extxyz reader ends the file there and would "
                                       f"leave out the rest (from line {line_number}); remove the blank line(s)")


def iter_ase_db(path: Path, keys: KeyMap, report: ConvertReport, select: str | None = None,
                progress: bool = False) -> Iterator[tuple[str, object]]:
    """(where, entry or exception) for every row of an ASE database (.db, .json), or of
    fairchem's ASE LMDBs (an .aselmdb file, or a directory of them, read in name order: OMat24,
    OMol25); key_value_pairs and data are searched for labels and properties after the
    calculator results. A row's index (its sid, unless it has its own) is its row id, plus in a
    directory the earlier files' largest row ids (report.index_offsets), so that no two files'
    rows share one, under any `select`."""
    import ase.db
    from ase.db.core import parse_selection

    try:
        parse_selection(select)
    except Exception as error:  # (its parser's own: "too many values to unpack" for natoms>>3)
        raise fmt.DataError(f"select {select!r}: ase.db cannot read this query ({error})") from None
    files = sorted(path.glob("*.aselmdb")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: a directory without .aselmdb files (the ASE databases a directory can "
                                f"hold){_in_subdirectories(path, '*.aselmdb')}")
    offset = 0  # (each file numbers its rows from 1: a sid numbered by rows is row id + offset)
    for file in files:
        if path.is_dir():
            report.index_offsets[file.name] = offset
        if file.suffix == ".aselmdb":
            try:  # (ase.db reads them through fairchem's backend package)
                importlib.import_module("ase_db_backends.aselmdb")
            except ImportError as error:
                raise fmt.DataError(f"{file}: reading fairchem's ASE LMDB (.aselmdb) needs the ase-db-backends "
                                    f"package: pip install ase-db-backends ({error})") from error
            fmt.open_lmdb_readonly(file).close()  # (a truncated file is an error, not a SIGBUS)
            db = ase.db.connect(str(file), readonly=True)  # (without a lock file or write access)
        else:
            db = ase.db.connect(str(file))
        try:
            with db, tqdm(db.select(select), total=db.count(select), desc=str(file), unit="row",
                          disable=not progress) as rows:
                # (the file's largest id, whatever `select` keeps: the same sids under any query;
                # fairchem's backend lists its ids, another the selected rows' decide)
                largest_id = max(getattr(db, "ids", None) or [0])
                for row in rows:
                    where = f"{file} row id={row.id}"
                    largest_id = max(largest_id, row.id)
                    try:
                        atoms = row.toatoms()
                        atoms.info.update(row.key_value_pairs)
                        atoms.info.update(row.get("data", {}))
                        yield where, _atoms_entry(atoms, keys, report, offset + row.id)
                    except Exception as error:
                        yield where, error
                offset += largest_id
        except (fmt.DataError, OSError):
            raise
        except Exception as error:  # (a damaged SQLite file, a .json that is no ASE database)
            raise UnreadableSource(f"{file}: ase.db cannot read it ({type(error).__name__}: {error})") from error


# ----- sGDML and rMD17 .npz trajectories ------------------------------------------------------

# The arrays of a trajectory of one molecule in an .npz: positions [M, n, 3], atomic numbers [n],
# energies [M] (or [M, 1]) and forces [M, n, 3]. sGDML's (MD17 and MD22 from sgdml.org) records
# its units (e_unit, r_unit); rMD17's does not (its README: kcal/mol and Å).
NPZ_LAYOUTS = {"sGDML": ("R", "z", "E", "F"), "rMD17": ("coords", "nuclear_charges", "energies", "forces")}


def iter_npz(path: Path, keys: KeyMap, report: ConvertReport, progress: bool = False
             ) -> Iterator[tuple[str, dict]]:
    """(where, entry) for every frame of a molecule's trajectory in an .npz of NPZ_LAYOUTS, read
    without pickles. keys.energy / keys.forces name other arrays (rMD17's old_energies) or drop
    them ("none"); sGDML's recorded units must be those of `keys`, and an rMD17 file read as eV
    is warned of. A `lattice` [3, 3] (sGDML's periodic sets) makes the frames periodic."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as error:  # (not a zip, a damaged one, an array of Python objects)
        raise UnreadableSource(f"{path}: numpy cannot read it as an .npz of arrays ({type(error).__name__}: "
                               f"{error})") from error
    layout = next((name for name, (r, z, _, _) in NPZ_LAYOUTS.items() if r in arrays and z in arrays), None)
    if layout is None:
        known = "; ".join(f"{name}'s {', '.join(names)}" for name, names in NPZ_LAYOUTS.items())
        raise UnreadableSource(f"{path}: an .npz of arrays {', '.join(sorted(arrays)) or 'none'}, in no layout "
                               f"convert reads ({known})")
    r_key, z_key, e_key, f_key = NPZ_LAYOUTS[layout]
    if (keys.stress is not None and not keys.drops("stress")) or keys.properties:
        raise SourceError(f"{path}: an .npz trajectory holds an energy and forces only (no stress or properties)")
    positions, numbers = np.asarray(arrays[r_key]), np.asarray(arrays[z_key]).reshape(-1)
    frames = len(positions) if positions.ndim == 3 else 0
    if positions.shape != (frames, len(numbers), 3):
        raise SourceError(f"{path}: {r_key} has shape {list(positions.shape)}, not [frames, {len(numbers)}, 3] "
                          f"for the {len(numbers)} atoms of {z_key}")
    labels = {}  # label -> (its array, its values: one row per frame)
    for label, default in (("energy", e_key), ("forces", f_key)):
        key = getattr(keys, label) or default
        if keys.drops(label) or (key not in arrays and getattr(keys, label) is None):
            continue
        if key not in arrays:
            raise SourceError(f"{path}: {label}: key {key!r} not found (available: {', '.join(sorted(arrays))})")
        labels[label] = key, _label_array(str(path), label, key, np.asarray(arrays[key]), frames, len(numbers))
    # (the energy unit matters to the labels only: a file read for its structures alone needs none)
    if "e_unit" in arrays and labels:
        _check_recorded_unit(f"{path} records its e_unit", arrays["e_unit"], keys.energy_unit, "--energy-unit")
    if "r_unit" in arrays:
        _check_recorded_unit(f"{path} records its r_unit", arrays["r_unit"], keys.length_unit, "--length-unit")
    if layout == "rMD17" and labels:
        _warn_unrecorded_units(path, "rMD17", "kcal/mol", "Å", keys)
    lattice = arrays.get("lattice")
    if lattice is not None and np.shape(lattice) != (3, 3):
        raise SourceError(f"{path}: lattice has shape {list(np.shape(lattice))}, not [3, 3] (one cell for every "
                          "frame, as sGDML stores it)")
    cell = None if lattice is None else np.asarray(lattice, dtype=np.float64)
    sources = {label: key for label, (key, _) in labels.items()}
    yield from _conformations(str(path), positions, numbers, {label: v for label, (_, v) in labels.items()},
                              sources, report, keys, None, cell, progress)


def _label_array(where: str, label: str, key: str, values: np.ndarray, frames: int, atoms: int) -> np.ndarray:
    """A conformations file's label array in its one shape: energy [M] (or [M, 1]), forces [M, n, 3]."""
    shapes = [(frames,), (frames, 1)] if label == "energy" else [(frames, atoms, 3)]
    if values.shape not in shapes:
        raise SourceError(f"{where}: {label} ({key}) has shape {list(values.shape)}, not "
                          f"{' or '.join(str(list(shape)) for shape in shapes)}")
    return values.reshape(shapes[0])


def _conformations(where: str, positions: np.ndarray, numbers: np.ndarray, labels: dict[str, np.ndarray],
                   sources: dict[str, str], report: ConvertReport, keys: KeyMap, sid: int | None,
                   cell: np.ndarray | None = None, progress: bool = False, first_fid: int = 0
                   ) -> Iterator[tuple[str, dict]]:
    """(where, entry) for each conformation of one molecule (npz and HDF5 files): positions
    [M, n, 3], labels {label: [M, ...]} read from `sources` {label: dataset}, which the report
    records with every entry (convert forgets them when a first entry is skipped). sid None:
    each frame's index; else `sid` (its group) and first_fid + the frame's index as fid. A cell
    [3, 3]: periodic."""
    n = len(numbers)
    for i in tqdm(range(len(positions)), desc=where, unit="structure", disable=not progress):
        for label, source in sources.items():
            report.labels.setdefault(label, source)
        entry = {"pos": positions[i], "atomic_numbers": numbers, "cell": np.zeros((3, 3)) if cell is None else cell,
                 "pbc": np.full(3, cell is not None), "tags": oc20_tags(np.zeros(n, np.int64)),
                 "fixed": np.zeros(n, bool), "sid": i if sid is None else sid,
                 **({} if sid is None else {"fid": first_fid + i}),
                 **{label: values[i] for label, values in labels.items()}}
        yield f"{where} frame {i}", keys.to_ev_angstrom(entry)


# Names of units in files (sGDML's e_unit / r_unit, HDF5 attributes), lower-cased -> the names of
# ENERGY_UNITS and LENGTH_UNITS.
_UNIT_ALIASES = {"ang": "Å", "angstrom": "Å", "ha": "Hartree",
                 **{unit.lower(): unit for unit in (*ENERGY_UNITS, *LENGTH_UNITS)}}


def _unit_text(recorded) -> str:
    """A unit as a file records it (a string, bytes, a one-element array of either) as text."""
    recorded = np.asarray(recorded).reshape(-1)
    recorded = recorded[0].item() if recorded.size == 1 else recorded.tolist()
    return recorded.decode() if isinstance(recorded, bytes) else str(recorded)


def _check_recorded_unit(what: str, recorded, given: str, option: str) -> None:
    """A unit a file records (`what`: where) must be the one it is read in, `given`."""
    recorded = _unit_text(recorded)
    unit = _UNIT_ALIASES.get(recorded.lower())
    table = ENERGY_UNITS if given in ENERGY_UNITS else LENGTH_UNITS
    if unit not in table:
        raise SourceError(f"{what} as {recorded!r}, a unit convert does not know: convert the file to eV and Å first")
    if table[unit] != table[given]:
        raise SourceError(f"{what} as {recorded!r}, but it is read as {given}: give {option} {unit}")


def _warn_unrecorded_units(path: Path, name: str, energy_unit: str, length_unit: str, keys: KeyMap) -> None:
    """A set whose files record no units (rMD17, ANI-1x, Transition1x), read in others than its own."""
    if ENERGY_UNITS[keys.energy_unit] != ENERGY_UNITS[energy_unit] or keys.length_unit != length_unit:
        warn_user(f"{path} is read in {keys.energy_unit} and {keys.length_unit}: {name}'s files hold {energy_unit} and "
                  f"{length_unit} (forces in {energy_unit}/{length_unit}), which they do not record; for one of "
                  f"them, convert with --energy-unit {energy_unit} --length-unit {length_unit}")


# ----- HDF5 conformations (ANI-1x, Transition1x, SPICE) ----------------------------------------

# A group of conformations of one molecule holds its atomic numbers [n] and positions [M, n, 3]:
# ANI-1x's coordinates, Transition1x's positions, SPICE's conformations.
HDF5_POSITION_KEYS = ("coordinates", "positions", "conformations")
# The usual label datasets, in order: ANI-1x's (wB97x/6-31G(d)), Transition1x's and SPICE's (a
# gradient, +dE/dx: a forces dataset whose name ends in "gradient" is negated).
HDF5_DEFAULT_KEYS = {"energy": ("wb97x_dz.energy", "wB97x_6-31G(d).energy", "dft_total_energy"),
                     "forces": ("wb97x_dz.forces", "wB97x_6-31G(d).forces", "dft_total_gradient")}
# The units each release documents, by its label datasets: (set, energy unit, length unit), forces
# in energy/length. SPICE's files also record theirs (a dataset's "units" attribute), which is
# checked where present.
HDF5_KNOWN_UNITS = {"wb97x_dz": ("ANI-1x", "Hartree", "Å"), "wB97x_6-31G(d)": ("Transition1x", "eV", "Å"),
                    "dft_total": ("SPICE", "Hartree", "Bohr")}
# Transition1x's reaction groups hold the path's frames and subgroups reactant, product and
# transition_state; its own loader reads the first two and the path (the state is one of its frames).
_HDF5_SKIPPED_GROUPS = ("transition_state",)


def iter_hdf5(path: Path, keys: KeyMap, report: ConvertReport, select: str | None = None,
              progress: bool = False) -> Iterator[tuple[str, dict]]:
    """(where, entry) for every conformation of every group of an HDF5 file (or of its group
    `select`, e.g. Transition1x's data, itself included) that holds atomic_numbers and positions
    (HDF5_POSITION_KEYS), groups in name order, each object once however many hard links lead
    to it (soft and external links are not followed), _HDF5_SKIPPED_GROUPS left out. An entry's
    sid numbers its group, or the group of conformations its group is inside (Transition1x's
    reactant and product of a reaction's path: the path's end frames), its fid its frame within
    that sid. Labels: keys.energy / keys.forces name the datasets (else HDF5_DEFAULT_KEYS); the
    first group holding a label fixes its dataset. Units a dataset records ("units" attribute)
    must be those read; a set of HDF5_KNOWN_UNITS read in others is warned of. Needs h5py."""
    try:
        import h5py
    except ImportError as error:
        raise SourceError(f"{path}: reading HDF5 needs h5py: pip install h5py (or jmp_ext's [hdf5] extra)") from error
    if (keys.stress is not None and not keys.drops("stress")) or keys.properties:
        raise SourceError(f"{path}: an HDF5 file of conformations is read for an energy and forces only (no stress "
                          "or properties; --energy-key names another energy dataset, e.g. SPICE's formation_energy)")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise UnreadableSource(f"{path}: h5py cannot read it ({error})") from error
    with file:
        root = file
        if select is not None:
            if not isinstance(file.get(select), h5py.Group):
                raise SourceError(f"{path}: no group {select!r} to select (its top level: "
                                  f"{', '.join(file) or 'none'})")
            root = file[select]

        def holds_conformations(name, obj) -> bool:
            return (isinstance(obj, h5py.Group) and "atomic_numbers" in obj and name.rsplit("/", 1)[-1]
                    not in _HDF5_SKIPPED_GROUPS and any(k in obj for k in HDF5_POSITION_KEYS))

        groups = ["."] if holds_conformations(root.name, root) else []
        root.visititems(lambda name, obj: groups.append(name) if holds_conformations(name, obj) else None)
        if not groups:
            raise SourceError(f"{path}: no group holds atomic_numbers and positions ({', '.join(HDF5_POSITION_KEYS)}; "
                              "links other than hard ones are not followed)")
        located: dict[str, str] = {}  # label -> its dataset, fixed by the first group holding it
        warned = False
        frames_of: dict[str, tuple[int, int]] = {}  # a group that is a sid's own -> (sid, frames given it)
        shapes = [next(root[name][k].shape for k in HDF5_POSITION_KEYS if k in root[name]) for name in groups]
        bar = tqdm(total=sum(shape[0] for shape in shapes if len(shape) == 3), desc=str(path), unit="structure",
                   disable=not progress)
        with bar:
            for name in sorted(groups, key=lambda name: (name != ".", name)):
                # (sorted: a group comes before the groups inside it)
                owner = next((a for a in _ancestors(name) if a in frames_of), name)
                sid, first_fid = frames_of.get(owner, (len(frames_of), 0))
                group = root[name]
                where = f"{path}:{group.name}"
                numbers = np.asarray(group["atomic_numbers"]).reshape(-1)
                position_key = next(k for k in HDF5_POSITION_KEYS if k in group)
                positions = np.asarray(group[position_key])
                frames = len(positions) if positions.ndim == 3 else 0
                if positions.shape != (frames, len(numbers), 3):
                    raise SourceError(f"{where}: {position_key} has shape {list(positions.shape)}, not [frames, "
                                      f"{len(numbers)}, 3] for its {len(numbers)} atomic numbers")
                if "units" in group[position_key].attrs:
                    _check_recorded_unit(f"{where}/{position_key} records its units",
                                         group[position_key].attrs["units"], keys.length_unit, "--length-unit")
                labels, sources = {}, {}
                for label in ("energy", "forces"):
                    key = getattr(keys, label) or located.get(label) or next(
                        (k for k in HDF5_DEFAULT_KEYS[label] if k in group), None)
                    if keys.drops(label) or key is None or (key not in group and getattr(keys, label) is None):
                        continue  # (an entry without it: convert's check of the labels says so)
                    if key not in group:
                        raise SourceError(f"{where}: {label}: dataset {key!r} not found (available: "
                                          f"{', '.join(group)})")
                    if "units" in group[key].attrs and label == "energy":
                        _check_recorded_unit(f"{where}/{key} records its units", group[key].attrs["units"],
                                             keys.energy_unit, "--energy-unit")
                    elif "units" in group[key].attrs:  # (SPICE's gradient: hartree/bohr)
                        recorded = _unit_text(group[key].attrs["units"])
                        energy, _, length = recorded.rpartition("/")
                        energy = _UNIT_ALIASES.get(energy.strip().lower())
                        length = _UNIT_ALIASES.get(length.strip().lower())
                        if (ENERGY_UNITS.get(energy), LENGTH_UNITS.get(length)) != (
                                ENERGY_UNITS[keys.energy_unit], LENGTH_UNITS[keys.length_unit]):
                            give = (f"give --energy-unit {energy} --length-unit {length}, if its positions are in "
                                    f"{length} too (" if energy in ENERGY_UNITS and length in LENGTH_UNITS else "(")
                            raise SourceError(f"{where}/{key} records its units as {recorded!r}, but it is read as "
                                              f"{keys.energy_unit}/{keys.length_unit}: {give}forces in another length "
                                              "unit than the positions' are not supported: convert them first)")
                    values = _label_array(where, label, key, np.asarray(group[key], dtype=np.float64), frames,
                                          len(numbers))
                    labels[label] = -values if key.endswith("gradient") else values
                    located.setdefault(label, key)
                    sources[label] = key + " (negated: a gradient)" * key.endswith("gradient")
                known = next((units for prefix, units in HDF5_KNOWN_UNITS.items()
                              if any(key.startswith(prefix) for key in located.values())), None)
                recorded = any("units" in group[key].attrs for key in (position_key, *located.values()) if key in group)
                if known and not warned and not recorded:
                    warned = True
                    _warn_unrecorded_units(path, *known, keys)
                frames_of[owner] = (sid, first_fid + frames)
                for item in _conformations(where, positions, numbers, labels, sources, report, keys, sid,
                                           first_fid=first_fid):
                    bar.update()
                    yield item


def _ancestors(name: str) -> list[str]:
    """The HDF5 groups a group's path `name` (relative, "." for the root) is inside, innermost first."""
    parts = name.split("/")
    return [*("/".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)), *(["."] if name != "." else [])]


# ----- pickled OC20 / JMP LMDBs --------------------------------------------------------------


class PygData:
    """Stand-in for every torch_geometric class met while unpickling: holds the object state."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state)

    def fields(self) -> dict:
        """The data attributes: `_store._mapping` (PyG >= 2) or the plain __dict__ (PyG 1)."""
        store = self.__dict__.get("_store")
        if store is not None:
            mapping = store.__dict__.get("_mapping", store.__dict__) if isinstance(store, PygData) else store
            return dict(mapping)
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def _load_storage(data: bytes):
    # torch pickles a tensor's storage as torch.save bytes; weights_only refuses anything else.
    return torch.load(io.BytesIO(data), weights_only=True)


class _TensorClass:
    """torch.Tensor as a pickle names it: an argument of _rebuild_from_type_v2 (a tensor with
    attributes), never a callable (torch.Tensor(4, 3) is uninitialised process memory)."""


def _rebuild_from_type(func, new_type, args, state):
    return torch._tensor._rebuild_from_type_v2(func, torch.Tensor if new_type is _TensorClass else new_type,
                                               args, state)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "Size"), ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles OC20/JMP Data objects without torch_geometric and refuses any other global
    (so a hostile pickle cannot name os.system); storages load with torch's weights_only."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "torch_geometric":
            return PygData
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage
        if (module, name) == ("torch", "Tensor"):
            return _TensorClass
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        # numpy >= 2 pickles dtypes as numpy.dtypes.Float64DType etc. No dotted names: protocol 4
        # resolves them attribute by attribute (numpy.dtypes.__builtins__.get reaches exec).
        if module in ("numpy", "numpy.dtypes") and "." not in name:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and issubclass(found, np.dtype):
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def unpickle_data(value: bytes) -> dict:
    """One LMDB value (a pickled PyG Data or a dict) -> {name: value} of its fields."""
    obj = _RestrictedUnpickler(io.BytesIO(value)).load()
    if isinstance(obj, PygData):
        return obj.fields()
    if isinstance(obj, dict):
        return dict(obj)
    raise fmt.DataError(f"expected a torch_geometric Data object or a dict, got {type(obj).__name__}")


def _pyg_entry(fields: dict, keys: KeyMap, report: ConvertReport) -> dict:
    """Take the structure, the mapped labels, sid and fid (_take_identifiers) from a Data object's fields;
    everything else (edge_index, cell_offsets, distances: jmp_ext.graphs recomputes graphs)
    is left out unless named as a property."""
    values = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in fields.items()
              if v is not None}
    missing = [k for k in ("pos", "atomic_numbers") if k not in values]
    if missing:
        raise fmt.DataError(f"missing field(s) {', '.join(missing)}")
    n = len(values["atomic_numbers"])
    cell = np.asarray(values.get("cell", np.zeros((3, 3))), dtype=np.float64).reshape(3, 3)
    entry = {
        "pos": values["pos"],
        "atomic_numbers": values["atomic_numbers"],
        "cell": cell,
        # OC20/OC22 structures are periodic with vacuum and carry no pbc field.
        "pbc": np.asarray(values.get("pbc", np.full(3, cell.any()))).reshape(-1),  # [1,3] too
        "tags": oc20_tags(values.get("tags", np.zeros(n))),  # (the ASE sources' rule)
        "fixed": values.get("fixed", np.zeros(n, bool)),
    }
    natoms = values.get("natoms")
    if natoms is not None and int(np.asarray(natoms).reshape(-1)[0]) != n:
        raise fmt.DataError(f"natoms is {int(np.asarray(natoms).reshape(-1)[0])} but there are "
                            f"{n} atomic numbers")
    _take_labels(entry, {"": values}, keys, report, pickled=True)
    if "energy" in entry:
        entry["energy"] = np.asarray(entry["energy"]).reshape(())
    _take_identifiers(entry, values, report, None)
    for name, key in keys.properties.items():
        if key not in values:
            raise MissingProperty(name, f"property {name!r}: key {key!r} not found ({_available({'': values})})")
        entry[name] = np.asarray(values[key]).reshape(-1).squeeze()
    return keys.to_ev_angstrom(entry)


def _in_subdirectories(path: Path, *patterns: str) -> str:
    """The end of a message about a directory without source files at its top: where, one level
    down, there are some (OMat24 comes as train/<subset>/*.aselmdb), or nothing."""
    nested = next((found for pattern in patterns if (found := sorted(path.glob(f"*/{pattern}")))), None)
    return f"; it holds them in subdirectories, such as {nested[0].parent}: convert each" if nested else ""


def lmdb_files(path: Path) -> list[Path]:
    """The LMDB files of an LMDB dataset path: a file, a directory of *.lmdb (OC20's), or one
    LMDB environment directory (py-lmdb's default layout, dir/data.mdb)."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.lmdb")) or sorted(path.glob("data.mdb"))
    if not files:
        raise FileNotFoundError(f"{path}: no .lmdb, .aselmdb, extxyz or xyz files (nor an LMDB environment's "
                                f"data.mdb){_in_subdirectories(path, '*.aselmdb', '*.lmdb', '*.extxyz*', '*.xyz*')}")
    return files


def iter_pickled_lmdb(path: Path, keys: KeyMap, report: ConvertReport, progress: bool = False
                      ) -> Iterator[tuple[str, object]]:
    """(where, entry or exception) for every entry of an OC20/JMP LMDB, in file then key order.

    Entries are stored under the keys "0", "1", ... and the optional "length" key holds their
    number. Any other key ("00" would be a second entry 0), and a "length" that disagrees with
    the number of entries (a truncated or merged file), is an exception yielded before the
    entries."""
    for file in lmdb_files(path):
        env = fmt.open_lmdb_readonly(file)  # (a truncated file is an error, not a SIGBUS)
        try:
            with env.begin() as txn:
                numbered, length = [], None
                for key in txn.cursor().iternext(values=False):
                    if key.isdigit() and str(int(key)).encode() == key:
                        numbered.append((int(key), key))
                    elif key == b"length":
                        length = txn.get(key)
                    else:
                        yield f"{file} key {key!r}", fmt.DataError(
                            "unexpected key: entries are stored under the keys 0, 1, ... (and "
                            "their number under 'length')")
                if length is not None and (error := _length_error(length, len(numbered))):
                    yield f"{file} key 'length'", error
                numbered.sort()
                with tqdm(numbered, desc=str(file), unit="entry", disable=not progress) as entries:
                    for index, key in entries:
                        where = f"{file} entry {index}"
                        try:
                            yield where, _pyg_entry(unpickle_data(txn.get(key)), keys, report)
                        except Exception as error:
                            yield where, error
        finally:
            env.close()


def _length_error(value: bytes, count: int) -> fmt.DataError | None:
    """What is wrong with a "length" value (a pickled int) for a file of `count` entries."""
    try:
        length = _RestrictedUnpickler(io.BytesIO(value)).load()
    except Exception as error:
        return fmt.DataError(f"is not a pickled entry count ({error})")
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool):
        return fmt.DataError(f"is not an entry count but a {type(length).__name__}")
    if length != count:
        return fmt.DataError(f"says {length} entries, but the file holds {count}")
    return None


def _refuse_jmp_ext(src: Path) -> None:
    """Our own datasets are LMDBs too. Read as pickles, they would fail with a puzzling
    "invalid load key", after the user was asked to --allow-pickle for nothing."""
    for file in lmdb_files(src):
        try:
            with closing(fmt.open_lmdb_readonly(file)) as env, env.begin() as txn:
                cursor = txn.cursor()
                ours = cursor.first() and cursor.value().startswith(fmt.MAGIC)
        except fmt.DataError:  # not an LMDB at all, or truncated: reading it will say so
            continue
        if ours:
            raise fmt.DataError(f"{file} holds jmp_ext entries: {src} is (part of) a jmp_ext "
                                f"dataset already, which needs no conversion; use its directory "
                                f"(the one with {fmt.META_FILE}) as it is")


# ----- driver ----------------------------------------------------------------------------------


def reference_subtraction_applies(kind: str, energy_unit: str) -> bool:
    """Whether OC20 S2EF's reference energies (eV, in extxyz files' frame logs) can be subtracted
    from a source of format `kind` read in `energy_unit`."""
    return kind == "ase" and ENERGY_UNITS[energy_unit] == 1.0


def detect_format(src: Path) -> str:
    if src.is_dir():
        held = {".aselmdb (fairchem's ASE LMDBs)": ("ase-db", any(src.glob("*.aselmdb"))),
                ".lmdb (OC20/JMP's)": ("lmdb", any(src.glob("*.lmdb"))),
                "extxyz or xyz": ("ase", bool(structure_files(src)))}
        kinds = {name: kind for name, (kind, present) in held.items() if present}
        if len(kinds) > 1:  # (one kind would be converted, the others left out)
            raise fmt.DataError(f"{src} holds {' and '.join(kinds)} files: put each kind in a directory of its own")
        if kinds:
            return next(iter(kinds.values()))
    # (ase.io would read a .json database without its key-value pairs)
    if src.suffix in (".db", ".json", ".aselmdb"):
        return "ase-db"
    if src.is_dir() or src.suffix == ".lmdb":
        return "lmdb"
    if src.suffix == ".npz":
        return "npz"
    if src.suffix in (".h5", ".hdf5"):
        return "hdf5"
    return "ase"


# Skipped entries a dataset's provenance names (meta.json's info); it counts them all.
_SKIPPED_RECORDED = 100
# eV/Å^3 (80 GPa): a stress above it in most structures is in another unit (kBar, GPa).
PLAUSIBLE_STRESS = 0.5
# Å: JMP's graph cutoff (its pretraining datasets', and the radial basis'). A single atom with no
# periodic image this close is an isolated atom to GemNet-OC.
ISOLATED_ATOM_CUTOFF = 12.0


def _isolated_atom(entry: dict, where: str) -> bool:
    """Whether the single atom of `entry` (normalised) has no periodic image within
    ISOLATED_ATOM_CUTOFF; a DataError if the entry is invalid (its stress aside: an isolated
    atom's stress of zeros is MACE's placeholder)."""
    from jmp_ext.ops import radius_graph

    fmt.validate_entry({k: v for k, v in entry.items() if k != "stress"}, where)
    if not entry["pbc"].any():
        return True
    edges, _, _ = radius_graph(torch.from_numpy(entry["pos"]).double(), ISOLATED_ATOM_CUTOFF,
                               cell=torch.from_numpy(entry["cell"]).double()[None],
                               pbc=torch.from_numpy(entry["pbc"])[None])
    return edges.shape[1] == 0


def convert(src: str | Path, dst: str | Path, *, keys: KeyMap | None = None,
            source_format: str | None = None, allow_pickle: bool = False,
            skip_invalid: bool = False, select: str | None = None, overwrite: bool = False,
            float_dtype=np.float64, shard_size: int = 5000, progress: bool = False,
            subtract_reference: bool = False) -> ConvertReport:
    """Convert `src` into a new dataset at `dst` (atomically).

    source_format: "ase" (extxyz, traj, anything ase.io reads), "ase-db" (ASE databases, and
        fairchem's .aselmdb files with the ase-db-backends package), "lmdb" (pickled OC20/JMP) or
        "npz" (a molecule's trajectory as sGDML and rMD17 store it: iter_npz) or "hdf5"
        (conformations as ANI-1x, Transition1x and SPICE store them: iter_hdf5); default from
        the path: *.db, *.json, *.aselmdb or a directory of .aselmdb files is "ase-db", a
        directory of extxyz / xyz files "ase", another directory or *.lmdb "lmdb", *.npz "npz",
        *.h5 or *.hdf5 "hdf5".
    allow_pickle: required for "lmdb": reading pickles can run code. Globals are restricted to
        torch tensors, numpy arrays and torch_geometric containers, but only convert files
        you trust.
    skip_invalid: skip entries that fail to load or validate (listed in the report) instead of
        stopping at the first one. The first entry written decides the labels: an entry that
        lacks one of them is skipped (whatever else it carries), one that only carries more is
        still an error.
    select: an ASE db query for "ase-db"; the group to read for "hdf5" (Transition1x's data).
    progress: a progress bar of the structures read (tqdm, on stderr).
    subtract_reference: subtract from each energy the reference energy of the OC20 S2EF frame
        log beside its extxyz (frame_log_file), as OC20's S2EF LMDBs and models have it; without,
        a log gives sid and fid alone, and a warning says the energies are total ones.

    A single atom without periodic images within ISOLATED_ATOM_CUTOFF (such as MACE's
    isolated-atom E0 frames, or a periodic code's atom in a large box) is invalid: GemNet-OC
    needs a pair of atoms. Named properties keep the source's units (schema unit "")
    unless keys.property_units converts them. A dataset without any label, or with a stress
    alone, gets a warning that lists the keys the source offers; an energy_unit that converted
    nothing, one too.
    """
    src, keys = Path(src), keys or KeyMap()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    kind = source_format or detect_format(src)
    if select is not None and kind not in ("ase-db", "hdf5"):
        raise ValueError(f"select (an ASE db query, an HDF5 group) applies to ASE databases and HDF5 files, not to "
                         f"a {kind!r} source")
    if subtract_reference and not reference_subtraction_applies(kind, keys.energy_unit):
        raise ValueError("subtract_reference (OC20 S2EF's reference energies, in eV) applies to extxyz files with "
                         f"their frame logs, read in eV, not to a {kind!r} source in {keys.energy_unit}")
    report = ConvertReport()
    if kind == "lmdb":
        _refuse_jmp_ext(src)
        if not allow_pickle:
            how = "--format lmdb" if source_format else "a directory or a .lmdb file"
            raise PermissionError(f"{src} is read as an OC20/JMP LMDB of pickled objects ({how}); unpickling can "
                                  "run code, so pass allow_pickle=True (--allow-pickle) if you trust it (other "
                                  "structure files: --format ase or ase-db)")
        stream = iter_pickled_lmdb(src, keys, report, progress)
    elif kind == "ase-db":
        stream = iter_ase_db(src, keys, report, select, progress)
    elif kind == "ase":
        stream = iter_ase_file(src, keys, report, progress, subtract_reference)
    elif kind == "npz":
        stream = iter_npz(src, keys, report, progress)
    elif kind == "hdf5":
        stream = iter_hdf5(src, keys, report, select, progress)
    else:
        raise ValueError(f"unknown source format {kind!r} (ase, ase-db, lmdb, npz, hdf5)")
    # closing(): a failed conversion also closes the source (its LMDB handles, its file).
    info = {"converted_from": str(src), "source_format": kind,
            "source_units": {"energy": keys.energy_unit, "length": keys.length_unit}}
    labels = first = None  # the labels of the first entry written, and where it came from
    units = {name: "eV" if name in keys.property_units else "" for name in keys.properties}
    with closing(stream), DatasetWriter(dst, overwrite=overwrite, float_dtype=float_dtype,
                                        shard_size=shard_size, info=info, units=units) as writer:
        for where, item in stream:
            try:
                if isinstance(item, Exception):
                    raise item
                if len(item["atomic_numbers"]) == 0:
                    raise fmt.DataError("has no atoms")
                # (validated first: the writer's messages say what is wrong with a cell)
                if len(item["atomic_numbers"]) == 1 and _isolated_atom(fmt.normalize_entry(item, where), where):
                    if "energy" in item:
                        symbol = chemical_symbols[int(item["atomic_numbers"][0])]
                        report.isolated_atom_energies.setdefault(symbol, float(item["energy"]))
                    raise fmt.DataError(f"is a single atom without periodic images within {ISOLATED_ATOM_CUTOFF} Å "
                                        "(MACE's isolated-atom E0 frames are such, and a periodic code's atom in a "
                                        "large box): GemNet-OC needs a pair of atoms within its cutoff; "
                                        "`convert --skip-invalid` skips such entries")
                if labels is not None:
                    _check_labels(item, labels, len(writer), first, kind == "ase-db")
                writer.add(item, where=where)
                if "stress" in item:
                    report.stresses += 1
                    report.implausible_stresses += bool(np.abs(item["stress"]).max() > PLAUSIBLE_STRESS)
                fixed = np.asarray(item["fixed"]).astype(bool)
                if "forces" in item and fixed.any() and not fixed.all():
                    forces = np.asarray(item["forces"])
                    report.fixed_with_forces += 1
                    report.zero_fixed_forces += bool(not forces[fixed].any() and forces[~fixed].any())
                if labels is None:
                    labels, first = set(LABELS) & item.keys(), where
            except Exception as error:
                if isinstance(error, OSError):
                    # (a full disk is no invalid entry: not skipped, which would publish a cut
                    # dataset, nor blamed on the entry being written)
                    raise
                message = str(error) if str(error).startswith(where) else f"{where}: {error}"
                if not skip_invalid or isinstance(error, PartialLabels) and not error.lacking:
                    raise fmt.DataError(message) from error
                report.skipped.append(message)
                if labels is None:  # (a skipped entry fixes no label location, nor where ids come from)
                    report.labels.clear()
                    report.identifiers = None
        report.written = len(writer)
        if not report.written and report.skipped:  # (the writer's "no entries" alone would hide why)
            energies = (f"; isolated-atom energies (eV) met: {report.isolated_atom_energies}"
                        if report.isolated_atom_energies else "")
            raise fmt.DataError(f"{dst}: no entries to write: all {len(report.skipped)} of {src} were skipped, "
                                f"the first as {report.skipped[0]}{energies}")
        # A label is located by the first entry holding it, which may have been skipped.
        report.labels = {label: source for label, source in report.labels.items()
                         if label in (labels or ())}
        # (the first of the entries skipped: millions of NaN-labelled conformations would make a
        # meta.json of hundreds of MB, read at every open)
        writer.info.update(labels=report.labels, skipped=report.skipped[:_SKIPPED_RECORDED],
                           skipped_count=len(report.skipped))
        if report.index_offsets and "sid" not in (report.identifiers or ()):
            writer.info["index_offsets"] = report.index_offsets
        if report.oc20_logs:
            writer.info["oc20_frame_logs"] = {"files": report.oc20_logs,
                                              "reference_energy": "subtracted" if subtract_reference else "kept"}
    found = {label: source for label, source in report.labels.items() if getattr(keys, label) is None}
    if len({"REF_" in source for source in found.values()}) > 1:  # (keys the user named are his choice)
        sources = ", ".join(f"{k} from {v}" for k, v in found.items())
        warn_user(f"{dst}: the labels come from keys of two kinds ({sources}): "
                  f"REF_* keys usually hold the reference method's values and the others another "
                  f"method's; make sure they belong together, or name the keys (--energy-key, ...)")
    if report.written and report.unusable_identifier:
        key, value = report.unusable_identifier
        instead = (f"an entry whose {key} is no integer has {key} -1" if key in (report.identifiers or ())
                   else "the sids are frame indices or row ids instead" if key == "sid" else "no fid is stored")
        warn_user(f"{dst}: the source's {key} {value!r} is no integer, and jmp_ext stores integer identifiers: "
                  f"{instead}. To keep the source's names, map them to integers in the source first")
    if report.written and report.oc20_logs_with_references and not subtract_reference and "energy" in report.labels:
        warn_user(f"{dst}: the energies are the extxyz files' total DFT energies; OC20's S2EF LMDBs and models have "
                  "them minus the reference energies (clean slab and gas-phase adsorbate) that its frame logs list: "
                  "convert with --subtract-reference for those (the logs' sid and fid are read either way)")
    if report.implausible_stresses * 2 > report.stresses:
        warn_user(f"{dst}: {report.implausible_stresses} of the {report.stresses} stresses have a component over "
                  f"{PLAUSIBLE_STRESS} eV/Å^3 (80 GPa): stress is stored in eV/Å^3 (ASE's unit), converted from the "
                  f"source with --energy-unit and --length-unit only; a stress in kBar or GPa (VASP's, or a code's "
                  f"output) needs converting first (1 GPa = 0.00624 eV/Å^3, 1 kBar = 0.000624 eV/Å^3)")
    if report.zero_fixed_forces * 2 > report.fixed_with_forces:
        warn_user(f"{dst}: in {report.zero_fixed_forces} of the {report.fixed_with_forces} structures with fixed "
                  f"atoms, every fixed atom's force is exactly zero: forces with the constraint applied (ASE's "
                  f"atoms.get_forces() zeroes them; get_forces(apply_constraint=False) does not). JMP trains on every "
                  f"atom's force, so the model would learn zero forces on the fixed atoms (the metrics, over the free "
                  f"atoms, would not show it): convert the forces the calculation gave")
    if report.written and "energy" in report.labels and report.free_energy_gap > 1e-6 and keys.energy is None:
        warn_user(f"{dst}: the energy is {report.labels['energy']}, and the source's free_energy differs from it (by "
                  f"up to {report.free_energy_gap:.3g} eV). Forces are the gradient of the free energy (VASP's "
                  f"through ASE: energy is its sigma -> 0 extrapolation); for a model of both (forces: gradient), "
                  f"convert with --energy-key free_energy (OC20's and OC22's released labels are the energy: keep it "
                  f"to compare with their models)")
    if report.written and "forces" in report.labels and "energy" not in report.labels and not keys.drops("energy"):
        warn_user(f"{dst} has forces ({report.labels['forces']}) but no energy: none found under the usual keys "
                  f"({', '.join(keys.candidates('energy', kind == 'lmdb'))}; the first entry's keys, "
                  f"{report.first_keys}). Name it with --energy-key (free_energy, ...), or drop it on purpose "
                  f"with --energy-key none")
    states = {key: sorted(values) for key, values in report.charge_spin.items() if len(values) > 1}
    if report.written and states and report.labels:
        listed = "; ".join(f"{key} {', '.join(map(str, values[:_STATES_LISTED]))}"
                           f"{' ...' if len(values) > _STATES_LISTED else ''}" for key, values in states.items())
        warn_user(f"{dst}: the structures have several charge or spin states ({listed}), which the model does not "
                  f"take (GemNet-OC sees elements and positions only): structures that differ in them alone get "
                  f"contradictory labels. Convert the structures of one state only (split the source by state "
                  f"first)")
    if keys.energy_unit != "eV" and report.written and not report.labels:
        warn_user(f"{dst}: energy_unit {keys.energy_unit} converted nothing (no energy, forces or stress); "
                  f"properties keep their units unless given one (--property NAME:UNIT; from Python "
                  f"KeyMap(property_units=...))")
    # A stress alone is a warning too: no model trains on it alone, so the energy and forces are
    # under keys not searched (GAP's dft_energy, dft_force once were), unless dropped on purpose.
    stress_only = report.labels.keys() == {"stress"} and not (keys.drops("energy") and keys.drops("forces"))
    if report.written and (not report.labels or stress_only) and not keys.properties:
        searched = [k for label in LABELS if not keys.drops(label) and label not in report.labels
                    for k in keys.candidates(label, kind == "lmdb")]
        have = f"only a stress ({report.labels['stress']})" if stress_only else "no labels"
        warn_user(f"{dst} has {have}: none found under the usual keys ({', '.join(searched)}; the first "
                  f"entry's keys, {report.first_keys}). Name them: --energy-key, --forces-key, --stress-key, "
                  f"--property (from Python KeyMap(energy=..., forces=..., properties=...))")
    return report
