"""LmdbDataset: random access to a dataset directory (format.py) as dicts of torch tensors."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from jmp_ext.data import format as fmt


# py-lmdb refuses to open one LMDB file twice in a process, so every LmdbDataset reading a file
# shares one read-only Environment (a fine-tune whose test split is its val split, two tasks on
# one directory). Keyed by the file's identity, (st_dev, st_ino) as py-lmdb checks it, and the
# process that opened it: an environment must not cross a fork. Weak values: an environment
# closes when the last dataset holding it lets go of it.
_SHARED_ENVS: weakref.WeakValueDictionary[tuple[int, int, int], lmdb.Environment] = (
    weakref.WeakValueDictionary())
_SHARED_ENVS_LOCK = threading.Lock()


def _size(file: Path) -> int | None:
    """The size of a file, None when there is none."""
    try:
        return os.path.getsize(file)
    except FileNotFoundError:
        return None


def _contents(file: Path) -> bytes | None:
    """The bytes of a metadata file, None when there is none (read_meta says what is missing)."""
    try:
        return fmt.read_metadata_bytes(file)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _shared_env(file: Path) -> lmdb.Environment:
    """This process's read-only Environment of an LMDB file, opened on first use."""
    stat = os.stat(file)
    pid = os.getpid()
    key = (stat.st_dev, stat.st_ino, pid)
    with _SHARED_ENVS_LOCK:
        env = _SHARED_ENVS.get(key)
        if env is None:
            # Environments inherited through fork must not be used, and py-lmdb still counts
            # them as open: close this process's copies (the parent's stay open) first.
            for inherited_key, inherited in list(_SHARED_ENVS.items()):
                if inherited_key[2] != pid:
                    inherited.close()
                    del _SHARED_ENVS[inherited_key]
            env = fmt.open_lmdb_readonly(file)
            _SHARED_ENVS[key] = env
        return env


class LmdbDataset(Dataset):
    """A jmp_ext dataset directory, one structure per index.

    Args:
        path: dataset directory (meta.json, metadata.npz, data.*.lmdb).
        in_memory: read every entry into RAM once (for small sets; no LMDB access afterwards).

    `ds[i]` is a dict of tensors: pos [n,3] float64 (or the stored float dtype), atomic_numbers
    [n] int64, cell [3,3], pbc [3] bool, tags [n] int64, fixed [n] bool and the stored labels
    (energy [] eV, forces [n,3] eV/Å, stress [3,3] eV/Å^3, named properties). Collate casts
    floats to the training dtype. `ds.natoms` is int64 [len] and `ds.schema` maps each field to
    its dtype, shape and unit; both come from the metadata, so len() and batching never scan.
    `ds.info` is meta.json's provenance (a split's part: "split", the part's name, "split_of"
    and "split_of_id", the path and id of the dataset it was split from, and "split_id", the
    split's), `ds.id` the id of this write of the dataset.

    LMDB handles are opened on construction (so a truncated shard, or one with another number of
    entries than meta.json lists, fails there) and reopened in a new process (DataLoader
    workers, DDP ranks after fork), because an LMDB environment must not cross a fork; a
    reopen fails (DataError) if meta.json or a shard's size is no longer what was read on
    construction (the dataset was replaced meanwhile). Every entry read is checked against the
    schema and metadata.npz. Datasets on the same files in one process share the handles, so a
    directory can be opened any number of times (e.g. as both the val and the test split).
    """

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = Path(path)
        # Taken before meta.json is parsed, and compared once the shards are open (_open): a
        # dataset replaced in between fails here instead of pairing this metadata with the
        # new entries.
        self._meta_bytes = _contents(self.path / fmt.META_FILE)
        meta = fmt.read_meta(self.path)
        self.schema: dict[str, dict] = meta["schema"]
        self.id: str | None = meta.get("id")  # (new with every write; none in older datasets)
        # Provenance: convert's source file, the demo's seed, split's source dataset ("split_of").
        self.info: dict = meta.get("info", {})
        self._shard_files = [self.path / shard["file"] for shard in meta["shards"]]
        self._offsets = np.cumsum([0] + [shard["num_entries"] for shard in meta["shards"]])
        self.natoms = fmt.read_natoms(self.path, meta["num_entries"])
        self._decoder = fmt.EntryDecoder(self.schema)
        self._shard_sizes = [*map(_size, self._shard_files)]
        self._envs: list[lmdb.Environment] | None = None
        self._pid = None
        self._open()
        # In memory: every entry's bytes in one bytearray, entry i at [starts[i], starts[i + 1]). Not a
        # list of bytes objects: DataLoader workers forked from this process share its pages
        # until written, and reading a million objects writes each one's reference count, which
        # gave every worker its own copy (a 1M-entry set: +0.9 GB per worker).
        self._memory: tuple[bytearray, np.ndarray] | None = None
        if in_memory:
            data, starts = bytearray(), np.zeros(len(self) + 1, dtype=np.int64)
            for i in range(len(self)):
                data += self._read(i)
                starts[i + 1] = len(data)
            self._memory = data, starts
            self._close()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        return {name: torch.from_numpy(array) for name, array in self.read(index).items()}

    def read(self, index: int) -> dict[str, np.ndarray]:
        """Entry `index` (0 <= index < len) as numpy arrays."""
        if not 0 <= index < len(self):  # (in memory, a slice past the ends would read as a truncated entry)
            raise IndexError(f"index {index} out of range for {self.path} ({len(self)} entries)")
        if self._memory is not None:
            data, starts = self._memory
            value = memoryview(data)[starts[index]:starts[index + 1]]
        else:
            value = self._read(index)
        try:
            entry = self._decoder.decode(value, int(self.natoms[index]))
        except fmt.DataError as error:
            raise fmt.DataError(f"{self._where(index)}: {error}") from None
        # (the writer refuses these; a file from elsewhere could index past the per-element tables)
        fmt.check_elements(entry["atomic_numbers"], self._where(index))
        return entry

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return f"{self._shard_files[shard]} entry {index - self._offsets[shard]} (dataset index {index})"

    def _open(self) -> None:
        # Before opening: never open the files of a replacement. After: a replacement while
        # opening (in __init__, at any moment since meta.json was read).
        self._check_unchanged()
        # Handles inherited through fork must not be used: _shared_env closes them in this
        # process and hands out this process's own.
        envs = [_shared_env(file) for file in self._shard_files]
        self._check_unchanged()
        # A shard with fewer (or more) entries than meta.json lists (a partial copy, a shard
        # edited by hand) would otherwise fail only when an epoch reaches a missing entry.
        for file, env, expected in zip(self._shard_files, envs, np.diff(self._offsets)):
            if (entries := env.stat()["entries"]) != expected:
                raise fmt.DataError(f"{file} holds {entries} entries, {fmt.META_FILE} says "
                                    f"{expected}: an incomplete copy, or a shard changed since")
        self._envs, self._pid = envs, os.getpid()

    def _check_unchanged(self) -> None:
        """A process (a DataLoader worker) reopens the files by path: had the dataset been
        replaced since it was opened (convert --overwrite), it would decode the new entries
        with the old metadata and schema (another unit, other atom counts) without a word.

        Content, not file identity: device and inode numbers differ between the hosts of a
        network file system and change under FUSE, and `touch` (scratch-purge avoidance)
        changes mtimes, none of which changes a dataset. meta.json holds an id that every
        write draws anew (older datasets: their bytes and shard sizes still tell most
        rewrites apart); a shard replaced on its own shows in its size or entry count."""
        changed = [file for file, size in zip(self._shard_files, self._shard_sizes)
                   if _size(file) != size]
        if _contents(self.path / fmt.META_FILE) != self._meta_bytes:
            changed.append(self.path / fmt.META_FILE)
        if changed:
            raise fmt.DataError(
                f"{self.path} was replaced or changed since it was opened (changed: "
                f"{', '.join(file.name for file in changed)}), so its entries may not match the metadata read then: open the dataset "
                "again (and make new DataLoaders), and do not rewrite a dataset while it is in use")

    def _read(self, index: int) -> bytes:
        if self._envs is None or self._pid != os.getpid():
            self._open()
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        key = str(index - self._offsets[shard]).encode("ascii")
        try:
            with self._envs[shard].begin(buffers=False) as txn:
                value = txn.get(key)
        except lmdb.Error as error:  # (a damaged page: a raw lmdb traceback named no file)
            raise fmt.DataError(f"{self._where(index)}: the LMDB file is damaged ({type(error).__name__}: "
                                f"{error}); rewrite the dataset from its source") from None
        if value is None:
            raise fmt.DataError(f"{self._where(index)}: missing from the LMDB file")
        return value

    def _close(self) -> None:
        # Let go of the shared handles: other datasets on the same files keep using them, and
        # the last one to let go closes them.
        self._envs = None

    def __getstate__(self) -> dict:
        # Pickled into spawned workers: send paths and metadata, never open handles.
        state = self.__dict__.copy()
        state["_envs"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"LmdbDataset({str(self.path)!r}, entries={len(self)}, fields={list(self.schema)})"


class MultiDataset(Dataset):
    """Several datasets concatenated, each entry tagged with `dataset` [] int64 (its position
    in `datasets`, the task index in multi-task pretraining).

    Indices follow the concatenation order TemperatureSampler uses; `natoms` and `sizes` come
    from the members' metadata.
    """

    def __init__(self, datasets: list[LmdbDataset]):
        if not datasets:
            raise ValueError("MultiDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.sizes = np.array([len(ds) for ds in self.datasets], dtype=np.int64)
        self._offsets = np.cumsum(np.concatenate([[0], self.sizes]))
        self.natoms = np.concatenate([ds.natoms for ds in self.datasets])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries")
        which = int(np.searchsorted(self._offsets, index, side="right")) - 1
        entry = self.datasets[which][index - self._offsets[which]]
        entry["dataset"] = torch.tensor(which)
        return entry
