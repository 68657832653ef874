import csv

import pytest
import torch

from jmp_ext.train import checkpoint as ckpt
from jmp_ext.train.logger import RunLogger


def test_roundtrip_and_rng(tmp_path):
    torch.manual_seed(1)
    state = {"model": {"w": torch.randn(3)}, "step": 7, "rng": ckpt.rng_state(), "config": {"a": [1, "x"]}}
    expected_next = torch.rand(4)
    ckpt.save_checkpoint(tmp_path / "last.pt", state)
    loaded = ckpt.load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    torch.manual_seed(99)
    ckpt.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4), expected_next)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    def torn_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file removed


class Evil:
    def __reduce__(self):
        return (print, ("executed!",))


def test_refuses_to_unpickle_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="cannot load checkpoint .* safely"):
        ckpt.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def _rows(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), r["split"], r["name"], float(r["value"])) for r in csv.DictReader(f)]


def test_logger_csv_and_resume(tmp_path):
    log = RunLogger(tmp_path, enabled=True, start_step=0, total_steps=10, progress=False)
    log.log(5, "train", {"loss": 1.5})
    log.log(10, "val", {"a/energy_mae": 0.25})
    log.close()
    assert _rows(tmp_path / "metrics.csv") == [(5, "train", "loss", 1.5), (10, "val", "a/energy_mae", 0.25)]
    # Resuming from step 5 drops what the killed run logged after its last checkpoint.
    log = RunLogger(tmp_path, enabled=True, start_step=5, total_steps=10, progress=False)
    log.log(6, "train", {"loss": 1.0})
    log.close()
    assert _rows(tmp_path / "metrics.csv") == [(5, "train", "loss", 1.5), (6, "train", "loss", 1.0)]
    # A run resumed at step 6 that repeats a validation there (the epoch-end validation after a
    # checkpoint at the epoch's last step) does not log it twice; a row torn by a kill is dropped.
    log = RunLogger(tmp_path, enabled=True, start_step=6, total_steps=10, progress=False)
    log.log(6, "val", {"a/energy_mae": 0.5})
    log.close()
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("7,tra")
    log = RunLogger(tmp_path, enabled=True, start_step=6, total_steps=10, progress=False)
    log.log(6, "val", {"a/energy_mae": 0.5})
    log.log(7, "train", {"loss": 0.5})
    log.close()
    assert _rows(tmp_path / "metrics.csv") == [(5, "train", "loss", 1.5), (6, "train", "loss", 1.0),
                                               (6, "val", "a/energy_mae", 0.5), (7, "train", "loss", 0.5)]
    # Non-zero ranks write nothing.
    other = tmp_path / "other"
    log = RunLogger(other, enabled=False, start_step=0, total_steps=1, progress=False)
    log.log(1, "train", {"loss": 1.0})
    log.close()
    assert not other.exists()
