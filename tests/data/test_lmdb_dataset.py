import gc
import json
import multiprocessing
import os
import pickle
import shutil
import stat

import lmdb
import numpy as np
import pytest
import torch
from data_helpers import random_entry

from jmp_ext.data import DataError, DatasetWriter, LmdbDataset, collate, write_dataset
from jmp_ext.data import format as fmt
from jmp_ext.data.dataset import MultiDataset
from jmp_ext.files import write_bytes_atomic


@pytest.fixture
def entries():
    rng = np.random.default_rng(0)
    return [random_entry(rng, stress=True) for _ in range(23)]


def assert_entry_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name].numpy(), np.asarray(value), err_msg=name)


@pytest.mark.parametrize("in_memory", [False, True])
def test_roundtrip_over_shards(tmp_path, entries, in_memory):
    write_dataset(tmp_path / "ds", entries, shard_size=5)
    assert sorted(p.name for p in (tmp_path / "ds").glob("*.lmdb")) == [
        f"data.{i:04d}.lmdb" for i in range(5)]
    ds = LmdbDataset(tmp_path / "ds", in_memory=in_memory)
    assert len(ds) == len(entries)
    np.testing.assert_array_equal(ds.natoms, [len(e["pos"]) for e in entries])
    assert ds.natoms.dtype == np.int64
    for i in [0, 4, 5, 13, 22, -1]:
        assert_entry_equal(ds[i], entries[i])
    assert ds[0]["energy"].shape == () and ds[0]["cell"].shape == (3, 3)
    assert ds.schema["forces"] == {"dtype": "<f8", "shape": ["n", 3], "per_atom": True,
                                   "unit": "eV/Å"}
    assert ds.schema["stress"]["unit"] == "eV/Å^3"
    with pytest.raises(IndexError):
        ds[len(entries)]


def test_natoms_come_from_metadata_npz(tmp_path, entries):
    write_dataset(tmp_path / "ds", entries)
    with np.load(tmp_path / "ds" / "metadata.npz") as npz:  # the file JMP's samplers read
        np.testing.assert_array_equal(npz["natoms"], [len(e["pos"]) for e in entries])
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["format"] == "jmp_ext.lmdb" and meta["version"] == 1
    assert meta["num_entries"] == len(entries)


def test_float32_storage(tmp_path, entries):
    write_dataset(tmp_path / "ds", entries, float_dtype=np.float32)
    entry = LmdbDataset(tmp_path / "ds")[3]
    assert entry["pos"].dtype == torch.float32 and entry["atomic_numbers"].dtype == torch.int64
    np.testing.assert_allclose(entry["pos"].numpy(), entries[3]["pos"], rtol=1e-7)


def test_files_get_the_mode_of_a_plain_open(tmp_path, entries):
    """Group members can read a dataset (no 0600 temp files renamed into place)."""
    old = os.umask(0o022)
    try:
        write_dataset(tmp_path / "ds", entries, shard_size=10)
        write_bytes_atomic(tmp_path / "ds" / "stats.json", b"{}")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ds").iterdir()}
    assert "data.0002.lmdb" in modes and set(modes.values()) == {0o644}


def test_the_writer_makes_no_lock_files(tmp_path, entries):
    """LMDB's lock file is sparse and memory-mapped: where a shard opened on a full disk, touching
    it killed convert with SIGBUS (no message, its temp directory left). A writer's temp
    directory is its own: it needs no lock."""
    write_dataset(tmp_path / "ds", entries, shard_size=10)
    assert not list((tmp_path / "ds").glob("*-lock"))


def test_failed_write_leaves_nothing(tmp_path, entries):
    with pytest.raises(RuntimeError, match="interrupted"):
        with DatasetWriter(tmp_path / "ds") as writer:
            writer.add(entries[0])
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_invalid_entry_aborts_and_names_it(tmp_path, entries):
    entries[7]["forces"] = entries[7]["forces"][:-1]
    with pytest.raises(DataError, match="entry 7: forces has shape"):
        write_dataset(tmp_path / "ds", entries)
    assert list(tmp_path.iterdir()) == []


def test_schema_mismatch(tmp_path, entries):
    del entries[4]["stress"]
    with pytest.raises(DataError, match=r"entry 4: fields differ .*missing \['stress'\]"):
        write_dataset(tmp_path / "ds", entries)


def test_overwrite(tmp_path, entries):
    write_dataset(tmp_path / "ds", entries[:3])
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(tmp_path / "ds", entries)
    write_dataset(tmp_path / "ds", entries, overwrite=True)
    assert len(LmdbDataset(tmp_path / "ds")) == len(entries)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_overwrite_replaces_only_datasets_and_empty_directories(tmp_path, entries):
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty", entries[:2], overwrite=True)
    assert len(LmdbDataset(tmp_path / "empty")) == 2
    (tmp_path / "project" / "raw").mkdir(parents=True)
    (tmp_path / "project" / "raw" / "train.xyz").write_text("precious")
    with pytest.raises(FileExistsError, match=r"project exists and is not a jmp_ext dataset"):
        write_dataset(tmp_path / "project", entries, overwrite=True)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"notes.txt exists and is not a directory"):
        write_dataset(tmp_path / "notes.txt", entries, overwrite=True)
    write_dataset(tmp_path / "ds", entries[:3])
    (tmp_path / "ds" / "README").write_text("precious")
    with pytest.raises(FileExistsError, match=r"ds is a jmp_ext dataset but also holds README"):
        write_dataset(tmp_path / "ds", entries, overwrite=True)
    assert (tmp_path / "project" / "raw" / "train.xyz").read_text() == "precious"
    assert (tmp_path / "notes.txt").read_text() == "precious"
    assert (tmp_path / "ds" / "README").read_text() == "precious"
    assert len(LmdbDataset(tmp_path / "ds")) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directories
    # A `stats` killed while writing stats.json leaves its temporary file, which is the dataset's.
    (tmp_path / "ds" / "README").unlink()
    (tmp_path / "ds" / ".stats.json.57e74b78.tmp").write_text("{")
    write_dataset(tmp_path / "ds", entries, overwrite=True)
    assert len(LmdbDataset(tmp_path / "ds")) == len(entries)
    assert not (tmp_path / "ds" / ".stats.json.57e74b78.tmp").exists()


def test_corrupted_value_names_file_and_entry(tmp_path, entries):
    write_dataset(tmp_path / "ds", entries, shard_size=10)
    env = lmdb.open(str(tmp_path / "ds" / "data.0001.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(b"2"))
        value[-5] ^= 0x55
        txn.put(b"2", bytes(value))
    env.close()
    ds = LmdbDataset(tmp_path / "ds")
    with pytest.raises(DataError, match=r"data.0001.lmdb entry 2 \(dataset index 12\).*checksum"):
        ds[12]
    assert_entry_equal(ds[14], entries[14])


def test_a_shard_missing_entries_fails_on_open(tmp_path, entries):
    """Not when an epoch, hours in, reaches the missing entry."""
    write_dataset(tmp_path / "ds", entries, shard_size=10)
    env = lmdb.open(str(tmp_path / "ds" / "data.0001.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.delete(b"3")
    env.close()
    with pytest.raises(DataError, match=r"data\.0001\.lmdb holds 9 entries, meta\.json says 10: an incomplete copy"):
        LmdbDataset(tmp_path / "ds")


def test_pickled_lmdb_is_not_opened(tmp_path):
    (tmp_path / "oc20").mkdir()
    env = lmdb.open(str(tmp_path / "oc20" / "data.0000.lmdb"), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps({"pos": 1}))
    env.close()
    with pytest.raises(FileNotFoundError, match=rf"convert them with `python -m jmp_ext.data convert {tmp_path}/oc20 "
                                                rf"OUT_DIR --allow-pickle`"):
        LmdbDataset(tmp_path / "oc20")


def test_a_directory_of_source_files_is_named_as_one(tmp_path):
    """OMat24's directory of fairchem ASE LMDBs, or OC20's of S2EF extxyz, given to eval or training: only
    "no meta.json"."""
    (tmp_path / "omat").mkdir()
    (tmp_path / "omat" / "data.0000.aselmdb").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"It holds .aselmdb files \(fairchem's ASE LMDBs, as OMat24's\): "
                                                rf"convert them with `python -m jmp_ext.data convert {tmp_path}/omat "
                                                rf"OUT_DIR`"):
        LmdbDataset(tmp_path / "omat")
    (tmp_path / "s2ef").mkdir()
    (tmp_path / "s2ef" / "0.extxyz.xz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"It holds extxyz or xyz files: convert them into one dataset with "
                                                rf"`python -m jmp_ext.data convert {tmp_path}/s2ef OUT_DIR`"):
        LmdbDataset(tmp_path / "s2ef")


def test_newer_format_version_is_refused(tmp_path, entries):
    write_dataset(tmp_path / "ds", entries)
    meta_file = tmp_path / "ds" / fmt.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["version"] = fmt.FORMAT_VERSION + 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="newer"):
        LmdbDataset(tmp_path / "ds")



def test_datasets_on_one_directory_share_handles(tmp_path, entries):
    """A fine-tune whose test split is its val split, two tasks on one directory: py-lmdb
    refuses to open a file twice in a process, so the datasets share the open files."""
    write_dataset(tmp_path / "ds", entries, shard_size=10)
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    first, second = LmdbDataset(tmp_path / "ds"), LmdbDataset(tmp_path / "link")
    assert_entry_equal(first[3], entries[3])
    assert_entry_equal(second[15], entries[15])
    in_memory = LmdbDataset(tmp_path / "ds", in_memory=True)  # opens, reads all, lets go
    assert_entry_equal(in_memory[22], entries[22])
    assert_entry_equal(first[22], entries[22])
    del first
    gc.collect()
    assert_entry_equal(second[4], entries[4])  # the last user keeps the files open
    second._close()
    assert_entry_equal(LmdbDataset(tmp_path / "ds")[5], entries[5])
    # An overwritten dataset is a new file: an instance of the old one keeps reading the old
    # entries, a new instance reads the new ones.
    old = LmdbDataset(tmp_path / "ds")
    old[0]
    write_dataset(tmp_path / "ds", entries[::-1], shard_size=10, overwrite=True)
    assert_entry_equal(LmdbDataset(tmp_path / "ds")[0], entries[-1])
    assert_entry_equal(old[0], entries[0])


def test_fork_workers_with_two_datasets_on_one_directory(tmp_path, entries):
    write_dataset(tmp_path / "ds", entries, shard_size=7)
    multi = MultiDataset([LmdbDataset(tmp_path / "ds"), LmdbDataset(tmp_path / "ds")])
    multi[0], multi[len(entries)]  # both open in the parent: workers must reopen after fork
    loader = torch.utils.data.DataLoader(multi, batch_size=5, num_workers=2, collate_fn=collate,
                                         multiprocessing_context="fork")
    batches = list(loader)
    expected = [collate([multi[i] for i in range(s, min(s + 5, len(multi)))])
                for s in range(0, len(multi), 5)]
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert_entry_equal(multi.datasets[1][2], entries[2])  # the parent's handles still work

# spawn (what mp.spawn and macOS use) re-imports torch in every worker: tens of seconds.
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers(tmp_path, entries, context):
    write_dataset(tmp_path / "ds", entries, shard_size=7)
    ds = LmdbDataset(tmp_path / "ds")
    ds[0]  # open handles in the parent first: workers must not reuse them after fork
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate,
                                         multiprocessing_context=context)
    batches = list(loader)
    expected = [collate([ds[i] for i in range(s, min(s + 4, len(ds)))])
                for s in range(0, len(ds), 4)]
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_workers_refuse_a_replaced_dataset(tmp_path, entries):
    """A worker reopens the shards by path: after `convert --overwrite` replaced the dataset, it
    decoded the new entries with the old metadata (-14.59 eV in the parent, -396.97 in the
    worker: the new file was in Hartree). The files have the same sizes: meta.json's id, new
    with every write, tells them apart."""
    write_dataset(tmp_path / "ds", entries, shard_size=10)
    ds = LmdbDataset(tmp_path / "ds")
    ds[0]
    replaced = [{**e, "energy": e["energy"] * 27.2} for e in entries]
    write_dataset(tmp_path / "ds", replaced, shard_size=10, overwrite=True)
    # A pool, not a DataLoader: a DataLoader takes 5 s to shut down a worker that raised.
    with multiprocessing.get_context("fork").Pool(1) as worker:
        with pytest.raises(DataError, match=r"ds was replaced or changed since it was opened "
                                            r"\(changed: meta.json\).*open the dataset again"):
            worker.apply(ds.read, (0,))
    assert_entry_equal(ds[0], entries[0])  # the parent's handles still read what it opened
    ds._close()  # reopened in this process: the same check
    with pytest.raises(DataError, match="replaced or changed"):
        ds[0]


def test_touched_or_recopied_files_are_the_same_dataset(tmp_path, entries):
    """Identity was (st_dev, st_ino, mtime): `touch` (scratch-purge avoidance) broke every
    worker's reopen, and so would new inode or device numbers (another host of a network file
    system, FUSE), simulated here by copying every file onto itself."""
    write_dataset(tmp_path / "ds", entries, shard_size=10)
    ds = LmdbDataset(tmp_path / "ds")
    ds[0]
    for file in (tmp_path / "ds").iterdir():
        shutil.copy2(file, tmp_path / "copy")
        os.replace(tmp_path / "copy", file)
        os.utime(file, (1e9, 1e9))
    with multiprocessing.get_context("fork").Pool(1) as worker:
        assert_entry_equal({k: torch.from_numpy(v) for k, v in worker.apply(ds.read, (7,)).items()},
                           entries[7])
    ds._close()
    assert_entry_equal(ds[12], entries[12])


def test_a_replaced_dataset_written_before_ids(tmp_path, entries):
    """Datasets written before meta.json held an id are told apart by meta.json's bytes and
    the shards' sizes."""
    def write_without_id(entries):
        write_dataset(tmp_path / "ds", entries, shard_size=30, overwrite=True)
        meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
        del meta["id"]
        (tmp_path / "ds" / "meta.json").write_text(json.dumps(meta))

    write_without_id(entries)
    ds = LmdbDataset(tmp_path / "ds")
    ds[0]
    ds._close()
    ds[0]  # unchanged
    rng = np.random.default_rng(1)
    write_without_id([random_entry(rng, natoms=50, stress=True) for _ in entries])
    ds._close()
    with pytest.raises(DataError, match=r"changed: data.0000.lmdb\)"):
        ds[0]


@pytest.mark.parametrize("when", ["read_natoms", "_shared_env"])
def test_a_dataset_replaced_while_it_is_opened(tmp_path, entries, monkeypatch, when):
    """Replaced after meta.json was read, before or while the shards are opened: the old
    metadata must not be paired with the new entries."""
    import jmp_ext.data.dataset as dataset_module

    write_dataset(tmp_path / "ds", entries, shard_size=10)
    module = fmt if when == "read_natoms" else dataset_module
    original = getattr(module, when)

    def replace_then(*args):
        if not (tmp_path / "done").exists():
            (tmp_path / "done").touch()
            write_dataset(tmp_path / "ds", entries[::-1], shard_size=10, overwrite=True)
        return original(*args)

    monkeypatch.setattr(module, when, replace_then)
    with pytest.raises(DataError, match="replaced or changed since"):
        LmdbDataset(tmp_path / "ds")


def test_damaged_metadata_is_named(tmp_path, entries):
    from jmp_ext.data import load_stats

    write_dataset(tmp_path / "ds", entries)
    load_stats(tmp_path / "ds")
    (tmp_path / "ds" / "stats.json").write_text('{"version": 1, "num_')
    with pytest.raises(DataError, match=r"stats.json is not valid JSON.*--recompute"):
        load_stats(tmp_path / "ds")
    assert load_stats(tmp_path / "ds", recompute=True)["num_entries"] == len(entries)
    (tmp_path / "ds" / "meta.json").write_text("{")
    with pytest.raises(DataError, match="meta.json is not valid JSON"):
        LmdbDataset(tmp_path / "ds")


def _private_memory_of_reading(ds: LmdbDataset) -> int:
    """Bytes of this (forked) process's memory that reading every entry of `ds` made private
    (copied from the parent's pages, or new)."""
    def private() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("Private_Dirty:", "Private_Clean:")))

    for _ in range(10):  # (the allocator's own pages for a decoded entry, first)
        ds.read(len(ds) - 1)
    before = private()
    for i in range(len(ds)):
        ds.read(i)
    return private() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux's /proc memory accounting")
def test_an_in_memory_dataset_stays_shared_with_forked_workers(tmp_path):
    """in_memory held a list of one bytes object per entry: a DataLoader worker forked from the
    process writes each object's reference count as it reads it, so every worker ended up with
    its own copy (an audit: +0.9 GB per worker for 1M entries). One buffer stays shared."""
    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "ds", [random_entry(rng, natoms=60) for _ in range(2000)])
    ds = LmdbDataset(tmp_path / "ds", in_memory=True)
    size = sum((tmp_path / "ds" / shard).stat().st_size for shard in os.listdir(tmp_path / "ds")
               if shard.endswith(".lmdb"))
    assert size > 8e6  # (2000 entries of ~5 KB)
    # (a forked process inherits ds, as a DataLoader worker does; a Pool would send it a pickled copy)
    context = multiprocessing.get_context("fork")
    result = context.SimpleQueue()
    child = context.Process(target=lambda: result.put(_private_memory_of_reading(ds)))
    child.start()
    copied = result.get()
    child.join()
    assert copied < 1e6, copied  # (was 8.2 MB: a page per entry)
