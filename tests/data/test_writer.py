"""DatasetWriter's last step: moving the finished dataset into place, and its failures."""

import json
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from data_helpers import random_entry

from jmp_ext.data import DatasetWriter, LmdbDataset, write_dataset
from jmp_ext.data.format import DataError


@pytest.fixture
def entries():
    rng = np.random.default_rng(0)
    return [random_entry(rng) for _ in range(6)]


def energies(path):
    return [entry["energy"].item() for entry in LmdbDataset(path)]


def no_temp_directories(path: Path) -> bool:
    return not [p for p in path.iterdir() if p.name.startswith(".")]


def test_a_dataset_written_meanwhile_is_kept_without_overwrite(tmp_path, entries):
    """Two writers into one path: the second to finish must not replace the first's dataset."""
    first = DatasetWriter(tmp_path / "ds")
    with pytest.warns(UserWarning, match="interrupted write"):  # (the first one's temp directory)
        second = DatasetWriter(tmp_path / "ds")
    for entry in entries[:3]:
        first.add(entry)
    for entry in entries[3:]:
        second.add(entry)
    first.close()
    with pytest.raises(FileExistsError, match="ds already exists: --overwrite"):
        second.close()
    assert energies(tmp_path / "ds") == [e["energy"] for e in entries[:3]]
    assert no_temp_directories(tmp_path)
    with DatasetWriter(tmp_path / "ds", overwrite=True) as third:
        for entry in entries[3:]:
            third.add(entry)
    assert energies(tmp_path / "ds") == [e["energy"] for e in entries[3:]]


def test_an_existing_dataset_is_exchanged_in_one_step(tmp_path, entries, monkeypatch):
    """Renaming the old dataset aside, then the new one into place, left the path empty to a
    kill -9 between the two (both directories were kept beside it). Where the filesystem can,
    the two are exchanged atomically (renameat2 RENAME_EXCHANGE): no rename runs at all."""
    from jmp_ext.files import exchange_paths

    write_dataset(tmp_path / "ds", entries[:3])
    real_replace = os.replace

    def replace(src, dst):  # (a file's atomic write renames too)
        assert not Path(src).is_dir(), f"renamed the directory {src} -> {dst}"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_dataset(tmp_path / "ds", entries, overwrite=True)
    monkeypatch.undo()
    assert energies(tmp_path / "ds") == [e["energy"] for e in entries] and no_temp_directories(tmp_path)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").mkdir()
    assert exchange_paths(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").read_text() == "a"
    assert not exchange_paths(tmp_path / "a", tmp_path / "missing") and (tmp_path / "a").is_dir()


@pytest.mark.parametrize("failure", [OSError("rename failed"), KeyboardInterrupt()])
def test_failed_swap_puts_the_old_dataset_back(tmp_path, entries, monkeypatch, failure):
    """Where the filesystem cannot exchange two directories, the old dataset is renamed away
    before the new one is renamed into place: a failure (or Ctrl-C) between the two must not
    leave the path empty."""
    from jmp_ext.data import writer

    write_dataset(tmp_path / "ds", entries[:3])
    monkeypatch.setattr(writer, "exchange_paths", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".ds.tmp-"):  # the new dataset moving into place
            raise failure
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(type(failure)):
        write_dataset(tmp_path / "ds", entries, overwrite=True)
    monkeypatch.undo()
    assert energies(tmp_path / "ds") == [e["energy"] for e in entries[:3]]
    assert no_temp_directories(tmp_path)


def test_full_disk_names_the_dataset(tmp_path, entries):
    """A file-size limit fails LMDB's writes as a full disk does (mdb_txn_commit: I/O error)."""
    rng = np.random.default_rng(1)
    many = [random_entry(rng, natoms=11) for _ in range(300)]  # ~250 kB in one shard
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, limits[1]))
    try:
        with pytest.raises(OSError, match=r"dataset .*ds failed \(.*\): is the disk") as error:
            write_dataset(tmp_path / "ds", many)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert type(error.value.__cause__).__module__ == "lmdb"
    assert not list(tmp_path.iterdir())


def test_leftovers_of_a_killed_write_are_pointed_out_not_deleted(tmp_path, entries):
    """A SIGKILLed conversion leaves its temp directory, as large as what it had written; it may
    also be another conversion's, still running, so the next write names it and keeps it."""
    leftovers = [tmp_path / ".ds.old-89abcdef", tmp_path / ".ds.tmp-0123abcd"]  # (as listed: sorted)
    for path in leftovers:
        path.mkdir()
    (tmp_path / ".other.tmp-0123abcd").mkdir()  # another dataset's
    with pytest.warns(UserWarning) as caught:
        write_dataset(tmp_path / "ds", entries)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{leftovers[0]}, {leftovers[1]}: left by an interrupted write of {tmp_path / 'ds'}")
    assert all(path.is_dir() for path in leftovers) and len(LmdbDataset(tmp_path / "ds")) == len(entries)


def test_the_same_entries_give_the_same_bytes(tmp_path, entries):
    """LMDB's pages hold only what was written: the files are byte-reproducible (checksums,
    rsync) and never carry leftover process memory, such as the text of another input file."""
    write_dataset(tmp_path / "a", entries)
    garbage = [os.urandom(4096) for _ in range(2000)]  # (fresh heap contents for the second write)
    del garbage
    write_dataset(tmp_path / "b", entries)
    shards = sorted(p.name for p in (tmp_path / "a").glob("data.*.lmdb"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "b").glob("data.*.lmdb"))
    for name in shards + ["metadata.npz"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_every_shard_is_on_disk_before_the_dataset_is_published(tmp_path, entries, monkeypatch):
    """A power cut after the swap must not leave a published dataset with unwritten pages:
    each shard is fsynced (env.sync(True)) before the directory is moved into place."""
    import lmdb

    from jmp_ext.data import writer

    synced, events, open_lmdb = set(), [], lmdb.open

    class Env:
        def __init__(self, path, **kwargs):
            self._env, self._path = open_lmdb(path, **kwargs), Path(path).name

        def sync(self, force=False):
            self._env.sync(force)
            if force:
                synced.add(self._path)

        def __getattr__(self, name):
            return getattr(self._env, name)

    replace = writer.replace_dir
    monkeypatch.setattr(writer.lmdb, "open", Env)
    monkeypatch.setattr(writer, "replace_dir", lambda *args: (events.append(set(synced)), replace(*args)))
    write_dataset(tmp_path / "d", entries, shard_size=2)
    assert events == [{f"data.{i:04d}.lmdb" for i in range(3)}]


def test_a_property_of_integers_and_floats_is_stored_as_floats(tmp_path, entries):
    """A metal's band gap is often written 0 beside the others' 1.2: the first entry's integer
    fixed the schema and the first float ended the write (and --skip-invalid kept the metals
    alone). Entries written before the first float are rewritten, across shards; an integer
    after it is cast."""
    gaps = [0, 2, 0, 1.25, 3, 0.5]
    with DatasetWriter(tmp_path / "ds", shard_size=2) as writer:
        for entry, gap in zip(entries, gaps):
            writer.add({**entry, "gap": gap, "label": len(writer)})
        writer.add({**entries[0], "gap": 7, "label": 6})  # (into the last shard, reopened)
    ds = LmdbDataset(tmp_path / "ds")
    assert ds.schema["gap"]["dtype"] == "<f8" and ds.schema["label"]["dtype"] == "<i8"
    assert [ds[i]["gap"].item() for i in range(len(ds))] == [0.0, 2.0, 0.0, 1.25, 3.0, 0.5, 7.0]
    assert [ds[i]["label"].item() for i in range(len(ds))] == list(range(7))  # (integers stay so)
    for i, entry in enumerate([*entries, entries[0]]):
        assert np.array_equal(ds[i]["pos"].numpy(), entry["pos"])
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text(encoding="utf-8"))
    assert [shard["num_entries"] for shard in meta["shards"]] == [2, 2, 2, 1]


def test_a_field_of_another_shape_is_named_in_words(tmp_path, entries):
    with DatasetWriter(tmp_path / "ds") as writer:
        writer.add({**entries[0], "dipole": np.zeros(3)})
        with pytest.raises(DataError, match=r"entry 1: field dipole is float64 \[2\], the first entry's is "
                                            r"float64 \[3\]"):
            writer.add({**entries[1], "dipole": np.zeros(2)})


def test_a_rewrite_that_fails_part_way_ends_the_write(tmp_path, entries, monkeypatch):
    """A full disk while rewriting the entries written so far left them half rewritten, and a
    caller that went on (convert --skip-invalid took it for an invalid entry) published them."""
    import jmp_ext.data.writer as writer_module

    writer = DatasetWriter(tmp_path / "ds", shard_size=2)
    for k, entry in enumerate(entries[:4]):
        writer.add({**entry, "gap": k})
    opened = writer_module.lmdb.open

    def disk_full_on_the_second_shard(path, **kwargs):
        if path.endswith("data.0001.lmdb"):
            raise OSError(28, "No space left on device")
        return opened(path, **kwargs)

    monkeypatch.setattr(writer_module.lmdb, "open", disk_full_on_the_second_shard)
    with pytest.raises(OSError, match="No space left on device"):
        writer.add({**entries[4], "gap": 0.5})
    monkeypatch.setattr(writer_module.lmdb, "open", opened)
    with pytest.raises(OSError, match=r"ds failed earlier \(.*No space left on device\); nothing can be added"):
        writer.add({**entries[5], "gap": 1})
    with pytest.raises(OSError, match=r"ds failed \(.*No space left on device\); nothing was written"):
        writer.close()
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == []


def test_an_entry_refused_for_one_field_widens_no_other(tmp_path, entries):
    with DatasetWriter(tmp_path / "ds") as writer:
        writer.add({**entries[0], "label": 1, "dipole": np.zeros(3)})
        with pytest.raises(DataError, match="field dipole is float64 \\[2\\]"):
            writer.add({**entries[1], "label": 0.5, "dipole": np.zeros(2)})
        writer.add({**entries[2], "label": 2, "dipole": np.zeros(3)})
    ds = LmdbDataset(tmp_path / "ds")
    assert ds.schema["label"]["dtype"] == "<i8" and [ds[i]["label"].item() for i in range(2)] == [1, 2]
