"""Converters into the jmp_ext format from what users have: extxyz (or any file ase.io reads),
ASE databases, and OC20/OC22/JMP-style LMDBs of pickled torch_geometric Data objects.

Every source becomes a stream of (where, entry) pairs; convert() validates and writes them
atomically, stopping at the first bad entry with its file and index, or skipping bad entries
and reporting them (skip_invalid).
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import torch
from ase import Atoms, units
from ase.constraints import FixAtoms, FixCartesian
from ase.stress import voigt_6_to_full_3x3_stress
from tqdm import tqdm

from jmp_ext.data import format as fmt
from jmp_ext.data.writer import DatasetWriter

ENERGY_UNITS = {"eV": 1.0, "meV": 1e-3, "Hartree": units.Hartree, "Ry": units.Ry,
                "kcal/mol": units.kcal / units.mol, "kJ/mol": units.kJ / units.mol}
LENGTH_UNITS = {"Å": 1.0, "A": 1.0, "Bohr": units.Bohr, "nm": 10.0}
LABELS = ("energy", "forces", "stress")


@dataclass(kw_only=True)
class KeyMap:
    """Where labels are found in the source and what units they are in.

    energy, forces, stress: the source's key for each label; None tries the usual names in
        order (energy: REF_energy, energy, y; forces: REF_forces, forces, force; stress:
        REF_stress, stress) in atoms.info / atoms.arrays / the attached calculator (ASE) or
        the Data object (LMDB). The first entry holding a label fixes where it is read from,
        and every later entry must hold it there. Give a key explicitly to pick, e.g.,
        free_energy or y_relaxed; an entry without it is then invalid. "none" drops the label,
        e.g. a stress only some frames carry: every entry must hold the same labels.
    properties: extra per-structure labels, {stored name: source key}.
    energy_unit, length_unit: units of the source (converted to eV and Å; forces and stress
        follow). Named properties are stored unconverted.
    """

    energy: str | None = None
    forces: str | None = None
    stress: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    energy_unit: str = "eV"
    length_unit: str = "Å"

    def __post_init__(self):
        if self.energy_unit not in ENERGY_UNITS:
            raise ValueError(f"energy_unit {self.energy_unit!r} is not one of {list(ENERGY_UNITS)}")
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"length_unit {self.length_unit!r} is not one of {list(LENGTH_UNITS)}")

    def drops(self, label: str) -> bool:
        chosen = getattr(self, label)
        return chosen is not None and chosen.lower() == "none"

    def candidates(self, label: str) -> tuple[str, ...]:
        chosen = getattr(self, label)
        if chosen is not None:
            return (chosen,)
        return {"energy": ("REF_energy", "energy", "y"), "forces": ("REF_forces", "forces", "force"),
                "stress": ("REF_stress", "stress")}[label]

    def to_ev_angstrom(self, entry: dict) -> dict:
        e, length = ENERGY_UNITS[self.energy_unit], LENGTH_UNITS[self.length_unit]
        factors = {"pos": length, "cell": length, "energy": e, "forces": e / length,
                   "stress": e / length**3}
        return {k: np.asarray(v) * factors[k] if k in factors else v for k, v in entry.items()}


@dataclass
class ConvertReport:
    """What a conversion wrote and skipped (entry descriptions with the reason)."""

    written: int = 0
    skipped: list[str] = field(default_factory=list)
    # stored label -> where every entry's label was read, e.g. "info['REF_energy']" (ASE) or
    # "y" (LMDB); fixed by the first entry that has the label
    labels: dict[str, str] = field(default_factory=dict)


# ----- labels ----------------------------------------------------------------------------------


def _take_labels(entry: dict, sources: dict[str, dict], keys: KeyMap, report: ConvertReport
                 ) -> None:
    """Copy energy, forces and stress into `entry` from `sources` ({prefix: mapping}; the
    location of a label is described as prefix[key], or key alone for the prefix "").

    The first entry holding a label fixes its location in report.labels; a later entry holding
    it elsewhere is a DataError, so one dataset never mixes, e.g., REF_energy and energy.
    """
    for label in LABELS:
        if keys.drops(label):
            continue
        found = {(f"{prefix}[{key!r}]" if prefix else key): mapping[key]
                 for key in keys.candidates(label) for prefix, mapping in sources.items()
                 if key in mapping}
        if not found:
            if getattr(keys, label) is not None:
                raise fmt.DataError(f"{label}: key {getattr(keys, label)!r} not found")
            continue
        location = report.labels.setdefault(label, next(iter(found)))
        if location not in found:
            raise fmt.DataError(f"{label} is in {', '.join(found)}, but earlier entries took it "
                                f"from {location}; pick one with --{label}-key (from Python: "
                                f"KeyMap({label}=...))")
        entry[label] = found[location]
    if "stress" in entry:
        entry["stress"] = _stress_3x3(entry["stress"])


def _check_labels(entry: dict, labels: set[str]) -> None:
    """An entry must carry the `labels` of the first one written. The writer would refuse it
    too, but could not say how to drop a label that only some entries carry."""
    for label in LABELS:
        if (label in entry) != (label in labels):
            state = "has" if label in entry else "lacks"
            raise fmt.DataError(f"{state} {label}, unlike the first entry written (every entry must "
                                f"carry the same labels): skip such entries with --skip-invalid, or "
                                f"drop {label} with --{label}-key none (from Python: KeyMap({label}='none'))")


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
    tags = np.asarray(tags, dtype=np.int64)
    return tags if tags.any() else np.full(tags.shape, 2, dtype=np.int64)



def _atoms_entry(atoms: Atoms, keys: KeyMap, report: ConvertReport, sid: int) -> dict:
    n = len(atoms)
    # An atom is fixed when FixAtoms holds it or FixCartesian masks hold all three of its axes
    # (extxyz stores constraints as move_mask, which reads back as FixCartesian).
    fixed_axes = np.zeros((n, 3), bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed_axes[constraint.index] = True
        elif isinstance(constraint, FixCartesian):
            fixed_axes[constraint.index] |= constraint.mask
    entry = {
        "pos": atoms.positions,
        "atomic_numbers": atoms.numbers,
        "cell": atoms.cell.array,
        "pbc": atoms.pbc,
        "tags": oc20_tags(atoms.get_tags()),
        "fixed": fixed_axes.all(axis=1),
        "sid": sid,
    }
    results = atoms.calc.results if atoms.calc is not None else {}
    sources = {"info": atoms.info, "arrays": atoms.arrays, "calculator": results}
    _take_labels(entry, sources, keys, report)
    for name, key in keys.properties.items():
        found = next((where for where, d in sources.items() if key in d), None)
        if found is None:
            raise fmt.DataError(f"property {name!r}: key {key!r} not found")
        entry[name] = sources[found][key]
    return keys.to_ev_angstrom(entry)


def iter_ase_file(path: Path, keys: KeyMap, report: ConvertReport) -> Iterator[tuple[str, object]]:
    """(where, entry or exception) for every structure of a file ase.io reads (extxyz, traj)."""
    from ase.io import iread

    frames = iter(tqdm(iread(str(path), index=":"), desc=str(path), unit="structure"))
    index = 0
    while True:
        where = f"{path} structure {index}"
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as error:  # a parse error ends the file: later frames are unreachable
            yield where, fmt.DataError(f"cannot parse: {error}")
            return
        try:
            yield where, _atoms_entry(atoms, keys, report, index)
        except Exception as error:
            yield where, error
        index += 1


def iter_ase_db(path: Path, keys: KeyMap, report: ConvertReport, select: str | None = None
                ) -> Iterator[tuple[str, object]]:
    """(where, entry or exception) for every row of an ASE database; key_value_pairs and data
    are searched for labels and properties after the calculator results."""
    import ase.db

    with ase.db.connect(str(path)) as db:
        for row in tqdm(db.select(select), total=db.count(select), desc=str(path), unit="row"):
            where = f"{path} row id={row.id}"
            try:
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                atoms.info.update(row.get("data", {}))
                yield where, _atoms_entry(atoms, keys, report, row.id)
            except Exception as error:
                yield where, error


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


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch.nn.parameter", "Parameter"),
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
    """Take the structure, the mapped labels and numeric sid/fid from a Data object's fields;
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
        "tags": values.get("tags", np.full(n, 2)),
        "fixed": values.get("fixed", np.zeros(n, bool)),
    }
    natoms = values.get("natoms")
    if natoms is not None and int(np.asarray(natoms).reshape(-1)[0]) != n:
        raise fmt.DataError(f"natoms is {int(np.asarray(natoms).reshape(-1)[0])} but there are "
                            f"{n} atomic numbers")
    _take_labels(entry, {"": values}, keys, report)
    if "energy" in entry:
        entry["energy"] = np.asarray(entry["energy"]).reshape(())
    for key in ("sid", "fid"):  # identifiers are kept when numeric (OC22 sids are strings)
        if key in values and np.asarray(values[key]).dtype.kind in "iuf":
            entry[key] = np.asarray(values[key]).reshape(())
    for name, key in keys.properties.items():
        if key not in values:
            raise fmt.DataError(f"property {name!r}: key {key!r} not found")
        entry[name] = np.asarray(values[key]).reshape(-1).squeeze()
    return keys.to_ev_angstrom(entry)


def lmdb_files(path: Path) -> list[Path]:
    """The .lmdb files of an LMDB dataset path (a file, or a directory of *.lmdb)."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.lmdb"))
    if not files:
        raise FileNotFoundError(f"{path}: no .lmdb files")
    return files


def iter_pickled_lmdb(path: Path, keys: KeyMap, report: ConvertReport
                      ) -> Iterator[tuple[str, object]]:
    """(where, entry or exception) for every entry of an OC20/JMP LMDB (keys "0".."n-1"; the
    legacy "length" key is skipped), in file then key order."""
    for file in lmdb_files(path):
        env = lmdb.open(str(file), subdir=False, readonly=True, lock=False, readahead=False)
        try:
            with env.begin() as txn:
                numbered = sorted((int(k), k) for k in txn.cursor().iternext(values=False)
                                  if k.isdigit())
                for index, key in tqdm(numbered, desc=str(file), unit="entry"):
                    where = f"{file} entry {index}"
                    try:
                        yield where, _pyg_entry(unpickle_data(txn.get(key)), keys, report)
                    except Exception as error:
                        yield where, error
        finally:
            env.close()


# ----- driver ----------------------------------------------------------------------------------


def detect_format(src: Path) -> str:
    if src.is_dir() or src.suffix == ".lmdb":
        return "lmdb"
    if src.suffix == ".db":
        return "ase-db"
    return "ase"


def convert(src: str | Path, dst: str | Path, *, keys: KeyMap | None = None,
            source_format: str | None = None, allow_pickle: bool = False,
            skip_invalid: bool = False, select: str | None = None, overwrite: bool = False,
            float_dtype=np.float64, shard_size: int = 5000) -> ConvertReport:
    """Convert `src` into a new dataset at `dst` (atomically).

    source_format: "ase" (extxyz, traj, anything ase.io reads), "ase-db", or "lmdb" (pickled
        OC20/JMP); default from the path: a directory or *.lmdb is "lmdb", *.db "ase-db".
    allow_pickle: required for "lmdb": reading pickles can run code. Globals are restricted to
        torch tensors, numpy arrays and torch_geometric containers, but only convert files
        you trust.
    skip_invalid: skip entries that fail to load or validate (listed in the report) instead of
        stopping at the first one.
    select: an ASE db query for "ase-db".
    """
    src, keys = Path(src), keys or KeyMap()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    kind = source_format or detect_format(src)
    report = ConvertReport()
    if kind == "lmdb":
        if not allow_pickle:
            raise PermissionError(f"{src} is an LMDB of pickled objects; unpickling can run code, "
                                  "so pass allow_pickle=True (--allow-pickle) if you trust it")
        stream = iter_pickled_lmdb(src, keys, report)
    elif kind == "ase-db":
        stream = iter_ase_db(src, keys, report, select)
    elif kind == "ase":
        stream = iter_ase_file(src, keys, report)
    else:
        raise ValueError(f"unknown source format {kind!r} (ase, ase-db, lmdb)")
    # closing(): a failed conversion also closes the source (its LMDB handles, its file).
    info = {"converted_from": str(src), "source_format": kind}
    labels = None  # those of the first entry written
    with closing(stream), DatasetWriter(dst, overwrite=overwrite, float_dtype=float_dtype,
                                        shard_size=shard_size, info=info) as writer:
        for where, item in stream:
            try:
                if isinstance(item, Exception):
                    raise item
                if labels is not None:
                    _check_labels(item, labels)
                writer.add(item, where=where)
                if labels is None:
                    labels = set(LABELS) & item.keys()
            except Exception as error:
                message = str(error) if str(error).startswith(where) else f"{where}: {error}"
                if not skip_invalid:
                    raise fmt.DataError(message) from error
                report.skipped.append(message)
        report.written = len(writer)
        writer.info.update(labels=report.labels, skipped=report.skipped)
    return report
