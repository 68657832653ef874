"""The on-disk dataset format (version 1): LMDB shards of pickle-free entries plus metadata.

A dataset is a directory:

    meta.json           {"format": "jmp_ext.lmdb", "version": 1, "num_entries": M,
                         "shards": [{"file": "data.0000.lmdb", "num_entries": m0}, ...],
                         "schema": {field: {"dtype", "shape", "per_atom", "unit"}},
                         "info": {provenance: source file, converter, demo seed, ...}}
    metadata.npz        natoms: int64 [M], the atom count of every entry in dataset order
                        (the same file and key JMP and fairchem read for atom-balanced batching)
    data.0000.lmdb ...  LMDB files (subdir=False); entry k of a shard is stored under the ASCII
                        key str(k); the dataset's entry i lives in the shard whose cumulative
                        range holds i
    stats.json          optional, written by `python -m jmp_ext.data stats` (see stats.py)

An entry is one structure: a dict of numpy arrays. It is encoded as

    b"JMPE" | uint32 version | uint32 crc32(rest) | uint32 header_len | header | pad | buffers

where header is JSON [[name, dtype, shape, offset], ...], buffers are the arrays' C-order bytes,
each starting at an 8-byte aligned offset from the start of the buffer area. Decoding reads only
numbers (no pickle), so opening a dataset never runs code, and the CRC catches corrupted or
truncated values.

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
import struct
import zlib
from pathlib import Path

import numpy as np

FORMAT_NAME = "jmp_ext.lmdb"
FORMAT_VERSION = 1
META_FILE = "meta.json"
NATOMS_FILE = "metadata.npz"
STATS_FILE = "stats.json"

_MAGIC = b"JMPE"
_PREFIX = struct.Struct("<4sIII")  # magic, entry version, crc32 of the rest, header length
_ALIGN = 8

# Per-atom fields have n as their first dimension; every other field describes the structure.
ATOM_FIELDS = {"pos", "atomic_numbers", "tags", "fixed", "forces"}
REQUIRED_FIELDS = ("pos", "atomic_numbers", "cell", "pbc", "tags", "fixed")
# Labels must be finite; a NaN energy is a broken label, not a value to train on.
LABEL_FIELDS = {"energy", "forces", "stress"}
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
    return _PREFIX.pack(_MAGIC, FORMAT_VERSION, zlib.crc32(rest), len(header_bytes)) + rest


def decode_entry(value: bytes) -> dict[str, np.ndarray]:
    """Inverse of encode_entry; raises DataError on a corrupted or truncated value.

    The arrays share one writable buffer (a single copy of `value`).
    """
    if len(value) < _PREFIX.size:
        raise DataError(f"entry is truncated ({len(value)} bytes)")
    magic, version, crc, header_len = _PREFIX.unpack_from(value)
    if magic != _MAGIC:
        raise DataError("entry is not in jmp_ext format (bad magic; a pickled OC20 LMDB needs "
                        "`python -m jmp_ext.data convert --allow-pickle`)")
    if version > FORMAT_VERSION:
        raise DataError(f"entry has format version {version}; this jmp_ext reads up to {FORMAT_VERSION}")
    buffer = bytearray(value)
    if zlib.crc32(memoryview(buffer)[_PREFIX.size:]) != crc:
        raise DataError("entry is corrupted or truncated (checksum mismatch)")
    start = _PREFIX.size + header_len
    header = json.loads(bytes(buffer[_PREFIX.size:start]))
    entry = {}
    for name, dtype, shape, offset in header:
        # math.prod and the dtype cache: this loop runs for every field of every entry read.
        count = math.prod(shape)
        entry[name] = np.frombuffer(buffer, _dtype(dtype), count, start + offset).reshape(shape)
    return entry


@functools.cache
def _dtype(name: str) -> np.dtype:
    return np.dtype(name)


def field_schema(name: str, array: np.ndarray, unit: str | None = None) -> dict:
    """Schema record of one field: dtype, shape with 'n' for the atom dimension, unit."""
    per_atom = name in ATOM_FIELDS
    shape = ["n", *array.shape[1:]] if per_atom else list(array.shape)
    return {"dtype": array.dtype.str, "shape": shape, "per_atom": per_atom,
            "unit": UNITS.get(name, "") if unit is None else unit}


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
    if z.min() < 1 or z.max() > MAX_Z:
        bad = z[(z < 1) | (z > MAX_Z)][0]
        raise DataError(f"{where}: unknown element with atomic number {bad}")
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
    return n


def normalize_entry(entry: dict, where: str, float_dtype=np.float64) -> dict[str, np.ndarray]:
    """Cast a structure's fields to the stored dtypes (ints int64, flags bool, floats float_dtype)."""
    out = {}
    for name, value in entry.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise DataError(f"{where}: field {name} is not numeric (dtype {array.dtype})")
        if name in _INT_FIELDS:
            if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
                raise DataError(f"{where}: {name} must hold integers")
            array = array.astype(np.int64)
        elif name in _BOOL_FIELDS:
            array = array.astype(bool)
        elif array.dtype.kind in "biu" and name not in LABEL_FIELDS and name not in ("pos", "cell"):
            array = array.astype(np.int64)  # integer properties (class labels) stay integers
        else:
            array = array.astype(float_dtype)
        out[name] = array
    return out


def read_meta(path: str | Path) -> dict:
    """Read and check a dataset directory's meta.json."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        hint = ""
        if path.is_dir() and any(path.glob("*.lmdb")):
            hint = (" It holds .lmdb files: if they are OC20/JMP-style pickled LMDBs, convert them "
                    "with `python -m jmp_ext.data convert SRC DST --allow-pickle`.")
        raise FileNotFoundError(f"{path} is not a jmp_ext dataset (no {META_FILE}).{hint}")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise DataError(f"{meta_path}: format version {meta['version']} is newer than this "
                        f"jmp_ext reads ({FORMAT_VERSION}); upgrade jmp_ext")
    return meta


def read_json(file: Path) -> dict:
    """A metadata file's JSON; a truncated or hand-damaged file is a DataError naming it."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{file} is not valid JSON ({error}); rewrite it (stats.json: "
                        "`python -m jmp_ext.data stats DIR --recompute`)") from None


def read_natoms(path: str | Path, num_entries: int) -> np.ndarray:
    """The atom count of every entry, from metadata.npz (no scan of the data)."""
    file = Path(path) / NATOMS_FILE
    with np.load(file, allow_pickle=False) as npz:
        natoms = npz["natoms"].astype(np.int64)
    if natoms.shape != (num_entries,):
        raise DataError(f"{file}: natoms has {natoms.shape[0]} entries, meta.json says {num_entries}")
    return natoms
