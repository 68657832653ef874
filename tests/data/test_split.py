import json

import numpy as np
import pytest
import torch
from data_helpers import random_entry

from jmp_ext.data import LmdbDataset, load_stats, write_dataset
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


def test_index_files(source, tmp_path):
    (tmp_path / "idx.json").write_text(json.dumps({"train": [0, 5, 7], "test": [1]}))
    parts = read_index_file(tmp_path / "idx.json", 40)
    assert parts["train"].tolist() == [0, 5, 7] and parts["test"].tolist() == [1]
    np.savez(tmp_path / "idx.npz", train=np.array([3, 2]), val=np.array([9]))
    assert read_index_file(tmp_path / "idx.npz", 40)["train"].tolist() == [3, 2]
    (tmp_path / "bad.json").write_text(json.dumps({"train": [0, 5], "test": [5]}))
    with pytest.raises(ValueError, match="index 5 is in both 'train' and 'test'"):
        read_index_file(tmp_path / "bad.json", 40)
    (tmp_path / "bad.json").write_text(json.dumps({"train": [0, 40]}))
    with pytest.raises(ValueError, match="index 40 outside"):
        read_index_file(tmp_path / "bad.json", 40)


def test_cli_split(source, tmp_path, capsys):
    assert main(["split", str(source), str(tmp_path / "cli"), "--fractions",
                 "train=0.75,val=0.25", "--seed", "3"]) == 0
    assert len(LmdbDataset(tmp_path / "cli" / "train")) == 30
    assert len(LmdbDataset(tmp_path / "cli" / "val")) == 10
    assert main(["split", str(source), str(tmp_path / "cli")]) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def test_split_checks_every_part_before_writing(source, tmp_path, capsys):
    """5 entries at 0.8/0.1/0.1 leave val empty: train was written, then the split failed."""
    write_dataset(tmp_path / "small", [random_entry(np.random.default_rng(i)) for i in range(5)])
    assert main(["split", str(tmp_path / "small"), str(tmp_path / "out")]) == 1
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
                     "--overwrite"]) == 1
        assert (f"part 'train' would be written to {tmp_path / out / 'train'}, which is the "
                "source itself") in capsys.readouterr().err
    assert len(LmdbDataset(tmp_path / "sp" / "train")) == 20
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["train"]
