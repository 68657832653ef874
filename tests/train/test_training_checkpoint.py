import csv
import os
import stat
import warnings

import pytest
import torch

from jmp_ext.calculator import JMPCalculator
from jmp_ext.files import write_bytes_atomic
from jmp_ext.train import checkpoint as ckpt
from jmp_ext.train import loop
from jmp_ext.train.config import build_config
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


@pytest.mark.parametrize("room", [0, 4096])
def test_a_full_disk_names_the_file_and_the_cli_says_how_to_go_on(tmp_path, monkeypatch, capsys, room):
    """"[Errno 28] No space left on device" named no file, and not that the run can resume. A
    disk that fills after some of the checkpoint fails inside torch.save, whose zip writer
    raised "RuntimeError: ... unexpected pos 704 vs 598" over the full disk."""
    import errno

    from jmp_ext.train import __main__ as cli

    import io

    from jmp_ext import files

    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    class FullDisk(io.FileIO):
        written = 0

        def write(self, data):
            if self.written + len(data) > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return super().write(data)

    # (a buffered file, as open() gives, through torch.save itself, which turns its error into
    # "RuntimeError: ... unexpected pos 704 vs 598")
    monkeypatch.setattr(files, "open", lambda name, mode: io.BufferedWriter(FullDisk(name, mode.replace("b", ""))),
                        raising=False)
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*last.pt'") as raised:
        ckpt.save_checkpoint(path, {"step": 2, "w": torch.zeros(100_000)})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    error = raised.value

    def run_training(config):
        raise error

    monkeypatch.setattr(cli, "run_training", run_training)
    assert cli.main(["finetune", "tasks=[{name: t, train: x, targets: [{name: energy, kind: energy}]}]"]) == 2
    assert capsys.readouterr().err == (f"error: {error} (the disk is full: free space and run it again; a training "
                                       "run resumes from its last checkpoint, run_dir/last.pt once it has one, with "
                                       "resume=true: a failed write leaves the files as they were)\n")
    # An OSError without an errno keeps its message (it read "[Errno None] None: 'path'").
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError("quota exceeded")))
    with pytest.raises(OSError, match=r"^quota exceeded$"):
        ckpt.save_checkpoint(path, {"step": 2})


def test_a_full_disk_under_the_metrics_names_their_file(tmp_path, monkeypatch):
    """metrics.csv is appended to, and TensorBoard writes its own files: "[Errno 28] No space
    left on device" named neither."""
    import errno

    from jmp_ext.train.logger import RunLogger

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    log = RunLogger(tmp_path, enabled=True, start_step=0, total_steps=2, progress=False)
    try:
        log.log(1, "val", {"loss": 0.5})
        monkeypatch.setattr(log._file, "flush", full, raising=False)
        with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*metrics.csv'$"):
            log.log(2, "val", {"loss": 0.4})
        monkeypatch.undo()
        if log.tb is not None:  # (TensorBoard is optional: its half of the test needs it installed)
            monkeypatch.setattr(log.tb, "add_scalar", full)
            with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*/tb'$"):
                log.log(3, "val", {"loss": 0.3})
    finally:
        monkeypatch.undo()
        log.close()


def test_a_directory_that_cannot_be_written_or_fsynced(tmp_path, monkeypatch):
    """A read-only directory named the temporary file, which the user never asked for; a
    filesystem that refuses to fsync a directory (EINVAL: some network and Windows-hosted ones)
    failed every write after the file was in place."""
    import errno

    from jmp_ext import files

    def read_only(name, mode):
        raise OSError(errno.EROFS, "Read-only file system", str(name))

    monkeypatch.setattr(files, "open", read_only, raising=False)
    with pytest.raises(OSError, match=r"\[Errno 30\] Read-only file system: '.*/m.json'$"):
        write_bytes_atomic(tmp_path / "m.json", b"{}")
    monkeypatch.undo()
    fsync = os.fsync

    def no_directory_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_directory_fsync)
    ckpt.save_checkpoint(tmp_path / "last.pt", {"step": 5})
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 5
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match=r"\[Errno 5\] Input/output error: '.*last.pt'"):
        ckpt.save_checkpoint(tmp_path / "last.pt", {"step": 6})
    monkeypatch.undo()

    def other_file(f):  # (an error over another file's: not renamed to the file being written)
        try:
            open(tmp_path / "missing" / "x")
        except OSError:
            raise RuntimeError("while reading x")

    with pytest.raises(RuntimeError, match="while reading x"):
        files.write_atomic(tmp_path / "y.bin", other_file)


def test_files_get_the_mode_of_a_plain_open(tmp_path):
    """Not mkstemp's 0600: a colleague in the group must be able to read a checkpoint."""
    old = os.umask(0o022)
    try:
        ckpt.save_checkpoint(tmp_path / "last.pt", {"step": 1})
        write_bytes_atomic(tmp_path / "summary.json", b"{}")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {
        "last.pt": 0o644, "summary.json": 0o644}


@pytest.mark.parametrize("forces", ["direct", "gradient"])
def test_calculator_warns_that_direct_forces_are_not_conservative(tiny_data, tmp_path, forces):
    targets = [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]
    raw = {"mode": "finetune", "run_dir": str(tmp_path), "threads": 1,
           "graph": {"cutoff": 4.0, "max_neighbors": 8},
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"), "forces": forces,
                      "targets": targets}],
           "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
           "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        JMPCalculator(tmp_path / "best.pt")
    messages = [str(w.message) for w in caught if "direct forces" in str(w.message)]
    assert len(messages) == (forces == "direct")


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
    # A row torn inside its value still parses ("0.2" of "0.25"): it has no line end, and goes.
    text = (tmp_path / "metrics.csv").read_bytes()
    (tmp_path / "metrics.csv").write_bytes(text + b"7,val,a/energy_mae,0.2")
    log = RunLogger(tmp_path, enabled=True, start_step=7, total_steps=10, progress=False)
    log.log(7, "val", {"a/energy_mae": 0.25})
    log.close()
    assert _rows(tmp_path / "metrics.csv")[-1] == (7, "val", "a/energy_mae", 0.25)
    # Damaged bytes make a row that does not parse, not an error that stops the resume.
    (tmp_path / "metrics.csv").write_bytes((tmp_path / "metrics.csv").read_bytes() + b"7,val,a/\xff\xfe,0.x\n")
    RunLogger(tmp_path, enabled=True, start_step=7, total_steps=10, progress=False).close()
    assert _rows(tmp_path / "metrics.csv")[-1] == (7, "val", "a/energy_mae", 0.25)
    # Non-zero ranks write nothing.
    other = tmp_path / "other"
    log = RunLogger(other, enabled=False, start_step=0, total_steps=1, progress=False)
    log.log(1, "train", {"loss": 1.0})
    log.close()
    assert not other.exists()


def test_resuming_a_long_log_keeps_one_row_at_a_time(tmp_path):
    """A resumed run rewrote metrics.csv from a list of every row it had (~550 bytes a row: 250 MB
    for the 450k rows of a long pretraining run), memory the process then kept."""
    import tracemalloc

    rows = "".join(f"{step},train,loss,{1 / step!r}\n" for step in range(1, 100_001))
    (tmp_path / "metrics.csv").write_text("step,split,name,value\n" + rows)
    RunLogger(tmp_path / "first", enabled=True, start_step=0, total_steps=1, progress=False).close()  # (imports)
    tracemalloc.start()
    try:
        RunLogger(tmp_path, enabled=True, start_step=90_000, total_steps=100_000, progress=False).close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2e6, peak
    kept = _rows(tmp_path / "metrics.csv")
    assert len(kept) == 90_000 and kept[-1] == (90_000, "train", "loss", 1 / 90_000)
