"""Atomic dataset writer: entries go to a hidden temp directory that is renamed into place on
success, so a failed or interrupted write never leaves a directory that looks like a dataset."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
from tqdm import tqdm

from jmp_ext.data import format as fmt
from jmp_ext.files import exchange_paths, fsync_dir, write_atomic, write_bytes_atomic
from jmp_ext.warn import warn_user

_COMMIT_EVERY = 512  # entries per LMDB transaction: large enough to amortise the commit fsync
_INITIAL_MAP_SIZE = 1 << 30  # virtual size only; the file grows with the data and doubles if full


def _described(field: dict) -> str:
    """A schema record's dtype and shape in words: "float64 []", "int64 [n, 3]"."""
    return f"{np.dtype(field['dtype']).name} [{', '.join(map(str, field['shape']))}]"


class DatasetWriter:
    """Write structures into a new dataset directory (format.py), atomically.

        with DatasetWriter("data/train") as writer:
            for atoms in ...:
                writer.add({"pos": ..., "atomic_numbers": ..., ...})

    Args:
        path: the dataset directory to create.
        shard_size: entries per LMDB file (JMP writes 5000).
        float_dtype: dtype floats are stored in (float64 keeps labels exact; float32 halves size);
            energies (the energy, properties in eV) stay float64 (format.normalize_entry).
        units: units of named properties, {name: unit}, recorded in the schema.
        overwrite: replace an existing dataset (or empty directory) at `path`, only once the
            new one is complete; anything else at `path` is never deleted (check_target).
            Without it, close() fails (FileExistsError) if anything appeared at `path` meanwhile.
        info: provenance stored in meta.json under "info" (JSON-serialisable; e.g. the source
            a converter read, the demo seed); may be updated until close().

    Every entry is validated (format.validate_entry); the first entry fixes the schema and every
    later entry must have the same fields, dtypes and shapes.
    """

    def __init__(self, path: str | Path, *, shard_size: int = 5000, float_dtype=np.float64,
                 units: dict[str, str] | None = None, overwrite: bool = False,
                 info: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.path = Path(path)
        self.overwrite = overwrite
        check_target(self.path, overwrite)
        self.shard_size = shard_size
        self.float_dtype = np.dtype(float_dtype)
        self.units = dict(units or {})
        self.info = dict(info or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A killed write leaves its temp directory (as large as the data written); another
        # write of the same path may be running, so they are pointed out, not deleted.
        stale = sorted(str(p) for pattern in (".{}.tmp-*", ".{}.old-*")
                       for p in self.path.parent.glob(pattern.format(glob.escape(self.path.name))))
        if stale:
            warn_user(f"{', '.join(stale)}: left by an interrupted write of {self.path}; delete "
                      "them unless another write of it is running")
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self._schema: dict | None = None
        self._natoms: list[int] = []
        self._shards: list[dict] = []
        self._env: lmdb.Environment | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._failed: BaseException | None = None  # (a rewrite that failed part-way: _rewrite_as_float)
        self._closed = False

    def __len__(self) -> int:
        return len(self._natoms)

    def add(self, entry: dict, where: str | None = None) -> None:
        """Validate, encode and append one structure; `where` names it in errors."""
        if self._failed is not None:
            failed = OSError(f"writing dataset {self.path} failed earlier ({self._failed}); nothing can be added")
            raise failed from self._failed
        where = where or f"entry {len(self._natoms)}"
        entry = fmt.normalize_entry(entry, where, self.float_dtype, self.units)
        natoms = fmt.validate_entry(entry, where)
        self._check_schema(entry, where)
        with self._lmdb_errors():
            if self._env is None or self._shards[-1]["num_entries"] == self.shard_size:
                self._open_shard()
            key = str(self._shards[-1]["num_entries"]).encode("ascii")
            self._pending.append((key, fmt.encode_entry(entry)))
            self._shards[-1]["num_entries"] += 1
            self._natoms.append(natoms)
            if len(self._pending) >= _COMMIT_EVERY:
                self._flush()

    def _check_schema(self, entry: dict[str, np.ndarray], where: str) -> None:
        """Raises a DataError unless `entry` has the first entry's fields, dtypes and shapes. A
        named property given as integers in some entries and as floats in others (a metal's
        band gap written 0, another's 1.2) is stored as floats: this entry's are cast (in place
        of `entry`), or the entries written so far are rewritten."""
        schema = {name: fmt.field_schema(name, array, self.units.get(name))
                  for name, array in entry.items()}
        if self._schema is None:
            self._schema = schema
            return
        if schema.keys() != self._schema.keys():
            extra = sorted(schema.keys() - self._schema.keys())
            lacking = sorted(self._schema.keys() - schema.keys())
            raise fmt.DataError(f"{where}: fields differ from the dataset's first entry "
                                f"(extra {extra}, missing {lacking})")
        widen = []  # (checked first: an entry refused for another field widens nothing)
        for name, field in schema.items():
            first = self._schema[name]
            if field == first:
                continue
            # (normalize_entry fixes the dtypes of every other field: only a property can differ so)
            kinds = {np.dtype(field["dtype"]).kind, np.dtype(first["dtype"]).kind}
            if kinds != {"i", "f"} or field["shape"] != first["shape"]:
                raise fmt.DataError(f"{where}: field {name} is {_described(field)}, the first entry's is "
                                    f"{_described(first)}")
            widen.append((name, field["dtype"]))
        for name, dtype in widen:
            if np.dtype(dtype).kind == "i":
                entry[name] = entry[name].astype(self._schema[name]["dtype"])
            else:
                self._rewrite_as_float(name, dtype)

    def _rewrite_as_float(self, name: str, dtype: str) -> None:
        """Rewrites field `name` of every entry written so far as `dtype` (a float). A failure
        part-way (a full disk) leaves the writer refusing to go on: the entries are half rewritten."""
        try:
            with self._lmdb_errors():
                self._close_shard()
                for shard in self._shards:
                    self._env = self._open_env(shard["file"])
                    with self._env.begin() as txn:
                        for key, value in txn.cursor():
                            entry = fmt.decode_entry(value)
                            entry[name] = entry[name].astype(dtype)
                            self._pending.append((key, fmt.encode_entry(entry)))
                    self._close_shard()
                self._schema[name]["dtype"] = dtype
                if self._shards[-1]["num_entries"] < self.shard_size:  # (the next entries')
                    self._env = self._open_env(self._shards[-1]["file"])
        except BaseException as error:
            self._failed = error
            raise

    @contextmanager
    def _lmdb_errors(self) -> Iterator[None]:
        # LMDB reports a full disk as, e.g., "mdb_txn_commit: Input/output error", naming
        # neither the dataset nor the likely cause.
        try:
            yield
        except lmdb.Error as error:
            full = isinstance(error, lmdb.DiskError) or any(
                text in str(error) for text in ("Input/output error", "No space left"))
            hint = f": is the disk (of {self.path.parent}) full?" if full else ""
            raise OSError(f"writing dataset {self.path} failed ({error}){hint}") from error

    def _open_shard(self) -> None:
        self._close_shard()
        name = f"data.{len(self._shards):04d}.lmdb"
        self._env = self._open_env(name)
        self._shards.append({"file": name, "num_entries": 0})

    def _open_env(self, name: str) -> lmdb.Environment:
        """Shard file `name` of the temp directory, created if new, for writing."""
        # (meminit, the default: the unused part of each page is zeros, not leftover process memory.
        # No lock file: the temp directory is this writer's alone, and LMDB memory-maps a sparse
        # lock file, whose first touch on a full disk kills the process with SIGBUS.)
        return lmdb.open(str(self._tmp / name), subdir=False, map_size=_INITIAL_MAP_SIZE, map_async=True, lock=False)

    def _flush(self) -> None:
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                self._pending = []
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def _close_shard(self) -> None:
        if self._env is not None:
            self._flush()
            self._env.sync(True)
            self._env.close()
            self._env = None

    def close(self) -> Path:
        """Finish the dataset: write metadata, then move the directory into place."""
        if self._closed:
            return self.path
        try:
            if self._failed is not None:
                failed = OSError(f"writing dataset {self.path} failed ({self._failed}); nothing was written")
                raise failed from self._failed
            if not self._natoms:
                raise fmt.DataError(f"{self.path}: no entries to write")
            with self._lmdb_errors():
                self._close_shard()
            # "id": no two writes give the same meta.json, so LmdbDataset tells a rewrite of
            # the same source (another unit, the same sizes) from the dataset it opened.
            meta = {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION,
                    "id": uuid.uuid4().hex, "num_entries": len(self._natoms),
                    "shards": self._shards, "schema": self._schema, "info": self.info}
            write_bytes_atomic(self._tmp / fmt.META_FILE, json.dumps(meta, indent=1).encode())
            write_atomic(self._tmp / fmt.NATOMS_FILE,
                         lambda f: np.savez(f, natoms=np.asarray(self._natoms, dtype=np.int64)))
            replace_dir(self._tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._env is not None:
            self._env.close()
            self._env = None
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_dataset(path: str | Path, entries: Iterable[dict], *, progress: bool = False,
                  total: int | None = None, **writer_args) -> Path:
    """Write an iterable of structures as a dataset (DatasetWriter args as keywords)."""
    with DatasetWriter(path, **writer_args) as writer:
        for entry in tqdm(entries, total=total, disable=not progress, desc=f"writing {path}",
                          unit="entry"):
            writer.add(entry)
    return Path(path)


# What a dataset directory holds (format.py; lock files from older writers), and the temporary
# stats.json that a killed `stats` leaves (jmp_ext.files.write_atomic's name); anything else in it
# is the user's, not ours to delete.
_DATASET_FILES = (fmt.META_FILE, fmt.NATOMS_FILE, fmt.STATS_FILE, "data.*.lmdb", "data.*.lmdb-lock",
                  f".{fmt.STATS_FILE}.*.tmp")


def check_target(path: Path, overwrite: bool) -> None:
    """Raise FileExistsError unless a dataset may be written to `path`: nothing is there, or
    overwrite is set and `path` is an empty directory or a jmp_ext dataset holding only its own
    files. `--overwrite` must never delete a project directory or a source file by mistake."""
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists: --overwrite (from Python: overwrite=True) "
                              "replaces it")
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; --overwrite only replaces "
                              "dataset directories: choose another path, or remove it yourself")
    entries = list(path.iterdir())
    if not entries:
        return
    if dataset_meta(path) is None:
        raise FileExistsError(f"{path} exists and is not a jmp_ext dataset (no {fmt.META_FILE} "
                              f"with format {fmt.FORMAT_NAME!r}); --overwrite only replaces "
                              "datasets: choose another directory, or remove it yourself")
    foreign = sorted(entry.name for entry in entries if not entry.is_file()
                     or not any(fnmatch.fnmatchcase(entry.name, p) for p in _DATASET_FILES))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} is a jmp_ext dataset but also holds {shown}, which "
                              "--overwrite would delete: move them out first")


def dataset_meta(path: Path) -> dict | None:
    """The meta.json of the jmp_ext dataset at `path`; None when `path` is not one."""
    try:
        meta = json.loads(fmt.read_metadata_bytes(path / fmt.META_FILE))
    # No meta.json or no directory, not a regular file (a DataError, a ValueError), or not JSON
    # (UnicodeDecodeError is a ValueError too).
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == fmt.FORMAT_NAME else None


def replace_dir(src: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished directory src to dst; an existing dst (which check_target allows to be
    replaced) is exchanged with src in one step (files.exchange_paths), then deleted. Where the
    filesystem cannot exchange, it is renamed aside first: a failure or an interrupt before src
    is in place puts it back, but a kill -9 between the two renames leaves dst empty, with both
    directories beside it (the next write of dst names them)."""
    old = None
    if dst.exists() or dst.is_symlink():
        # Checked again here, where the deletion happens: dst may have appeared or changed
        # during the write.
        check_target(dst, overwrite)
        if exchange_paths(src, dst):
            fsync_dir(dst.parent)
            shutil.rmtree(src)  # (the old dataset, now)
            return
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        if old is not None:
            os.replace(dst, old)
        os.replace(src, dst)
    except BaseException:
        if old is not None and old.exists() and src.exists():
            os.replace(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old)
