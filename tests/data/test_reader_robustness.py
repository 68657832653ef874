"""Damaged, truncated or foreign dataset files: a DataError naming the file and the problem,
never a crash (SIGBUS), silent garbage or a bare KeyError/IndexError."""

import json
import os
import struct
import zlib

import lmdb
import numpy as np
import pytest
from data_helpers import random_entry

from jmp_ext.data import DataError, LmdbDataset, write_dataset
from jmp_ext.data import format as fmt
from jmp_ext.data.__main__ import main


@pytest.fixture
def dataset(tmp_path):
    """10 entries of 3 atoms each (one header shape, so the decoder's header cache is in play)."""
    rng = np.random.default_rng(0)
    return write_dataset(tmp_path / "ds", [random_entry(rng, natoms=3) for _ in range(10)],
                         shard_size=5)


def put(file, key: bytes, value: bytes):
    env = lmdb.open(str(file), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


# ----- shard files ------------------------------------------------------------------------------


def test_truncated_shard_fails_on_open_not_with_sigbus(tmp_path):
    rng = np.random.default_rng(1)
    path = write_dataset(tmp_path / "ds", [random_entry(rng, natoms=200) for _ in range(20)])
    shard = path / "data.0000.lmdb"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    with pytest.raises(DataError, match=rf"data.0000.lmdb is truncated: {size // 2} bytes, but "
                                        rf"its LMDB header says {size} .*incomplete copy"):
        LmdbDataset(path)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: an incomplete copy"),
    (b"\0" * 100, "is not a readable LMDB file .*MDB_INVALID"),
])
def test_empty_or_foreign_shard(dataset, content, message):
    (dataset / "data.0001.lmdb").write_bytes(content)
    with pytest.raises(DataError, match=f"data.0001.lmdb {message}"):
        LmdbDataset(dataset)


# ----- entries ----------------------------------------------------------------------------------


def crafted(header, data: bytes = bytes(72)) -> bytes:
    """An entry with any header (JSON-able, or its JSON text) and a valid checksum, as a buggy or
    hostile writer makes it."""
    header_bytes = (header if isinstance(header, str) else json.dumps(header)).encode()
    header_bytes += b" " * (-(16 + len(header_bytes)) % 8)
    rest = header_bytes + data
    return struct.pack("<4sIII", b"JMPE", 1, zlib.crc32(rest), len(header_bytes)) + rest


@pytest.mark.parametrize("value, message", [
    (crafted([["pos", "<f8", [-1], 0]]), r"'pos' \(<f8 \[-1\] at byte 0\) does not fit in the "
                                         r"entry's 72 data bytes"),
    (crafted([["pos", "<f8", [3, 3], 8]]), "'pos' .* does not fit"),
    (crafted([["pos", "<f8", [3], -16]]), "'pos' .* does not fit"),  # would read the header
    (crafted([["pos", "<f8", [3], 10**6]]), "'pos' .* does not fit"),
    (crafted([["pos", "|O", [3], 0]]), "dtype '|O' is not a numeric or bool dtype"),
    (crafted({"pos": 1}), "header is malformed"),
    (crafted([["pos", "<f8", "3", 0]]), "not whole numbers"),
    (crafted([["pos", "<f8", [1], 0], ["pos", "<f8", [1], 8]]), "names a field twice"),
    # (these passed the fit check and failed in numpy or torch with a TypeError / ValueError)
    (crafted([["pos", "<f8", [1.0], 0]]), r"'pos' has shape \[1.0\] at byte 0: not whole numbers"),
    (crafted([["pos", "<f8", [1], 8.5]]), "not whole numbers"),
    (crafted([["pos", "<f8", [True], 0]]), "not whole numbers"),
    (crafted([["pos", "<f8", [0, 10**30], 0]]), "'pos' .* does not fit"),
    (crafted([["pos", "<f8", [1] * 40, 0]]), "not whole numbers"),
    (crafted([["pos", ">f8", [1], 0]]), "dtype '>f8' is not a numeric or bool dtype of this machine's byte order"),
    (crafted([["pos", "f16", [1], 0]]), "dtype 'f16' is not"),
    (crafted("[" * 50000 + "]" * 50000), "header is malformed"),
    # (the checksum covers what follows the header length, so it stays valid)
    (crafted([])[:12] + struct.pack("<I", 10**6) + crafted([])[16:],
     "header length 1000000 exceeds the entry's"),
])
def test_malformed_entry_header(value, message):
    with pytest.raises(DataError, match=message):
        fmt.decode_entry(value)


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(forces=e["forces"][:, :2]),
     r"forces is <f8 \[3, 2\], the schema says <f8 \[3, 3\] \(3 atoms in metadata.npz\)"),
    (lambda e: e.update(forces=np.zeros((4, 3))), r"forces is <f8 \[4, 3\]"),
    (lambda e: e.update(atomic_numbers=e["atomic_numbers"].astype(float)),
     r"atomic_numbers is <f8 \[3\], the schema says <i8 \[3\]"),
    (lambda e: e.pop("energy"), r"fields differ from the schema \(missing \['energy'\], extra \[\]"),
    (lambda e: e.update(gap=np.float64(1)), r"fields differ .*\(missing \[\], extra \['gap'\]"),
])
def test_entry_must_match_the_schema(dataset, change, message):
    """Even after entries of the same size were read (the decoder caches checked headers)."""
    entry = LmdbDataset(dataset).read(8)
    change(entry)
    put(dataset / "data.0001.lmdb", b"4", fmt.encode_entry(entry))
    ds = LmdbDataset(dataset)
    for i in range(9):
        ds[i]
    with pytest.raises(DataError, match=rf"data.0001.lmdb entry 4 \(dataset index 9\): {message}"):
        ds[9]


@pytest.mark.parametrize("z, shown", [(119, 119), (200, 200), (0, 0), (-3, -3)])
def test_an_unknown_element_in_a_file_is_named(dataset, z, shown):
    """The writer refuses them; a file from elsewhere with Z = 119 passed the embedding (1..120)
    and indexed past the per-element references with a bare IndexError (200: in stats)."""
    entry = LmdbDataset(dataset).read(9)
    entry["atomic_numbers"][1] = z
    put(dataset / "data.0001.lmdb", b"4", fmt.encode_entry(entry))
    with pytest.raises(DataError, match=rf"data.0001.lmdb entry 4 \(dataset index 9\): unknown element with atomic "
                                        rf"number {shown}$"):
        LmdbDataset(dataset)[9]


def test_a_damaged_lmdb_page_is_a_data_error(dataset):
    """A leaf page whose header says it is a branch page: lmdb's own exception, raised bare
    before, named no file or entry. (Some damage kills the process with SIGBUS inside LMDB's
    memory map, which no reader can catch: README's limitation.)"""
    shard = dataset / "data.0001.lmdb"
    data = bytearray(shard.read_bytes())
    page = 4096 * 2  # pages 0, 1: the meta pages; page 2 holds the five entries (a leaf)
    flags = struct.unpack_from("<H", data, page + 10)[0]
    assert flags & 0x02, "expected a leaf page"  # P_LEAF
    struct.pack_into("<H", data, page + 10, 0x01)  # P_BRANCH
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"data.0001.lmdb entry \d \(dataset index \d\): the LMDB file is damaged "
                                        r"\(\w+Error: .*\); rewrite the dataset from its source"):
        ds = LmdbDataset(dataset)
        for i in range(10):
            ds[i]


# ----- metadata ---------------------------------------------------------------------------------


def edit_meta(path, change):
    meta = json.loads((path / fmt.META_FILE).read_text())
    change(meta)
    (path / fmt.META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(version="2"), "format version '2' is not an integer"),
    (lambda m: m.pop("schema"), "no schema"),
    (lambda m: m.update(num_entries=9), "num_entries is 9 but the shards hold 10"),
    (lambda m: m["shards"][0].update(num_entries=6), "num_entries is 10 but the shards hold 11"),
    (lambda m: m["shards"][1].update(file="../other/data.0000.lmdb"),
     "shard 1 is .*; expected .*a file name in the dataset directory"),
    (lambda m: m.update(shards={}), "shards is {}, not a list"),
    (lambda m: m["schema"].pop("atomic_numbers"), "schema lacks the required field.* atomic_numbers"),
    (lambda m: m["schema"]["pos"].update(dtype="|O"), "schema of field pos is"),
    (lambda m: m["schema"]["forces"].update(shape=[3, "n"]), "schema of field forces is"),
    (lambda m: m["schema"]["forces"].pop("unit"), "schema of field forces is"),  # (info's KeyError)
    (lambda m: m["schema"]["forces"].update(dtype=">f8"), "schema of field forces is"),
    (lambda m: m.update(info=["src.xyz"]), "info is list, not an object of provenance"),
])
def test_damaged_meta_json(dataset, change, message):
    edit_meta(dataset, change)
    with pytest.raises(DataError, match=f"meta.json: {message}"):
        LmdbDataset(dataset)


def test_metadata_json_must_be_an_object(dataset):
    from jmp_ext.data import load_stats

    (dataset / fmt.META_FILE).write_text("[]")
    with pytest.raises(DataError, match="meta.json is a JSON list, not an object"):
        LmdbDataset(dataset)
    (dataset / fmt.STATS_FILE).write_text("[]")
    with pytest.raises(DataError, match="stats.json is a JSON list, not an object.*--recompute"):
        load_stats(dataset)


@pytest.mark.parametrize("write, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "metadata.npz is damaged or incomplete"),
    (lambda f: np.savez(f, n=np.ones(10, int)), "metadata.npz is damaged .*KeyError"),
    (lambda f: np.savez(f, natoms=np.full(10, 3.0)), "natoms is float64 .*not a 1-D integer"),
    (lambda f: np.savez(f, natoms=np.zeros(10, int)), "natoms holds 0"),
    (lambda f: np.savez(f, natoms=np.full(10, 2**63 + 5, np.uint64)), "natoms holds 9223372036854775813, more atoms"),
])
def test_damaged_metadata_npz(dataset, write, message):
    write(dataset / fmt.NATOMS_FILE)
    with pytest.raises(DataError, match=message):
        LmdbDataset(dataset)


def test_cli_reports_damaged_data_in_one_line(dataset, capsys):
    edit_meta(dataset, lambda m: m.update(version="2"))
    assert main(["info", str(dataset)]) == 2
    assert capsys.readouterr().err == (
        f"error: {dataset / fmt.META_FILE}: format version '2' is not an integer\n")
    edit_meta(dataset, lambda m: m.update(version=1))
    (dataset / "data.0001.lmdb").unlink()
    (dataset / "data.0001.lmdb").mkdir()  # lmdb.Error, not a DataError
    assert main(["info", str(dataset)]) == 2
    assert capsys.readouterr().err == f"error: {dataset / 'data.0001.lmdb'} cannot be opened (Is a directory)\n"


# ----- metadata files that are not regular files ------------------------------------------------


@pytest.mark.parametrize("name, kind", [("meta.json", "fifo"), ("meta.json", "zero"), ("metadata.npz", "fifo"),
                                        ("stats.json", "fifo")])
def test_metadata_that_is_no_regular_file_is_refused_not_waited_on(dataset, name, kind):
    """A FIFO as meta.json (or metadata.npz) blocked opening the dataset forever, and a link
    to /dev/zero read without end; both are a DataError now (a stats.json that is none is
    computed again). (SIGALRM turns a hang into a failure.)"""
    import signal

    from jmp_ext.data import load_stats
    from jmp_ext.data.writer import dataset_meta

    (dataset / name).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(dataset / name)
    else:
        (dataset / name).symlink_to("/dev/zero")

    def hung(*_):
        raise TimeoutError(f"reading {name} blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        if name == "stats.json":  # (recomputed, and cached in its place)
            assert load_stats(dataset)["num_entries"] == 10 and (dataset / name).is_file()
            return
        with pytest.raises(DataError, match=rf"{name} is not a regular file"):
            LmdbDataset(dataset)
        if name == "meta.json":
            assert dataset_meta(dataset) is None  # (check_target, before an overwrite)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
