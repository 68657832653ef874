import json
import os
import re
import shutil
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
import torch
from data_helpers import random_entry

from jmp_ext.data import LmdbDataset, load_stats, write_dataset
from jmp_ext.data import format as fmt
from jmp_ext.data.__main__ import main
from jmp_ext.data.split import fraction_indices, read_index_file, split_dataset


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    entries = [random_entry(rng) for _ in range(40)]
    for i, entry in enumerate(entries):
        entry["sid"] = i
    write_dataset(tmp_path / "all", entries, units={"sid": "index"})
    return tmp_path / "all"


def test_fraction_indices():
    parts = fraction_indices(103, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=4)
    # cumulative bounds round(0.8*103)=82, round(0.9*103)=93, 103
    assert [len(p) for p in parts.values()] == [82, 11, 10]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(103))
    again = fraction_indices(103, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=4)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = fraction_indices(103, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=5)
    assert not np.array_equal(parts["val"], other["val"])
    assert sum(map(len, fraction_indices(10, {"a": 0.5}).values())) == 5
    with pytest.raises(ValueError, match="sum to at most 1"):
        fraction_indices(10, {"a": 0.7, "b": 0.5})


def test_split_copies_entries_and_shares_train_stats(source, tmp_path):
    parts = fraction_indices(40, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    split_dataset(source, tmp_path / "out", parts)
    full = LmdbDataset(source)
    for name, indices in parts.items():
        ds = LmdbDataset(tmp_path / "out" / name)
        assert len(ds) == len(indices)
        assert ds.schema["sid"]["unit"] == "index"
        for k, i in enumerate(indices):
            for key, value in full[i].items():
                assert torch.equal(ds[k][key], value)
        assert load_stats(tmp_path / "out" / name)["num_entries"] == len(parts["train"])
        # Provenance: the trainer tells a val split of the dataset it trains on by it.
        assert ds.info == {"split_of": str(source.resolve()), "split_of_id": full.id, "split": name,
                           "split_id": LmdbDataset(tmp_path / "out" / "train").info["split_id"]}


def test_index_files(source, tmp_path):
    (tmp_path / "idx.json").write_text(json.dumps({"train": [0, 5, 7], "test": [1]}))
    parts = read_index_file(tmp_path / "idx.json", 40)
    assert parts["train"].tolist() == [0, 5, 7] and parts["test"].tolist() == [1]
    np.savez(tmp_path / "idx.npz", train=np.array([3, 2]), val=np.array([9]))
    assert read_index_file(tmp_path / "idx.npz", 40)["train"].tolist() == [3, 2]
    (tmp_path / "cut.npz").write_bytes((tmp_path / "idx.npz").read_bytes()[:50])  # (a BadZipFile traceback)
    with pytest.raises(ValueError, match=r"cut.npz: not a readable .npz index file \(BadZipFile"):
        read_index_file(tmp_path / "cut.npz", 40)
    (tmp_path / "bad.json").write_text(json.dumps({"train": [0, 5], "test": [5]}))
    with pytest.raises(ValueError, match="index 5 is in both 'train' and 'test'"):
        read_index_file(tmp_path / "bad.json", 40)
    (tmp_path / "bad.json").write_text(json.dumps({"train": [0, 40]}))
    with pytest.raises(ValueError, match="index 40 outside"):
        read_index_file(tmp_path / "bad.json", 40)
    (tmp_path / "bad.json").write_text('{"train": [0, 1], "test": [2], "train": [3]}')  # (json keeps the last)
    with pytest.raises(ValueError, match=r"part\(s\) \['train'\] given twice"):
        read_index_file(tmp_path / "bad.json", 40)
    # A list, or not JSON at all: named, not an AttributeError or a codec's message.
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r'bad.json must hold a JSON object \{"train": \[indices\], ...\}, got a list'):
        read_index_file(tmp_path / "bad.json", 40)
    (tmp_path / "bad.json").write_bytes(b"\x80\x81")
    with pytest.raises(ValueError, match="bad.json: not a JSON index file"):
        read_index_file(tmp_path / "bad.json", 40)


def test_cli_split(source, tmp_path, capsys):
    assert main(["split", str(source), str(tmp_path / "cli"), "--fractions",
                 "train=0.75,val=0.25", "--seed", "3"]) == 0
    assert len(LmdbDataset(tmp_path / "cli" / "train")) == 30
    assert len(LmdbDataset(tmp_path / "cli" / "val")) == 10
    assert main(["split", str(source), str(tmp_path / "cli")]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    # An index file and fractions: which one was meant? (the fractions were silently ignored)
    (tmp_path / "idx.json").write_text(json.dumps({"train": [0, 1], "val": [2]}))
    assert main(["split", str(source), str(tmp_path / "ix"), "--index-file", str(tmp_path / "idx.json"),
                 "--fractions", "train=0.5,test=0.5"]) == 2
    assert "give --fractions or --index-file, not both" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


def test_split_checks_every_part_before_writing(source, tmp_path, capsys):
    """5 entries at 0.8/0.1/0.1 leave val empty: train was written, then the split failed."""
    write_dataset(tmp_path / "small", [random_entry(np.random.default_rng(i)) for i in range(5)])
    assert main(["split", str(tmp_path / "small"), str(tmp_path / "out")]) == 2
    assert "part 'val' would be empty (5 entries in all)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out" / "val").mkdir(parents=True)  # the second part's directory is taken
    parts = fraction_indices(40, {"train": 0.5, "val": 0.5})
    with pytest.raises(FileExistsError, match="val already exists"):
        split_dataset(source, tmp_path / "out", parts)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["val"]
    assert main(["split", str(tmp_path / "small"), str(tmp_path / "out"),
                 "--fractions", "train=0.6,val=0.4", "--overwrite"]) == 0  # val: empty, replaced
    assert [len(LmdbDataset(tmp_path / "out" / n)) for n in ("train", "val")] == [3, 2]


def test_split_refuses_to_write_over_its_source(tmp_path, capsys):
    """`split sp/train sp --overwrite` replaced sp/train with its own train part, then read the
    other parts from what was left."""
    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "sp" / "train", [random_entry(rng) for _ in range(20)])
    (tmp_path / "link").symlink_to(tmp_path / "sp")
    for out in ("sp", "link"):
        assert main(["split", str(tmp_path / "sp" / "train"), str(tmp_path / out),
                     "--overwrite"]) == 2
        assert (f"part 'train' would be written to {tmp_path / out / 'train'}, which is the "
                "source itself") in capsys.readouterr().err
    assert len(LmdbDataset(tmp_path / "sp" / "train")) == 20
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["train"]
    # (`split ds ds` wrote the parts into the dataset's own directory)
    for out in (tmp_path / "sp" / "train", tmp_path / "sp" / "train" / "parts"):
        assert main(["split", str(tmp_path / "sp" / "train"), str(out)]) == 2
        assert "the parts would be written inside the source dataset" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sp" / "train").iterdir() if p.is_dir()) == []



def part_sids(out):
    """{name: sids of its entries} of every dataset in out (the source's sid is its index)."""
    return {p.name: [int(entry["sid"]) for entry in LmdbDataset(p)] for p in sorted(out.iterdir())
            if (p / "meta.json").exists()}


def test_overwrite_leaves_no_part_of_an_older_split(source, tmp_path, capsys):
    """A train/val re-split with --overwrite of a train/val/test split left the old test beside
    the new train (270 of its 300 entries in it), with the old train's statistics."""
    out = source.parent  # beside the source, which is no part of a split
    assert main(["split", str(source), str(out), "--seed", "0"]) == 0
    before = part_sids(out)
    assert main(["split", str(source), str(out), "--fractions", "train=0.9,val=0.1", "--seed",
                 "1", "--overwrite"]) == 2
    assert (f"{out} also holds the dataset(s) test, which this split does not write"
            in capsys.readouterr().err)
    assert part_sids(out) == before
    shutil.rmtree(out / "test")
    assert main(["split", str(source), str(out), "--fractions", "train=0.9,val=0.1", "--seed",
                 "1", "--overwrite"]) == 0
    after = part_sids(out)
    assert sorted(after) == ["all", "train", "val"] and len(after["train"]) == 36
    assert not set(after["train"]) & set(after["val"])
    assert sorted(p.name for p in out.iterdir()) == ["all", "train", "val"]  # no temporaries


class Interrupt:
    """Calls `function` as it is, but raises KeyboardInterrupt on its call number `at`, before
    or after doing what it does, and before its call number `again` (a second Ctrl-C)."""

    def __init__(self, function, at: int, after: bool = False, again: int | None = None):
        self.function, self.at, self.after, self.again, self.calls = function, at, after, again, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if (self.calls == self.at and not self.after) or self.calls == self.again:
            raise KeyboardInterrupt
        result = self.function(*args, **kwargs)
        if self.calls == self.at:
            raise KeyboardInterrupt
        return result


# Calls of os.replace in a re-split of three parts: 3 old parts moved aside, 3 new moved in.
@pytest.mark.parametrize("at, after", [(k, after) for k in range(1, 7) for after in (False, True)])
def test_interrupted_resplit_keeps_the_old_split(source, tmp_path, monkeypatch, at, after):
    """An interrupted re-split left the new train beside the old val and test (242/300 and
    251/300 entries shared): whenever it stops, the old split stays whole, and nothing else."""
    import jmp_ext.data.split as split_module

    out = tmp_path / "out"
    split_dataset(source, out, fraction_indices(40, {"train": 0.5, "val": 0.25, "test": 0.25}))
    before = part_sids(out)
    # (split.py's os only: the writer renames too)
    monkeypatch.setattr(split_module, "os", SimpleNamespace(replace=Interrupt(os.replace, at, after)))
    with pytest.raises(KeyboardInterrupt):
        split_dataset(source, out, fraction_indices(40, {"train": 0.6, "val": 0.2, "test": 0.2},
                                                    seed=1), overwrite=True)
    assert part_sids(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    assert load_stats(out / "test")["num_entries"] == 20  # the old train's statistics


# Interrupted while the new parts move in (calls 4-6), then again during the rollback.
@pytest.mark.parametrize("at, after", [(k, after) for k in range(4, 7) for after in (False, True)])
@pytest.mark.parametrize("again", range(1, 6))
def test_an_interrupted_rollback_leaves_no_old_part_beside_a_new_one(source, tmp_path, monkeypatch,
                                                                     at, after, again):
    """The rollback went part by part (new out, old in): a second Ctrl-C left the old train
    beside the new val, sharing entries. Now parts may be missing, but never mixed, and every
    old part is in OUT or kept in the split's 'old'."""
    import jmp_ext.data.split as split_module

    out = tmp_path / "out"
    split_dataset(source, out, fraction_indices(40, {"train": 0.5, "val": 0.25, "test": 0.25}))
    before = part_sids(out)
    parts = fraction_indices(40, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    monkeypatch.setattr(split_module, "os", SimpleNamespace(
        replace=Interrupt(os.replace, at, after, again=at + again)))
    with pytest.raises(KeyboardInterrupt):
        split_dataset(source, out, parts, overwrite=True)
    present = part_sids(out)
    old = {name for name, sids in present.items() if sids == before[name]}
    new = {name for name, sids in present.items() if sids == parts[name].tolist()}
    assert not (old and new) and old | new == set(present)
    assert old | {p.name for p in out.glob(".split-*/old/*")} == set(before)


def test_interrupted_resplit_while_writing(source, tmp_path, monkeypatch, capsys):
    """Interrupted after writing the new train: nothing of the new split is in place."""
    import jmp_ext.data.split as split_module

    out = tmp_path / "out"
    assert main(["split", str(source), str(out)]) == 0
    before = part_sids(out)

    class Writer(split_module.DatasetWriter):
        def close(self):
            if self.path.name == "val":
                raise KeyboardInterrupt
            return super().close()

    monkeypatch.setattr(split_module, "DatasetWriter", Writer)
    assert main(["split", str(source), str(out), "--seed", "1", "--overwrite"]) == 130
    assert "(a dataset is written whole, a split's parts all or none); run the command again" in capsys.readouterr().err
    assert part_sids(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]


@pytest.mark.parametrize("fractions, message", [
    ("train=0.5,train=0.3", "part 'train' is given twice"),
    ("=0.5,train=0.5", "part name '' is not a plain directory name"),
    ("../escaped=0.5", r"part name '../escaped' is not a plain directory name"),
    (".hidden=0.5", r"part name '.hidden' is not a plain directory name"),
    ("train=nan", r"part 'train' has fraction nan; a fraction is a number in \(0, 1\]"),
    ("train=inf", r"part 'train' has fraction inf"),
    ("train=0,val=0.5", r"part 'train' has fraction 0.0"),
    ("train=-0.5,val=0.5", r"part 'train' has fraction -0.5"),
    ("train=0.5,", r"'' is not NAME=FRACTION"),
    ("train", r"'train' is not NAME=FRACTION"),
    ("train=half", r"'train=half' is not NAME=FRACTION"),
])
def test_bad_fractions(source, tmp_path, capsys, fractions, message):
    """Duplicates collapsed, "" wrote the dataset at OUT itself, "../x" outside OUT, NaN was
    "would be empty", a trailing comma "could not convert string to float: ''"."""
    assert main(["split", str(source), str(tmp_path / "out" / "sub"), "--fractions",
                 fractions]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def test_index_file_part_names_are_checked(source, tmp_path):
    with pytest.raises(ValueError, match=r"part name '../x' is not a plain directory name"):
        split_dataset(source, tmp_path / "out", {"train": np.arange(5), "../x": np.arange(5, 9)})
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_a_killed_split_is_pointed_out(source, tmp_path):
    """A killed split leaves its hidden directory, possibly with old parts moved aside."""
    (tmp_path / "out" / ".split-0badf00d" / "old" / "train").mkdir(parents=True)
    with pytest.warns(UserWarning, match=r"\.split-0badf00d: left by an interrupted split into"):
        split_dataset(source, tmp_path / "out", fraction_indices(40, {"train": 0.5}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".split-0badf00d", "train"]


def test_stats_of_a_part_say_they_are_the_training_splits(source, tmp_path, capsys):
    """`stats sp2/val` printed "2700 entries" for a 300-entry val: the train split's."""
    split_dataset(source, tmp_path / "sp", fraction_indices(40, {"train": 0.75, "val": 0.25}))
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "sp" / "val")]) == 0
    assert capsys.readouterr().out.startswith(
        f"{tmp_path / 'sp' / 'val'}/stats.json: statistics of the training split (train): "
        "30 entries, ")
    assert main(["stats", str(tmp_path / "sp" / "train")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'sp' / 'train'}/stats.json: 30 entries, ")


def test_an_interrupt_while_deleting_the_old_parts_says_the_new_split_is_in_place(
        source, tmp_path, monkeypatch, capsys):
    """It said "run the command again", which --overwrite-less then refused, and left the
    partly deleted old parts where the next split's warning pointed to old parts to restore."""
    import jmp_ext.data.split as split_module

    out = tmp_path / "out"
    assert main(["split", str(source), str(out)]) == 0
    monkeypatch.setattr(split_module, "shutil", SimpleNamespace(rmtree=Interrupt(shutil.rmtree, 1)))
    assert main(["split", str(source), str(out), "--seed", "1", "--overwrite"]) == 130
    staging, = out.glob(".split-*")
    assert (f"interrupted: the new split is in place in {out}; deleting the parts it replaced was "
            f"interrupted: delete {staging}") in capsys.readouterr().err
    assert part_sids(out) == {name: indices.tolist() for name, indices in fraction_indices(
        40, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1).items()}
    assert sorted(p.name for p in staging.iterdir()) == ["new", "replaced"]  # nothing in 'old'


def test_a_failed_split_leaves_no_directory_it_created(source, tmp_path, monkeypatch):
    import jmp_ext.data.split as split_module

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(split_module, "share_train_stats", fail)
    with pytest.raises(OSError, match="No space left"):
        split_dataset(source, tmp_path / "new" / "out", fraction_indices(40, {"train": 0.5}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all"]


def test_a_split_beside_other_datasets_is_refused_without_overwrite_too(source, tmp_path, capsys):
    """A split killed after moving the old train aside leaves the old val and test in OUT; a
    train-only split without --overwrite then wrote its train beside them (9 of 10 val entries
    in it)."""
    out = tmp_path / "out"
    assert main(["split", str(source), str(out)]) == 0
    (out / ".split-0badf00d" / "old").mkdir(parents=True)
    os.replace(out / "train", out / ".split-0badf00d" / "old" / "train")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="left by an interrupted split"):
        assert main(["split", str(source), str(out), "--fractions", "train=0.8", "--seed", "5"]) == 2
    assert (f"{out} also holds the dataset(s) test, val, which this split does not write: a part "
            "of an older split left beside the new parts would share entries with them; split "
            "into a directory of its own") in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".split-0badf00d", "test", "val"]


def test_a_slightly_asymmetric_stress_is_split_symmetrised(tmp_path):
    """A dataset written before stresses were checked for symmetry failed to split ("stress is
    not symmetric") over an asymmetry of a file's rounding; a gross one is still refused."""
    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "old", [random_entry(rng, stress=True) for _ in range(4)])
    with lmdb.open(str(tmp_path / "old" / "data.0000.lmdb"), subdir=False) as env, env.begin(write=True) as txn:
        for key, asymmetry in ((b"1", 5e-7), (b"2", 0.01)):
            entry = fmt.decode_entry(txn.get(key))
            entry["stress"][0, 1] += asymmetry
            txn.put(key, fmt.encode_entry(entry))
    written = LmdbDataset(tmp_path / "old")[1]["stress"].numpy()
    split_dataset(tmp_path / "old", tmp_path / "sp", {"train": np.array([0, 1, 3])})
    np.testing.assert_array_equal(LmdbDataset(tmp_path / "sp" / "train")[1]["stress"].numpy(),
                                  (written + written.T) / 2)
    with pytest.raises(fmt.DataError, match="old entry 2: stress is not symmetric"):
        split_dataset(tmp_path / "old", tmp_path / "sp2", {"train": np.array([2])})


def test_split_by_group_keeps_each_sids_frames_in_one_part(tmp_path, capsys):
    """A random split of frames put frames of one relaxation (OC20's sid) in train and val alike,
    so validation scored structures a step away from training ones. --group-by sid splits the
    systems: the fractions are of the sids, and every frame goes where its sid does."""
    rng = np.random.default_rng(0)
    entries = [random_entry(rng) for _ in range(60)]
    sizes = rng.integers(1, 6, 60)
    sids = np.repeat(np.arange(60), sizes)[:60]  # (systems of 1 to 5 frames)
    for entry, sid in zip(entries, sids):
        entry["sid"] = sid
    write_dataset(tmp_path / "all", entries)
    assert main(["split", str(tmp_path / "all"), str(tmp_path / "parts"), "--group-by", "sid",
                 "--fractions", "train=0.6,val=0.2,test=0.2", "--seed", "3"]) == 0
    parts = part_sids(tmp_path / "parts")
    assert sorted(sum(parts.values(), [])) == sorted(sids.tolist())  # (every frame, once)
    groups = {name: set(values) for name, values in parts.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    counts = {name: len(g) for name, g in groups.items()}
    num_sids = len(set(sids.tolist()))
    bounds = np.round(np.cumsum([0, 0.6, 0.2, 0.2]) * num_sids).astype(int)
    assert [counts["train"], counts["val"], counts["test"]] == np.diff(bounds).tolist()
    # Without groups, the frames' split as before.
    plain = fraction_indices(60, {"a": 0.5, "b": 0.5}, seed=1)
    order = np.random.default_rng(1).permutation(60)
    assert plain["a"].tolist() == sorted(order[:30].tolist())
    # A field that is not an integer per structure is named, with those there are.
    assert main(["split", str(tmp_path / "all"), str(tmp_path / "bad"), "--group-by", "energy"]) == 2
    assert "--group-by energy: " in capsys.readouterr().err
    assert main(["split", str(tmp_path / "all"), str(tmp_path / "bad"), "--group-by", "sid", "--index-file",
                 str(tmp_path / "i.json")]) == 2
    assert "--group-by applies to --fractions" in capsys.readouterr().err
    # Fewer groups than parts: said in groups; groups of one entry each: the entries' split, warned of.
    with pytest.raises(ValueError, match=r"part 'a' would get none of the 1 group\(s\) the entries form"):
        fraction_indices(6, {"a": 0.5, "b": 0.5}, groups=np.zeros(6, int))
    with pytest.warns(UserWarning, match=r"each of the 6 entries is a group of its own"):
        assert fraction_indices(6, {"a": 0.5, "b": 0.5}, seed=2, groups=np.arange(6) * 7)["a"].tolist() == \
            fraction_indices(6, {"a": 0.5, "b": 0.5}, seed=2)["a"].tolist()
