"""The on-disk dataset format (version 1): LMDB shards of pickle-free entries plus metadata.

A dataset is a directory:

    meta.json           {"format": "jmp_ext.lmdb", "version": 1, "num_entries": M,
                         "id": random hex, new with every write (none in older datasets),
                         "shards": [{"file": "data.0000.lmdb", "num_entries": m0}, ...],
                         "schema": {field: {"dtype", "shape", "per_atom", "unit"}},
                         "info": {provenance: source file, converter, demo seed, a split's
                                  source dataset (split_of) and part (split), ...}}
    metadata.npz        natoms: int64 [M], the atom count of every entry in dataset order
                        (the same file and key JMP and fairchem read for atom-balanced batching)
    data.0000.lmdb ...  LMDB files (subdir=False); entry k of a shard is stored under the ASCII
                        key str(k); the dataset's entry i lives in the shard whose cumulative
                        range holds i
    data.0000.lmdb-lock ...  LMDB's lock files, which writers before 2026-12-08 left; not read
    stats.json          optional, written by `python -m jmp_ext.data stats` (see stats.py)

An entry is one structure: a dict of numpy arrays. It is encoded as

    b"JMPE" | uint32 version | uint32 crc32(rest) | uint32 header_len | header | pad | buffers

where header is JSON [[name, dtype, shape, offset], ...], buffers are the arrays' C-order bytes,
each starting at an 8-byte aligned offset from the start of the buffer area. Decoding reads only
numbers (no pickle), so opening a dataset never runs code, and the CRC catches corrupted or
truncated values; a header whose fields do not fit the buffer, or that disagrees with the
dataset's schema, is refused.

Field conventions (units are eV and Å throughout):
    pos [n,3] Å, atomic_numbers [n] int64, cell [3,3] Å (rows = lattice vectors; zeros without a
    cell), pbc [3] bool, tags [n] int64 (0 sub-surface, 1 surface, 2 adsorbate/other), fixed [n]
    bool, energy [] eV (total), forces [n,3] eV/Å, stress [3,3] eV/Å^3 (ASE sign convention),
    sid/fid [] int64 identifiers, and any named property [] or [k] per structure.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import lmdb
import numpy as np

FORMAT_NAME = "jmp_ext.lmdb"
FORMAT_VERSION = 1
META_FILE = "meta.json"
NATOMS_FILE = "metadata.npz"
STATS_FILE = "stats.json"

MAGIC = b"JMPE"  # the first bytes of every entry (convert tells our LMDBs from pickled ones by them)
_PREFIX = struct.Struct("<4sIII")  # magic, entry version, crc32 of the rest, header length
_ALIGN = 8

# Per-atom fields have n as their first dimension; every other field describes the structure.
ATOM_FIELDS = {"pos", "atomic_numbers", "tags", "fixed", "forces"}
REQUIRED_FIELDS = ("pos", "atomic_numbers", "cell", "pbc", "tags", "fixed")
# Labels must be finite; a NaN energy is a broken label, not a value to train on.
LABEL_FIELDS = {"energy", "forces", "stress"}
# What an entry holds besides its labels and properties: the structure and its identifiers.
INPUT_FIELDS = ATOM_FIELDS - LABEL_FIELDS | {"cell", "pbc", "sid", "fid"}
UNITS = {
    "pos": "Å",
    "cell": "Å",
    "energy": "eV",
    "energy_per_atom": "eV",
    "forces": "eV/Å",
    "stress": "eV/Å^3",
}
_FIXED_SHAPES = {"cell": (3, 3), "pbc": (3,), "stress": (3, 3), "energy": (), "sid": (), "fid": ()}
_INT_FIELDS = {"atomic_numbers", "tags", "sid", "fid"}
_BOOL_FIELDS = {"pbc", "fixed"}
MAX_Z = 118
# Atoms per Å^3 above which a periodic structure cannot be matter (diamond 0.18, lithium 0.05):
# about 5x the densest solid, so compressed phases pass and a cell in nm (1000x) does not.
MAX_ATOMS_PER_A3 = 1.0
# Å: two atoms closer than this are one site counted twice (a duplicated atom, a merge of two
# structures) or a unit mix-up; the shortest bond, H2's, is 0.74 Å. The graphs would not pair
# two atoms on the same spot at all, so the model would see one atom silently.
MIN_PAIR_DISTANCE = 0.1


class DataError(ValueError):
    """Bad input data; the message names the file and entry."""


def encode_entry(entry: dict[str, np.ndarray]) -> bytes:
    """Serialise a dict of numpy arrays (numeric or bool, any shape) without pickle."""
    header, chunks, offset = [], [], 0
    for name, array in entry.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray would make scalars 1-D)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"field {name!r}: only numeric and bool arrays are stored, got {array.dtype}")
        header.append([name, array.dtype.str, list(array.shape), offset])
        data = array.tobytes()
        pad = -len(data) % _ALIGN
        chunks.append(data + b"\0" * pad)
        offset += len(data) + pad
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(_PREFIX.size + len(header_bytes)) % _ALIGN)
    rest = header_bytes + b"".join(chunks)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, zlib.crc32(rest), len(header_bytes)) + rest


def decode_entry(value: bytes) -> dict[str, np.ndarray]:
    """Inverse of encode_entry; raises DataError on a corrupted, truncated or malformed value.

    The arrays share one writable buffer (a single copy of `value`).
    """
    buffer, start, header = _unpack(value)
    return _arrays(buffer, start, _parse_header(header, len(buffer) - start))


class EntryDecoder:
    """decode_entry for the entries of one dataset, each checked against the dataset's schema
    (field names, dtypes, shapes with "n" the entry's atom count from metadata.npz).

    Entries with the same atom count share one header, so the parsed and checked header is
    cached: parsing the JSON is the slowest step of decoding, and the checks then cost nothing.
    """

    _MAX_CACHED = 4096  # headers; a dataset has about one per distinct atom count

    def __init__(self, schema: dict):
        self._fields = {name: (np.dtype(field["dtype"]), field["shape"])
                        for name, field in schema.items()}
        self._layouts: dict[tuple[bytes, int, int], tuple] = {}

    def decode(self, value: bytes | memoryview, natoms: int) -> dict[str, np.ndarray]:
        buffer, start, header = _unpack(value)
        key = (header, len(buffer), natoms)
        layout = self._layouts.get(key)
        if layout is None:
            layout = _parse_header(header, len(buffer) - start)
            self._check(layout, natoms)
            if len(self._layouts) < self._MAX_CACHED:
                self._layouts[key] = layout
        return _arrays(buffer, start, layout)

    def _check(self, layout: tuple, natoms: int) -> None:
        names = {name for name, *_ in layout}
        if names != self._fields.keys():
            raise DataError(f"fields differ from the schema (missing "
                            f"{sorted(self._fields.keys() - names, key=str)}, "
                            f"extra {sorted(names - self._fields.keys(), key=str)})")
        for name, dtype, shape, _, _ in layout:
            want_dtype, want_shape = self._fields[name]
            want_shape = tuple(natoms if size == "n" else size for size in want_shape)
            if dtype != want_dtype or shape != want_shape:
                raise DataError(f"{name} is {dtype.str} {list(shape)}, the schema says "
                                f"{want_dtype.str} {list(want_shape)} "
                                f"({natoms} atoms in {NATOMS_FILE})")


def _unpack(value: bytes | memoryview) -> tuple[bytearray, int, bytes]:
    """(a copy of value, where its data area starts, its header's bytes), checksum checked."""
    if len(value) < _PREFIX.size:
        raise DataError(f"entry is truncated ({len(value)} bytes)")
    magic, version, crc, header_len = _PREFIX.unpack_from(value)
    if magic != MAGIC:
        raise DataError("entry is not in jmp_ext format (bad magic; a pickled OC20 LMDB needs "
                        "`python -m jmp_ext.data convert --allow-pickle`)")
    if version > FORMAT_VERSION:
        raise DataError(f"entry has format version {version}; this jmp_ext reads up to {FORMAT_VERSION}")
    buffer = bytearray(value)
    if zlib.crc32(memoryview(buffer)[_PREFIX.size:]) != crc:
        raise DataError("entry is corrupted or truncated (checksum mismatch)")
    start = _PREFIX.size + header_len
    if start > len(buffer):
        raise DataError(f"entry header length {header_len} exceeds the entry's {len(buffer)} bytes")
    return buffer, start, bytes(buffer[_PREFIX.size:start])


def _parse_header(header: bytes, size: int) -> tuple[tuple[str, np.dtype, tuple, int, int], ...]:
    """(name, dtype, shape, count, offset) of every field of an entry with `size` data bytes.

    The checksum only shows the bytes are as written, not that the header is sane, and
    frombuffer trusts it: a shape of [-1] reads the rest of the buffer as the field, a negative
    offset reads the header. So every field must lie inside the data area.
    """
    try:
        layout = []
        for name, dtype, shape, offset in json.loads(header):
            dtype = _dtype(dtype)
            # (whole numbers only: 8.5 or true would pass the arithmetic below; a shape of
            # [0, 1e30] would make numpy refuse the dimension itself)
            if not (_is_int(offset) and isinstance(shape, list) and len(shape) <= _MAX_NDIM
                    and all(_is_int(axis) for axis in shape)):
                raise DataError(f"field {name!r} has shape {str(shape)[:80]} at byte {str(offset)[:40]}: not "
                                "whole numbers")
            count = math.prod(shape)
            end = offset + count * dtype.itemsize
            # (a huge dimension fits beside a 0, and numpy refuses 1e30 outright)
            if min(shape, default=0) < 0 or max(shape, default=0) >= 2**31 or not 0 <= offset <= end <= size:
                raise DataError(f"field {name!r} ({dtype.str} {shape} at byte {offset}) does not "
                                f"fit in the entry's {size} data bytes")
            layout.append((name, dtype, tuple(shape), count, offset))
        if len({field[0] for field in layout}) != len(layout):
            raise DataError("entry header names a field twice")
    except DataError:
        raise
    # A header that is not a list of [name, dtype, shape, offset] fails in the loop (unpacking,
    # arithmetic, hashing) with whatever exception that step raises; one nested thousands of
    # levels deep fails in json with a RecursionError.
    except (ValueError, TypeError, RecursionError) as error:
        raise DataError(f"entry header is malformed ({type(error).__name__}: {error})") from None
    return tuple(layout)


def _arrays(buffer: bytearray, start: int, layout: tuple) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(buffer, dtype, count, start + offset).reshape(shape)
            for name, dtype, shape, count, offset in layout}


# Dimensions of a field's shape: numpy allows 64; no field of a structure has more than 3.
_MAX_NDIM = 32


@functools.cache
def _dtype(name: str) -> np.dtype:
    dtype = np.dtype(name)
    # (native byte order and at most 8 bytes: what torch.from_numpy takes)
    if dtype.kind not in "biuf" or not dtype.isnative or dtype.itemsize > 8:
        raise DataError(f"dtype {name!r} is not a numeric or bool dtype of this machine's byte order")
    return dtype


def field_schema(name: str, array: np.ndarray, unit: str | None = None) -> dict:
    """Schema record of one field: dtype, shape with 'n' for the atom dimension, unit."""
    per_atom = name in ATOM_FIELDS
    shape = ["n", *array.shape[1:]] if per_atom else list(array.shape)
    return {"dtype": array.dtype.str, "shape": shape, "per_atom": per_atom,
            "unit": UNITS.get(name, "") if unit is None else unit}


def check_elements(atomic_numbers: np.ndarray, where: str) -> None:
    """Raises a DataError unless every atomic number is an element, 1..MAX_Z."""
    z = atomic_numbers
    if z.size and (z.min() < 1 or z.max() > MAX_Z):
        raise DataError(f"{where}: unknown element with atomic number {z[(z < 1) | (z > MAX_Z)][0]}")


def as_integers(array: np.ndarray, what: str) -> np.ndarray:
    """`array` as int64; a DataError naming `what` when it holds a fraction, NaN or inf (1.5
    would become 1, inf INT64_MIN)."""
    if array.dtype.kind == "f":
        fractional = ~np.isfinite(array) | (array != np.round(array))
        if fractional.any():
            raise DataError(f"{what} must hold integers, got {array[fractional][0]}")
    return array.astype(np.int64)


def validate_entry(entry: dict[str, np.ndarray], where: str) -> int:
    """Check one structure's fields (shapes, dtypes, elements, finite values); return natoms.

    `where` names the source (file and entry) in the error message.
    """
    missing = [name for name in REQUIRED_FIELDS if name not in entry]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    z = entry["atomic_numbers"]
    if z.ndim != 1 or z.shape[0] == 0:
        raise DataError(f"{where}: atomic_numbers must be a non-empty 1-D array, got shape {z.shape}")
    n = z.shape[0]
    check_elements(z, where)
    for name, array in entry.items():
        if name in ATOM_FIELDS:
            expected = (n, 3) if name in ("pos", "forces") else (n,)
            if array.shape != expected:
                raise DataError(f"{where}: {name} has shape {array.shape}, expected {expected} "
                                f"for {n} atoms")
        elif name in _FIXED_SHAPES:
            if array.shape != _FIXED_SHAPES[name]:
                raise DataError(f"{where}: {name} has shape {array.shape}, expected "
                                f"{_FIXED_SHAPES[name]}")
        elif array.ndim > 1:
            raise DataError(f"{where}: property {name} must be a scalar or a vector, got shape {array.shape}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            kind = "label" if name not in ("pos", "cell") else "field"
            raise DataError(f"{where}: {kind} {name} contains NaN or inf")
    flat = [axis for axis in range(3) if entry["pbc"][axis] and not entry["cell"][axis].any()]
    if flat:
        raise DataError(f"{where}: periodic along axis {flat} (pbc {entry['pbc'].tolist()}) but its lattice "
                        f"vector is zero: a periodic structure needs its cell (extxyz: Lattice=...), a molecule "
                        f"pbc False")
    if entry["pbc"].all():
        # (a cell in nm, or scaled, packs thousands of images of each atom into the cutoff sphere;
        # coplanar lattice vectors have no volume at all)
        volume = abs(float(np.linalg.det(entry["cell"].astype(np.float64))))
        if volume * MAX_ATOMS_PER_A3 < n:
            raise DataError(f"{where}: {dense_cell_problem(n, volume)}")
    _check_pairs(entry, where)
    if "stress" in entry and (not entry["pbc"].any() or np.linalg.det(entry["cell"].astype(np.float64)) == 0):
        # (the trainer would stop at the first batch holding it; without pbc the box is arbitrary,
        # and predict and the calculator give no stress)
        raise DataError(f"{where}: has a stress label but no cell (zero volume) or no periodic axis, where stress "
                        "is undefined (a molecule's stress of zeros is a placeholder): leave such entries out "
                        "(convert --skip-invalid), or drop the stress (convert --stress-key none)")
    if "stress" in entry and not _nearly_symmetric(entry["stress"]):
        raise DataError(f"{where}: stress is not symmetric ({entry['stress'].tolist()}): a stress "
                        "tensor is (asymmetry within 1e-4 of its largest component is symmetrised; "
                        "more suggests another layout than a 3x3 tensor or Voigt order)")
    return n


def _check_pairs(entry: dict[str, np.ndarray], where: str) -> None:
    # (imported here: the search needs torch and the kernels, which the rest of this module does not)
    import torch

    from jmp_ext.graphs import close_pair

    pos, cell = (torch.from_numpy(np.asarray(entry[name], dtype=np.float64)) for name in ("pos", "cell"))
    pair = close_pair(pos, torch.zeros(len(pos), dtype=torch.int64), torch.tensor([len(pos)]), cell[None],
                      torch.from_numpy(np.asarray(entry["pbc"]))[None])
    if pair is not None:
        raise DataError(f"{where}: {close_pair_problem(*pair[1:])}")


def dense_cell_problem(natoms: int, volume: float) -> str:
    """What is wrong with `natoms` atoms in a periodic cell of `volume` Å^3 (< natoms / MAX_ATOMS_PER_A3)."""
    return (f"{natoms} atom(s) in a periodic cell of {volume:.3g} Å^3 (the densest solids hold ~0.2 atoms/Å^3): "
            "cells are in Å, their rows are lattice vectors, and those must not be coplanar (a relaxation or MD "
            "with a cell filter that shrank the cell this far has left the model's domain)")


def close_pair_problem(i: int, j: int, distance: float) -> str:
    """What is wrong with atoms i <= j of a structure `distance` Å apart (< MIN_PAIR_DISTANCE)."""
    pair = f"atom {i} is {distance:.3g} Å from its own periodic image" if i == j else \
        f"atoms {i} and {j} are {distance:.3g} Å apart"
    return (f"{pair}, closer than any two atoms can be ({MIN_PAIR_DISTANCE} Å): a duplicated atom, or positions in "
            "another unit than Å?")


def _nearly_symmetric(stress: np.ndarray) -> bool:
    """Symmetric up to a file's rounding or a code's noise (codes that print an unsymmetrised
    3x3 tensor, constrained MD's virials): 1e-4 of the largest component, and 1e-6 eV/Å^3 =
    0.16 MPa. (False for NaN, which validation reports as such.)"""
    return bool(np.abs(stress - stress.T).max() <= 1e-4 * np.abs(stress).max() + 1e-6)


def normalize_entry(entry: dict, where: str, float_dtype=np.float64,
                    units: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Cast a structure's fields to the stored dtypes (ints int64, flags bool, floats float_dtype,
    except energies, the fields whose unit is eV (UNITS, else `units` of named properties, e.g.
    QM9's U_0): float64 always, as float32 would round a total energy of 1e4-1e5 eV by 0.5-8
    meV, the size of the errors a model is fitted to).

    A [3,3] stress with a tolerated asymmetry (_nearly_symmetric) is stored symmetrised: a
    stress tensor is symmetric, and so a dataset written before this tolerance can be split
    (rewritten) again; a grossly asymmetric one is left for validate_entry to refuse."""
    units = units or {}
    out = {}
    for name, value in entry.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise DataError(f"{where}: field {name} is not numeric (dtype {array.dtype})")
        if array.dtype.kind == "b" and (name in LABEL_FIELDS or name in ("pos", "cell")):
            # (an extxyz energy=T read as True: stored, it was an energy of 1 eV)
            raise DataError(f"{where}: {name} is a boolean ({array.tolist()}), not a number")
        if name in _INT_FIELDS:
            array = as_integers(array, f"{where}: {name}")
        elif name in _BOOL_FIELDS:
            array = array.astype(bool)
        elif array.dtype.kind in "biu" and name not in LABEL_FIELDS and name not in ("pos", "cell"):
            # Integer properties (class labels) stay integers (DatasetWriter stores a property of
            # integers in some entries and floats in others as floats).
            array = array.astype(np.int64)
        else:
            energy = units.get(name, UNITS.get(name)) == "eV"
            array = array.astype(np.float64 if energy else float_dtype)
            if name == "stress" and array.shape == (3, 3) and _nearly_symmetric(array):
                array = (array + array.T) / 2
        out[name] = array
    return out


def read_meta(path: str | Path) -> dict:
    """Read and check a dataset directory's meta.json.

    The layout is checked here so that a damaged or hand-edited file fails on open, naming
    what is wrong, not later as a KeyError or an IndexError in the middle of an epoch.
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if not meta_path.is_file():
        hint = ""
        parts = sorted(p.parent.name for p in path.glob(f"*/{META_FILE}")) if path.is_dir() else []
        if parts:  # (a split's parent: data/mine for data/mine/train)
            hint = f" It holds the datasets {', '.join(parts)}: give one of them, e.g. {path / parts[0]}."
        elif path.is_dir() and (any(path.glob("*.extxyz*")) or any(path.glob("*.xyz*"))):
            hint = (" It holds extxyz or xyz files: convert them into one dataset with `python -m jmp_ext.data "
                    f"convert {shlex.quote(str(path))} OUT_DIR`.")
        elif path.is_dir() and any(path.glob("*.aselmdb")):
            hint = (" It holds .aselmdb files (fairchem's ASE LMDBs, as OMat24's): convert them with `python -m "
                    f"jmp_ext.data convert {shlex.quote(str(path))} OUT_DIR`.")
        elif path.is_dir() and any(path.glob("*.lmdb")):
            hint = (" It holds .lmdb files: if they are OC20/JMP-style pickled LMDBs, convert them "
                    f"with `python -m jmp_ext.data convert {shlex.quote(str(path))} OUT_DIR --allow-pickle`.")
        elif path.is_file():
            hint = " It is a file: `python -m jmp_ext.data convert` makes a dataset of a structure file."
        raise FileNotFoundError(f"{path} is not a jmp_ext dataset (no {META_FILE}).{hint}")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    missing = [key for key in ("version", "num_entries", "shards", "schema") if key not in meta]
    if missing:
        raise DataError(f"{meta_path}: no {', '.join(missing)}")
    if not _is_count(meta["version"]):
        raise DataError(f"{meta_path}: format version {meta['version']!r} is not an integer")
    if meta["version"] > FORMAT_VERSION:
        raise DataError(f"{meta_path}: format version {meta['version']} is newer than this "
                        f"jmp_ext reads ({FORMAT_VERSION}); upgrade jmp_ext")
    if not _is_count(meta["num_entries"]):
        raise DataError(f"{meta_path}: num_entries {meta['num_entries']!r} is not a count")
    _check_shards(meta["shards"], meta["num_entries"], meta_path)
    _check_schema(meta["schema"], meta_path)
    if not isinstance(meta.get("info", {}), dict):
        raise DataError(f"{meta_path}: info is {type(meta['info']).__name__}, not an object of provenance")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return _is_int(value) and value >= 0


def _check_shards(shards, num_entries: int, meta_path: Path) -> None:
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{meta_path}: shards is {shards!r}, not a list of shards")
    for i, shard in enumerate(shards):
        file = shard.get("file") if isinstance(shard, dict) else None
        # A bare file name: shards outside the directory would be read as this dataset's
        # after a copy or a hand edit (a path like ../other/data.0000.lmdb).
        if (not isinstance(file, str) or Path(file).name != file or file in ("", "..")
                or not _is_count(shard.get("num_entries"))):
            raise DataError(f"{meta_path}: shard {i} is {shard!r}; expected "
                            '{"file": a file name in the dataset directory, "num_entries": a count}')
    total = sum(shard["num_entries"] for shard in shards)
    if total != num_entries:
        raise DataError(f"{meta_path}: num_entries is {num_entries} but the shards hold {total}")


def _check_schema(schema, meta_path: Path) -> None:
    if not isinstance(schema, dict):
        raise DataError(f"{meta_path}: schema is {schema!r}, not an object of fields")
    missing = [name for name in REQUIRED_FIELDS if name not in schema]
    if missing:
        raise DataError(f"{meta_path}: schema lacks the required field(s) {', '.join(missing)}")
    for name, field in schema.items():
        try:
            _dtype(field["dtype"])
            shape = field["shape"]
            valid = isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(
                _is_count(size) or (size == "n" and axis == 0) for axis, size in enumerate(shape)) and isinstance(
                field["unit"], str)
        # np.dtype raises TypeError for an unknown name; field may be no object at all.
        except (DataError, KeyError, TypeError):
            valid = False
        if not valid:
            raise DataError(f"{meta_path}: schema of field {name} is {str(field)[:200]}; expected "
                            '{"dtype": a numeric numpy dtype, "shape": [sizes, "n" first for '
                            'per-atom fields], "unit": a string, ...}')


# A metadata file (meta.json, stats.json) larger than this is no dataset's.
MAX_METADATA_BYTES = 64 << 20


def read_metadata_bytes(file: Path) -> bytes:
    """The bytes of a metadata file, which must be a regular file of at most MAX_METADATA_BYTES:
    a FIFO would block forever, /dev/zero never end (DataError). FileNotFoundError when there
    is none."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO opens at once, to be refused)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{file} is not a regular file")
        if info.st_size > MAX_METADATA_BYTES:
            raise DataError(f"{file} holds {info.st_size} bytes, more than any dataset's metadata")
        return f.read(MAX_METADATA_BYTES + 1)


def read_json(file: Path) -> dict:
    """A metadata file's JSON object; a truncated or hand-damaged file is a DataError naming it."""
    hint = "rewrite it (stats.json: `python -m jmp_ext.data stats DIR --recompute`)"
    try:
        value = json.loads(read_metadata_bytes(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{file} is not valid JSON ({error}); {hint}") from None
    if not isinstance(value, dict):
        raise DataError(f"{file} is a JSON {type(value).__name__}, not an object; {hint}")
    return value


def read_natoms(path: str | Path, num_entries: int) -> np.ndarray:
    """The atom count of every entry, from metadata.npz (no scan of the data)."""
    file = Path(path) / NATOMS_FILE
    if file.exists() and not file.is_file():  # (a FIFO would block np.load forever)
        raise DataError(f"{file} is not a regular file")
    try:
        # (opened here: np.load leaves a file it opened open when the zip is damaged)
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as npz:
            natoms = npz["natoms"]
    except FileNotFoundError:
        raise
    # BadZipFile: truncated (the zip directory is at the end); KeyError: no natoms array;
    # ValueError: not a zip (np.load then refuses to unpickle) or a damaged array header;
    # MemoryError: a header that claims more entries than memory holds.
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError, MemoryError) as error:
        raise DataError(f"{file} is damaged or incomplete ({type(error).__name__}: {error})"
                        ) from None
    if natoms.ndim != 1 or natoms.dtype.kind not in "iu":
        raise DataError(f"{file}: natoms is {natoms.dtype} {list(natoms.shape)}, "
                        "not a 1-D integer array")
    if natoms.shape != (num_entries,):
        raise DataError(f"{file}: natoms has {natoms.shape[0]} entries, meta.json says {num_entries}")
    if num_entries and natoms.min() < 1:
        raise DataError(f"{file}: natoms holds {natoms.min()}; every entry has at least one atom")
    if num_entries and natoms.max() > 2**31:  # (a uint64 count would turn negative as int64)
        raise DataError(f"{file}: natoms holds {natoms.max()}, more atoms than any structure has")
    return natoms.astype(np.int64)


def open_lmdb_readonly(file: str | Path) -> lmdb.Environment:
    """Open an LMDB file (subdir=False) for reading; a truncated or non-LMDB file is a DataError.

    LMDB maps the file into memory, so reading a page past the end of a truncated file (a
    half-finished copy or download) kills the process with SIGBUS: the file must hold every
    page its header counts, which this checks before anything is read.
    """
    size = os.path.getsize(file)
    if size == 0:
        raise DataError(f"{file} is empty: an incomplete copy or download?")
    try:
        env = lmdb.open(str(file), subdir=False, readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=1)
    except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as error:
        message = str(error).removeprefix(f"{file}: ")
        raise DataError(f"{file} is not a readable LMDB file ({message})") from None
    except lmdb.Error as error:  # (e.g. too many open files: every shard of a dataset is open)
        raise DataError(f"{file} cannot be opened ({str(error).removeprefix(f'{file}: ')})") from error
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if size < needed:
        env.close()
        raise DataError(f"{file} is truncated: {size} bytes, but its LMDB header says {needed} "
                        "(an incomplete copy or download?)")
    return env
