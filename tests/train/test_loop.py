"""The training loop end to end on tiny data: resume, NaN handling, bad inputs, fine-tuning."""

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.data import atomic_numbers, chemical_symbols

from jmp_ext.models import BackboneConfig, PretrainModel
from jmp_ext.train import TrainError, batches, loop, tasks
from jmp_ext.train.checkpoint import load_checkpoint
from jmp_ext.train.config import ENTRY_KEY, ConfigError, build_config, load_config


# The tiny backbone made smaller still: these tests are about the loop, not the model.
SMALL = {"num_blocks": 1, "num_radial": 16}


def pretrain_config(data, run_dir, **loop_kw):
    tasks_ = [{"name": n, "train": str(data / n / "train"), "val": str(data / n / "val"), "forces": "direct",
               "structure_wise_force_loss": True,
               "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces", "coef": 10.0}]}
              for n in ("mol", "box")]
    return {"mode": "pretrain", "tasks": tasks_, "run_dir": str(run_dir), "graph": {"cutoff": 4.0, "max_neighbors": 8},
            "model": {"backbone": "tiny", "backbone_overrides": SMALL, "edge_dropout": 0.1},
            "data": {"batch_size": 4, "val_batch_size": 8},
            "schedule": {"warmup": 1},
            "loop": {"max_steps": 4, "val_every": 2, "ckpt_every": 2, "ema_decay": 0.9, "log_every": 1,
                     "fit_scale_factors": 0, "progress": False, **loop_kw}}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], dict):
            for x, y in zip(a[k], b[k]):
                assert_same_state(x, y)
        else:
            assert a[k] == b[k], k


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_resume_after_a_kill_is_bitwise_identical(tiny_data, tmp_path, monkeypatch, device):
    """On a GPU too: last.pt's RNG states must come back as CPU ByteTensors."""
    config = lambda run_dir, *overrides: build_config(  # noqa: E731
        {**pretrain_config(tiny_data, run_dir), "device": device}, list(overrides))
    full = loop.Trainer(config(tmp_path / "full")).train()
    assert full["steps"] == 4

    cfg = config(tmp_path / "killed")
    original = loop.Trainer.train_step

    def killed_at_step_3(self, batch, stand_in):
        if self.step == 3:  # steps 0-2 done, last.pt written after step 2
            raise KeyboardInterrupt
        return original(self, batch, stand_in)

    monkeypatch.setattr(loop.Trainer, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.Trainer(cfg).train()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["loop"]["step"] == 2
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    loop.Trainer(config(tmp_path / "killed", "resume=true")).train()

    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    for key in ("model", "ema", "optimizer", "schedule", "loop", "metrics"):
        assert_same_state({key: a[key]}, {key: b[key]})
    assert (tmp_path / "killed" / "config.yaml").is_file() and (tmp_path / "killed" / "best.pt").is_file()


def test_loader_workers_train_as_the_training_process_and_outlive_epochs(tiny_data, tmp_path, monkeypatch):
    """data.num_workers: the same weights as loading in the training process, bit for bit; and
    the workers are started once, not once per epoch (forkserver, Python 3.14's default on
    Linux, took seconds per start, as spawn does)."""
    loaders = tmp_path / "loaders"
    original = batches.CollatedEntries.__getitem__

    def recorded(self, entries):  # (in the worker: the pid of the process that loaded the batch)
        with open(loaders, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, entries)

    monkeypatch.setattr(batches.CollatedEntries, "__getitem__", recorded)
    states = {}
    for workers in (0, 2):
        cfg = build_config(pretrain_config(tiny_data, tmp_path / f"w{workers}", max_steps=7, val_every=0),
                           [f"data.num_workers={workers}", "data.batch_size=8"])
        trainer = loop.Trainer(cfg)
        summary = trainer.train()
        assert summary["epochs"] > 2  # (three epochs at least begun)
        pids = set(map(int, loaders.read_text().split()))
        loaders.unlink()
        assert len(pids - {os.getpid()}) == workers, pids  # (validation loads in the training process)
        states[workers] = load_checkpoint(tmp_path / f"w{workers}" / "last.pt")
    for key in ("model", "ema", "optimizer", "loop"):
        assert_same_state({key: states[0][key]}, {key: states[2][key]})


def test_training_loader_gives_each_epoch_its_batches(tiny_data):
    """One pool of workers for every epoch: an epoch left part-way (max_steps, a stop) does not
    leak its batches, loaded ahead, into the next; an empty epoch (resumed at its end) is one."""
    from jmp_ext.data import LmdbDataset

    loader = batches.TrainingLoader(LmdbDataset(tiny_data / "mol" / "train"), torch.float32, workers=2)
    entries = lambda epoch: [b[ENTRY_KEY].tolist() for b in epoch]  # noqa: E731
    assert entries(loader.epoch([[0, 1], [2], [3, 4, 5]])) == [[0, 1], [2], [3, 4, 5]]
    left = loader.epoch([[5], [6], [7], [8], [9]])
    assert entries([next(left)]) == [[5]]
    assert entries(loader.epoch([[1], [2]])) == [[1], [2]]
    assert entries(loader.epoch([])) == []
    loader.close()  # (a Trainer's train() ends so; the next epoch starts new workers)
    assert entries(loader.epoch([[3]])) == [[3]]
    loader.close()


def test_loader_workers_raise_a_low_open_file_limit(tiny_data):
    """Workers pass batches as file descriptors: under ulimit -n 64 four of them ran out (a bare
    EOFError after megabytes of tracebacks, or a hang). The soft limit goes up to the hard one."""
    import resource

    from jmp_ext.data import LmdbDataset

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        batches.TrainingLoader(LmdbDataset(tiny_data / "mol" / "train"), torch.float32, workers=0)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 64  # (no workers: left alone)
        batches.TrainingLoader(LmdbDataset(tiny_data / "mol" / "train"), torch.float32, workers=2).close()
        expected = batches.OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, batches.OPEN_FILES)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_loader_workers_started_by_forkserver_train(tiny_data, tmp_path):
    """Python 3.14 starts processes by forkserver on Linux (3.11-3.13: fork): the workers get
    the datasets pickled (in memory too) and load the same batches."""
    import yaml

    for start in ("fork", "forkserver"):
        raw = pretrain_config(tiny_data, tmp_path / start, max_steps=7, val_every=0)
        raw["data"] = {**raw["data"], "num_workers": 2, "batch_size": 8, "in_memory": True}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
        script = ("import multiprocessing, sys; from jmp_ext.train.__main__ import main\n"
                  "if __name__ == '__main__':\n"
                  f"    multiprocessing.set_start_method({start!r}); sys.exit(main([sys.argv[1]]))")
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run.yaml")], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0, done.stderr[-2000:]
    fork, forkserver = (load_checkpoint(tmp_path / start / "last.pt") for start in ("fork", "forkserver"))
    for key in ("model", "optimizer", "loop"):
        assert_same_state({key: fork[key]}, {key: forkserver[key]})


@pytest.mark.slow
def test_compiled_network_trains_like_the_eager_one(tiny_data, tmp_path):
    """loop.compile: the same first loss (before any update only rounding differs) and the same
    checkpoint keys (the network is compiled in place, so no `_orig_mod.` prefixes)."""
    runs = {}
    for name in ("eager", "compiled"):
        cfg = build_config(pretrain_config(tiny_data, tmp_path / name, max_steps=2, ema_decay=0.0, val_every=0),
                           [f"loop.compile={name == 'compiled'}"])
        trainer = loop.Trainer(cfg)
        trainer.train()
        assert (trainer.model.net._compiled_call_impl is not None) == (name == "compiled")
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            losses = [float(r["value"]) for r in csv.DictReader(f) if r["split"] == "train" and r["name"] == "loss"]
        runs[name] = (losses, load_checkpoint(tmp_path / name / "last.pt")["model"])
    (eager_losses, eager_state), (compiled_losses, compiled_state) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == len(compiled_losses) == 2
    assert compiled_losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    assert compiled_state.keys() == eager_state.keys()
    for k in eager_state:
        assert torch.allclose(compiled_state[k].double(), eager_state[k].double(), rtol=1e-2, atol=1e-4), k


def test_non_finite_loss_is_skipped_then_stops(tiny_data, tmp_path, monkeypatch, capsys):
    """A non-finite loss skips its step (the weights stay) and the log names the batch's
    entries; max_nan_steps in a row stop the run with last.pt saved, which holds the weights of
    before them (a resume with a lower lr starts there)."""
    original = tasks.loss_terms
    calls = {"n": 0}

    def nan_from_second_step(model, preds, batch, only=None):
        if only is not None:  # (a task's own loss, logged: not a step's loss)
            return original(model, preds, batch, only)
        calls["n"] += 1
        terms = original(model, preds, batch)
        if calls["n"] >= 2:
            terms["energy"] = (terms["energy"][0] * float("nan"), terms["energy"][1])
        return terms

    monkeypatch.setattr(tasks, "loss_terms", nan_from_second_step)
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path, max_nan_steps=2, ema_decay=0.0,
                                                        val_every=0)))
    before = {}

    def snapshot_after_first(self, batch, stand_in, _orig=loop.Trainer.train_step):
        _orig(self, batch, stand_in)
        if self.step == 0:
            before.update({k: v.clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(loop.Trainer, "train_step", snapshot_after_first)
    with pytest.raises(TrainError, match=r"loss was not finite for 2 steps in a row \(loop.max_nan_steps\); "
                                         r".*last\.pt holds the weights of before them, and resume=true retries from "
                                         r"this step's batch: lower optim.lr, check the labels of the entries the log "
                                         r"names; weights that give a non-finite loss on every batch have diverged"):
        trainer.train()
    # The skipped steps did not touch the weights, and last.pt holds them.
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["loop"]["step"] == 2 and all(torch.equal(v, saved["model"][k]) for k, v in before.items())
    assert saved["loop"]["nan_streak"] == 0  # (a resume gets loop.max_nan_steps tries of its own)
    logged = capsys.readouterr().out
    assert re.search(r"step 2: non-finite loss on a batch of \S+ entr(y|ies) \d+(, \d+)*( and \d+ more)?"
                     r"(; \S+ entr(y|ies) \d+(, \d+)*( and \d+ more)?)*, step skipped \(1/2 in a row\)", logged), logged


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_are_skipped_without_norm_clipping(tiny_data, tmp_path, bad):
    """The fine-tuning presets clip by value (grad_clip_norm 0): a NaN or infinite gradient under
    a finite loss must still skip the step, not reach AdamW (clipping by value turned inf into 1)."""
    raw = finetune_config(tiny_data, tmp_path, forces="direct")
    raw["optim"].update(grad_clip_norm=0.0, grad_clip_value=1.0)
    raw["loop"].update(max_steps=1, val_every=0)
    trainer = loop.Trainer(build_config(raw))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    next(trainer.model.net.parameters()).register_hook(lambda g: torch.full_like(g, bad))
    trainer.train_step(next(trainer._epoch_batches()))
    assert trainer.nan_streak == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_classification_loss_is_summed_over_the_batch(tmp_path):
    """JMP's cross-entropy has sum reduction (its other losses are means): the logged loss is
    the sum over the batch of the per-structure cross-entropy, at the step's weights."""
    import torch.nn.functional as F

    from helpers import write_molecules

    data = write_molecules(tmp_path / "cls", 8, seed=3, classes=2)
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=data, val="", test="",
                           targets=[{"name": "cls", "kind": "classification", "num_classes": 2}])
    raw["loop"].update(max_steps=1, log_every=1, val_every=0)
    trainer = loop.Trainer(build_config(raw))
    batch = next(trainer._epoch_batches())
    trainer.model.train()
    with torch.no_grad():
        want = F.cross_entropy(trainer.model(batch)["cls"], batch["cls"], reduction="sum").item()
    trainer.train_step(batch)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        logged = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "loss_cls"]
    assert batch["natoms"].numel() > 1 and logged == [pytest.approx(want, rel=1e-5)]


def test_bad_class_labels_are_named(tmp_path):
    """Class indices outside 0..C-1, or float labels, gave cross-entropy's IndexError or
    dtype RuntimeError from inside torch; bad indices are found when the data is opened, not
    when their batch comes up (a user's run stopped after several steps)."""
    from helpers import write_molecules

    data = write_molecules(tmp_path / "cls", 8, seed=3, classes=3)
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=data, val="", test="",
                           targets=[{"name": "cls", "kind": "classification", "num_classes": 2}])
    raw["loop"].update(max_steps=2, val_every=0)
    with pytest.raises(TrainError, match=r"^tasks.0 \(mol\): train dataset .*cls: target 'cls': label\(s\) \[2\] are "
                                         r"not class indices 0..1 \(num_classes=2\)"):
        loop.Trainer(build_config(raw))
    # The log shows an accuracy as itself (it was "-mol/cls_accuracy -0.6667"; lower is better
    # only inside, for best.pt and early stopping).
    assert tasks.describe_primary(build_config(raw), {"mol/cls_accuracy": 0.75}, -0.75) == "mol/cls_accuracy 0.75"
    raw["tasks"][0]["targets"] = [{"name": "energy", "kind": "classification", "num_classes": 2}]
    raw["overwrite"] = True
    with pytest.raises(TrainError, match=r"target 'energy': label\(s\) \[0\.96\d+, .*\] are not class indices 0..1"):
        loop.Trainer(build_config(raw))
    # Whole numbers stored as floats are classes (a label written 1 here and 1.0 there is stored
    # as floats); a fractional one is named, not cut to a class.
    from jmp_ext.data import DatasetWriter, LmdbDataset

    for name, labels in [("whole", [0.0, 1.0]), ("fractional", [0.0, 0.5, 1.0])]:
        with DatasetWriter(tmp_path / name) as writer:
            for k, entry in enumerate(LmdbDataset(data)):
                writer.add({**{key: value.numpy() for key, value in entry.items()}, "cls": labels[k % len(labels)]})
        raw["tasks"][0].update(train=str(tmp_path / name),
                               targets=[{"name": "cls", "kind": "classification", "num_classes": 2}])
        if name == "whole":
            summary = loop.Trainer(build_config(raw)).train()
            assert summary["steps"] == 2
        else:
            with pytest.raises(TrainError, match=r"label\(s\) \[0.5\] are not class indices 0..1"):
                loop.Trainer(build_config(raw))


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_resume_refuses_a_different_run_but_not_a_different_loader(tiny_data, tmp_path):
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path, max_steps=2))).train()
    resume = ["resume=true", "loop.max_steps=3"]
    with pytest.raises(TrainError, match=r"config differs in 'seed' \(5 now, 0 in last.pt\), which a resumed run must "
                                         r"keep \(give the run's own config, .*config.yaml; to train anew from its "
                                         r"weights, start another run_dir with model.init_checkpoint\)$"):
        loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path), [*resume, "seed=5"]))
    with pytest.raises(TrainError, match=r"config differs in 'tasks.1.targets.1.coef' \(2.0 now, 10.0 in last.pt\)"):
        loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path), [*resume, "tasks.1.targets.1.coef=2"]))
    with pytest.raises(TrainError, match="config differs in 'data.batch_size'"):
        loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path), [*resume, "data.batch_size=3"]))
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path), [*resume, "data.val_batch_size=4"]))
    assert trainer.resumed and trainer.step == 2


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_resume_continues_with_the_changed_optimizer_settings_and_says_so(tiny_data, tmp_path, capsys):
    """optim.lr changed on resume took effect, optim.weight_decay (restored with the optimizer's
    param groups) silently did not, and neither was mentioned. The config's values apply, the
    moments are the run's, and a warning lists the changes."""
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path, max_steps=2))).train()
    saved = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    with pytest.warns(UserWarning, match=r"resume: the config changes optim\.lr 0\.0003 -> 0\.002, optim\.weight_decay "
                                         r"0\.1 -> 0\.3; the run continues with the new values"):
        trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path),
                                            ["resume=true", "loop.max_steps=3", "optim.lr=2e-3", "optim.weight_decay=0.3"]))
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups if g["weight_decay"] > 0} == {0.3}
    assert max(g["lr"] for g in groups) == pytest.approx(trainer.schedule.lr) and trainer.schedule.base_lr == 2e-3
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], saved["state"][i]["exp_avg"]) for i in saved["state"])
    out = capsys.readouterr()
    assert f"resumed {tmp_path / 'last.pt'} at step 2 of 3 (epoch " in out.out + out.err


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_temp_files_of_a_run_killed_while_saving_are_removed(tiny_data, tmp_path):
    """files.write_atomic leaves .last.pt.XXXX.tmp behind a SIGKILL, a checkpoint's size each."""
    run = tmp_path / "run"
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=1))).train()
    stale = [run / ".last.pt.0123abcd.tmp", run / ".metrics.csv.89abcdef.tmp"]
    for path in stale:
        path.write_bytes(b"torn")
    (run / ".notes.tmp").write_text("the user's")  # not a run file's: kept
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"]))
    assert not any(path.exists() for path in stale) and (run / "last.pt").is_file()
    assert (run / ".notes.tmp").read_text() == "the user's"


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_resume_keeps_its_training_elements_when_the_statistics_change(tiny_data, tmp_path):
    """train_elements comes from stats.json, which a user may recompute (or which predates the
    list) between a run and its resume: the resume must not fail on it."""
    run = tmp_path / "run"
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=1))).train()
    state = load_checkpoint(run / "last.pt")
    del state["model"]["train_elements"]  # as written from statistics without the list
    torch.save(state, run / "last.pt")
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"]))
    assert trainer.step == 1 and trainer.model.train_elements.any()
    trainer.log.close()


def test_forces_that_are_all_zero_train(tiny_data, tmp_path):
    """Relaxed structures only: force_rms 0 divided the force loss by zero, and every step was
    skipped as non-finite (a run of up to 9 steps ended 'successfully' without an update)."""
    from jmp_ext.data import DatasetWriter, LmdbDataset, compute_stats, save_stats

    source = LmdbDataset(tiny_data / "mol" / "train")
    with DatasetWriter(tmp_path / "relaxed") as writer:
        for i in range(len(source)):
            entry = source.read(i)
            writer.add({**entry, "forces": np.zeros_like(entry["forces"])})
    save_stats(tmp_path / "relaxed", compute_stats(LmdbDataset(tmp_path / "relaxed")))
    raw = finetune_config(tiny_data, tmp_path / "run", forces="direct")  # (scaled by force_rms)
    raw["tasks"][0]["train"] = str(tmp_path / "relaxed")
    raw["loop"].update(max_steps=3, log_every=1)
    trainer = loop.Trainer(build_config(raw))
    before = {k: v.clone() for k, v in trainer.model.net.state_dict().items()}
    assert trainer.train()["steps"] == 3 and trainer.nan_streak == 0
    assert any(not torch.equal(v, trainer.model.net.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_a_last_pt_without_a_key_of_this_version_is_a_message(tiny_data, tmp_path):
    """A last.pt of another jmp_ext version (or edited) raised a bare KeyError."""
    run = tmp_path / "run"
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=1))).train()
    state = load_checkpoint(run / "last.pt")
    del state["loop"]["window"]
    torch.save(state, run / "last.pt")
    with pytest.raises(TrainError, match=r"resume: .*last\.pt has no 'window': it was written by another version of "
                                         r"jmp_ext \(or edited\); start a new run_dir"):
        loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"]))
    # (a field of another kind raised a TypeError or AttributeError somewhere in the loop)
    for damaged, problem in [([1, 2], "is of type list, not a dict"), ({**state, "ema": [1.0]}, "has 'ema' of type list"),
                             ({**state, "loop": 3}, "has 'loop' of type int")]:
        torch.save(damaged, run / "last.pt")
        with pytest.raises(TrainError, match=rf"resume: .*last\.pt {problem}: it was written by another version"):
            loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"]))


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_a_run_from_before_units_were_recorded_resumes_and_lends_its_heads(tiny_data, tmp_path):
    """A last.pt whose targets have no unit (written before TargetConfig.unit) was refused as a
    run with other tasks, and by init_heads as other targets; a recorded unit still has to match.
    The Trainer leaves the caller's config as it was (it filled the units in)."""
    run = tmp_path / "run"
    config = build_config(pretrain_config(tiny_data, run, max_steps=1))
    loop.Trainer(config).train()
    assert all(t.unit is None for task in config.tasks for t in task.targets)
    state = load_checkpoint(run / "last.pt")
    for task in state["config"]["tasks"]:
        for target in task["targets"]:
            del target["unit"]
    torch.save(state, tmp_path / "before.pt")
    torch.save(state, run / "last.pt")
    assert loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"])).train()["steps"] == 2
    raw = pretrain_config(tiny_data, tmp_path / "more", max_steps=1)
    raw["model"].update(init_checkpoint=str(tmp_path / "before.pt"), init_heads=True)
    assert loop.Trainer(build_config(raw)).initialised_heads == ["mol", "box"]
    state["config"]["tasks"][0]["targets"][0]["unit"] = "kcal/mol"
    torch.save(state, run / "last.pt")
    with pytest.raises(TrainError, match=r"its config differs in 'tasks.0.targets.0.unit' \('eV' now, 'kcal/mol' in "
                                         r"last.pt\)"):
        loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=3), ["resume=true"]))


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_a_run_from_before_a_config_field_existed_resumes(tiny_data, tmp_path):
    """A last.pt written before TargetConfig.references and ModelConfig.init_heads existed was
    refused as a run with other tasks, even with its own config.yaml; a field added since takes
    its default, as in that config.yaml loaded now. One this version cannot read is named."""
    run = tmp_path / "run"
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=1))).train()
    state = load_checkpoint(run / "last.pt")
    del state["config"]["model"]["init_heads"]
    for task in state["config"]["tasks"]:
        for target in task["targets"]:
            del target["references"]
    torch.save(state, run / "last.pt")
    assert loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"])).train()["steps"] == 2
    state = load_checkpoint(run / "last.pt")
    state["config"]["model"]["layers"] = 4
    torch.save(state, run / "last.pt")
    with pytest.raises(TrainError, match=r"resume: .*last\.pt holds a config this version cannot read \(model.layers: "
                                         r"unknown key .*\): it was written by another version"):
        loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=3), ["resume=true"]))


def test_a_failed_or_untrained_trainer_closes_its_log(tiny_data, tmp_path, monkeypatch):
    """A Trainer whose train() raised, or that was released untrained, kept metrics.csv open and
    TensorBoard's writer thread running: one more of each per run of a sweep in one process."""
    threads = threading.active_count()
    untrained = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "a")))
    untrained.release_run_dir()
    failed = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "b")))

    def fail(batch, stand_in):
        raise RuntimeError("injected")
    monkeypatch.setattr(failed, "train_step", fail)
    with pytest.raises(RuntimeError, match="injected"):
        failed.train()
    for trainer in (untrained, failed):
        assert trainer.log._file.closed
    assert threading.active_count() == threads  # (TensorBoard's writers, where it is installed)


def test_a_log_that_fails_to_close_names_its_file_and_unlocks_the_run(tiny_data, tmp_path):
    """On a full disk, closing metrics.csv (its last rows' write) raised an OSError naming no
    file, in place of the write error that named it, and left run_dir locked in the process (a
    new Trainer there: "in use by a Trainer of this same process")."""
    import errno

    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "run")))
    real = trainer.log._file

    class FullDisk:
        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    trainer.log._file = FullDisk()
    with pytest.raises(OSError, match=r"No space left on device: '.*run/metrics\.csv'"):
        trainer.release_run_dir()
    assert trainer.run_lock is None
    loop.Trainer(build_config({**pretrain_config(tiny_data, tmp_path / "run"), "overwrite": True})).release_run_dir()


def test_resume_refuses_weights_that_are_not_finite(tiny_data, tmp_path):
    """NaN weights (in the model or in its EMA) resumed into skipped steps only."""
    run = tmp_path / "run"
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=1))).train()
    state = load_checkpoint(run / "last.pt")
    for part in ("model", "ema"):
        damaged = load_checkpoint(run / "last.pt")
        name = next(k for k, v in damaged[part].items() if v.is_floating_point())
        damaged[part][name].view(-1)[0] = float("nan")
        torch.save(damaged, run / "last.pt")
        with pytest.raises(TrainError, match=rf"resume: .*last\.pt: 1 weight\(s\) hold NaN or inf, first '{name}'"):
            loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2), ["resume=true"]))
        torch.save(state, run / "last.pt")


def test_a_worker_ignores_only_the_first_sigterm():
    """The scheduler's SIGTERM reaches the workers too and must not kill them mid-step; the
    DataLoader's shutdown terminates a stuck worker with a second one."""
    import subprocess
    import sys

    code = ("import os, signal; from jmp_ext.train.batches import _ignore_stop_signals; _ignore_stop_signals(0); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); print('alive', flush=True); "
            "os.kill(os.getpid(), signal.SIGTERM); print('not reached')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["alive"] and done.returncode == -signal.SIGTERM


def test_a_new_run_never_silently_replaces_an_old_one(tiny_data, tmp_path):
    run = tmp_path / "run"
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2))).train()
    old_best = (run / "best.pt").read_bytes()
    with pytest.raises(TrainError, match=r"already holds a run \(last\.pt, best\.pt\).*overwrite=true"):
        loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2)))
    assert (run / "best.pt").read_bytes() == old_best
    # overwrite=true with a config error: the error comes before anything is deleted.
    with pytest.raises(TrainError, match="freeze_blocks"):
        loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2),
                                  ["overwrite=true", "model.freeze_blocks=[99]"]))
    assert (run / "best.pt").read_bytes() == old_best and (run / "metrics.csv").is_file()

    # overwrite: the old run's files go first. Without validation the new run writes no best.pt,
    # so a stale one would be taken for its best weights (e.g. by the final test).
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "stale").write_text("old events")
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2, val_every=0),
                                        ["overwrite=true", "tasks.0.val=", "tasks.1.val="]))
    assert not (run / "best.pt").exists() and not (run / "summary.json").exists()
    assert not (run / "tb" / "stale").exists()
    trainer.train()
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    # A tb that links elsewhere: the link goes, not what it points to (TensorBoard wrote there)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the run's")
    shutil.rmtree(run / "tb", ignore_errors=True)
    (run / "tb").symlink_to(elsewhere)
    loop.Trainer(build_config(pretrain_config(tiny_data, run, max_steps=2, val_every=0),
                              ["overwrite=true", "tasks.0.val=", "tasks.1.val="])).release_run_dir()
    assert not (run / "tb").is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == ["keep"]


def test_missing_dataset_and_target(tiny_data, tmp_path):
    raw = pretrain_config(tiny_data, tmp_path)
    raw["tasks"][1]["train"] = str(tmp_path / "nowhere")
    with pytest.raises(TrainError, match=r"tasks\.1\.train: dataset directory .*nowhere does not exist"):
        loop.Trainer(build_config(raw))
    raw = pretrain_config(tiny_data, tmp_path)
    raw["tasks"][0]["targets"].append({"name": "stress", "kind": "stress"})
    with pytest.raises(TrainError, match=r"target 'stress' is not in the train dataset .*stores it when told "
                                         r"where it is: --stress-key KEY"):
        loop.Trainer(build_config(raw))
    raw["tasks"][0]["targets"][-1] = {"name": "U_0", "kind": "scalar"}
    with pytest.raises(TrainError, match=r"target 'U_0' is not in .*: --property U_0\[=KEY\]\[:UNIT\]"):
        loop.Trainer(build_config(raw))
    # A per-atom or vector field is not one number per structure.
    raw = finetune_config(tiny_data, tmp_path, forces="direct")
    raw["tasks"][0]["targets"] = [{"name": "forces", "kind": "scalar"}]
    with pytest.raises(TrainError, match=r"target 'forces' has shape \['n', 3\] per structure"):
        loop.Trainer(build_config(raw))
    # A structure file instead of a dataset: say how to convert it.
    raw = pretrain_config(tiny_data, tmp_path)
    (tmp_path / "train.xyz").write_text("")
    raw["tasks"][1]["train"] = str(tmp_path / "train.xyz")
    with pytest.raises(TrainError, match=r"tasks\.1\.train: .*train\.xyz is a file.*python -m jmp_ext\.data convert"):
        loop.Trainer(build_config(raw))
    # An unknown backbone field: named, not a TypeError.
    with pytest.raises(TrainError, match="model.backbone_overrides: unknown BackboneConfig field\\(s\\): num_blockz"):
        loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path), ["model.backbone_overrides.num_blockz=2"]))


def test_a_task_without_val_split_and_no_repeated_final_validation(tiny_data, tmp_path):
    """One task validates, the other has no val split (''); the primary metric is the validating
    task's. With lr ~0 the second validation does not improve, so early stopping (patience 1) ends
    the run at step 2, without a further validation (one val row per step)."""
    raw = pretrain_config(tiny_data, tmp_path, max_steps=8, val_every=1, early_stop_patience=1)
    raw["tasks"][1]["val"] = ""
    raw["optim"] = {"lr": 1e-30}  # (> 0): the weights do not move
    trainer = loop.Trainer(build_config(raw))
    summary = trainer.train()
    assert summary["stop"] == "early stopping" and summary["steps"] == 2
    with open(tmp_path / "metrics.csv", newline="") as f:
        primary = [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f)
                   if r["split"] == "val" and r["name"] == "primary"]
    steps = [s for s, _ in primary]
    assert len(steps) == len(set(steps)), steps
    assert all(not name.startswith("box/") for name in summary["val"])
    assert primary[-1][1] == pytest.approx(summary["val"]["mol/forces_mae"])
    raw["loop"] = {**raw["loop"], "early_stop_patience": 0, "min_lr": 1e-20}
    assert loop.Trainer(build_config({**raw, "overwrite": True})).train()["stop"] == "min lr"
    assert steps == [1, 2] and trainer.bad_validations == 1


def finetune_config(data, run_dir, init="", forces="gradient", **model_kw):
    return {"mode": "finetune", "run_dir": str(run_dir), "graph": {"cutoff": 4.0, "max_neighbors": 8},
            "tasks": [{"name": "mol", "train": str(data / "mol" / "train"), "val": str(data / "mol" / "val"),
                       "test": str(data / "mol" / "test"), "forces": forces,
                       "targets": [{"name": "energy", "kind": "energy"},
                                   {"name": "forces", "kind": "forces", "coef": 10.0}]}],
            "model": {"backbone": "tiny", "init_checkpoint": str(init),
                      "backbone_overrides": {**SMALL, **model_kw.pop("backbone_overrides", {})}, **model_kw},
            "data": {"batch_size": 4, "val_batch_size": 8},
            "optim": {"lr": 1e-4, "llrd_embedding": 0.3, "llrd_blocks": [0.5]},
            "schedule": {"warmup": 1, "plateau_patience": 1},
            "loop": {"max_steps": 3, "val_every": 1, "ckpt_every": 10, "fit_scale_factors": 0, "progress": False}}


@pytest.mark.slow
def test_finetune_from_pretrained_checkpoint(tiny_data, tmp_path):
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre", max_steps=2))).train()
    pre = load_checkpoint(tmp_path / "pre" / "last.pt")
    cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "pre" / "last.pt"))
    trainer = loop.Trainer(cfg)
    net = trainer.model.net.state_dict()
    loaded = 0
    for k, v in net.items():
        if k.startswith(("embedding.", "backbone.")):
            # EMA weights for parameters, the run's buffers (scale factors) otherwise.
            ref = pre["ema"].get("net." + k, pre["model"]["net." + k])
            assert torch.equal(v, ref), k
            loaded += 1
    assert loaded > 50
    assert not any(k.startswith("backbone.out_mlp_F") for k in net)  # gradient forces: no force branch
    assert {g["name"]: g["lr_mult"] for g in trainer.optimizer.param_groups}["embedding"] == 0.3
    summary = trainer.train()
    assert set(summary["test"]) >= {"mol/energy_mae", "mol/forces_mae", "mol/forces_cos"}
    assert (tmp_path / "ft" / "test_metrics.json").is_file() and (tmp_path / "ft" / "best.pt").is_file()


@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup is now")  # (a longer run: true)
def test_a_resumed_fine_tune_does_not_need_its_init_checkpoint(tiny_data, tmp_path):
    """resume=true with the run's own config failed when the pretrained file it started from
    had moved ("model.init_checkpoint: ... does not exist"), though last.pt holds the weights."""
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre"))).save_last()
    raw = finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "pre" / "last.pt")
    raw["loop"]["max_steps"] = 2
    loop.Trainer(build_config(raw)).train()
    (tmp_path / "pre" / "last.pt").unlink()
    raw["loop"]["max_steps"] = 3
    assert loop.Trainer(build_config({**raw, "resume": True})).train()["steps"] == 3


def test_wrong_architecture_checkpoint(tiny_data, tmp_path):
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre"))).save_last()  # untrained is enough
    cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "pre" / "last.pt",
                                       backbone_overrides={"emb_size_atom": 16}))
    with pytest.raises(TrainError, match=r"does not fit the configured network .*shape mismatch.*; the checkpoint "
                                         r"was trained with model.backbone=tiny and model.backbone_overrides=\{"):
        loop.Trainer(cfg)
    cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "missing.pt"))
    with pytest.raises(TrainError, match=r"init_checkpoint: .*missing\.pt does not exist$"):
        loop.Trainer(cfg)
    cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init="jmp-s.pt"))  # (the README's name)
    with pytest.raises(TrainError, match=r"init_checkpoint: jmp-s\.pt does not exist; JMP's release is at "
                                         r"https://jmp-iclr-datasets.s3.amazonaws.com/jmp-s\.pt$"):
        loop.Trainer(cfg)
    cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "pre"))
    with pytest.raises(TrainError, match=r"init_checkpoint: .*pre is a directory; give the checkpoint file"):
        loop.Trainer(cfg)
    # A JMP-style file records no config: the preset its shapes fit is named (a JMP-L file with a
    # JMP-S config listed 204 keys and shapes).
    torch.save({"state_dict": PretrainModel(BackboneConfig.tiny(), ["oc20"]).state_dict()}, tmp_path / "jmp.ckpt")
    cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "jmp.ckpt",
                                       backbone_overrides={"emb_size_atom": 16}))
    with pytest.warns(UserWarning, match="no EMA weights"), \
            pytest.raises(TrainError, match=r"does not fit the configured network \(checkpoint does not match the "
                                            r"model: its backbone has the shapes of BackboneConfig\.tiny\(\) "
                                            r"\(model\.backbone=tiny with no backbone_overrides\), the model's "
                                            r"differ; "):
        loop.Trainer(cfg)
    # Not a checkpoint at all, or some other torch file: said so, not "does not fit the network".
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"a": 1}, tmp_path / "other.pt")
    for name, message in [("notes.txt", "is not a readable torch checkpoint"), ("other.pt", "not a JMP or jmp_ext")]:
        cfg = build_config(finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / name))
        with pytest.raises(TrainError, match=rf"^model\.init_checkpoint: .*{message}"):
            loop.Trainer(cfg)


def _predictions(checkpoint, structures, task):
    from jmp_ext.train.inference import load_trained, predict_structures

    model, config = load_trained(checkpoint)
    return predict_structures(model, structures, [t.name for t in config.tasks].index(task))


def test_init_heads_starts_a_task_as_the_checkpoint_predicted(tiny_data, tmp_path):
    """model.init_heads: a task the checkpoint trained under the same name keeps its heads and
    normalisation (here at another index and on other data, whose statistics differ), so the new
    run first predicts as the checkpoint did; a task it did not train starts new."""
    from jmp_ext.data import LmdbDataset

    from jmp_ext.train.checkpoint import save_checkpoint

    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre", max_steps=2))).train()
    state = load_checkpoint(tmp_path / "pre" / "last.pt")
    state["model"]["train_elements"][0, 79] = True  # (as if its "mol" data had held gold)
    save_checkpoint(tmp_path / "pre" / "last.pt", state)
    raw = pretrain_config(tiny_data, tmp_path / "more")
    raw["tasks"] = [{**raw["tasks"][1], "name": "extra"}, {**raw["tasks"][0], "train": str(tiny_data / "box" / "train")}]
    raw["model"].update(init_checkpoint=str(tmp_path / "pre" / "last.pt"), init_heads=True)
    trainer = loop.Trainer(build_config(raw))
    assert trainer.initialised_heads == ["mol"]
    # The elements its heads were trained on join the task's (Au here, which no data of this run has)
    assert trainer.model.train_elements[1, 79] and not trainer.model.train_elements[0, 79]
    trainer.save_last()
    structures = [LmdbDataset(tiny_data / "mol" / "test")[i] for i in range(3)]
    before = _predictions(tmp_path / "pre" / "last.pt", structures, "mol")
    after = _predictions(tmp_path / "more" / "last.pt", structures, "mol")
    assert before.keys() == after.keys() and {"energy", "forces"} <= before.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-6, msg=name)
    # The new task's heads are new: not the checkpoint's "mol" or "box" ones.
    pre = load_checkpoint(tmp_path / "pre" / "last.pt")["ema"]
    extra = trainer.model.state_dict()["net.output.out_energy.0.0.weight"]
    assert not any(torch.equal(extra, pre[f"net.output.out_energy.{j}.0.weight"]) for j in (0, 1))
    # Without init_heads, the checkpoint's normalisation is not taken either: the run's own statistics.
    raw["model"]["init_heads"] = False
    fresh = loop.Trainer(build_config({**raw, "run_dir": str(tmp_path / "fresh")}))
    assert fresh.initialised_heads == []
    assert not torch.equal(fresh.model.norm_linref[1], trainer.model.norm_linref[1])


def test_init_heads_continues_a_fine_tune(tiny_data, tmp_path):
    """A fine-tune continued on more data (its heads, force MLP and normalisation kept)."""
    from jmp_ext.data import LmdbDataset

    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre"))).save_last()
    first = finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "pre" / "last.pt", forces="direct")
    loop.Trainer(build_config(first)).train()
    more = finetune_config(tiny_data, tmp_path / "more", init=tmp_path / "ft" / "best.pt", forces="direct",
                           init_heads=True)
    more["tasks"][0].update(train=str(tiny_data / "mol" / "val"), val=str(tiny_data / "mol" / "test"))
    loop.Trainer(build_config(more)).save_last()
    structures = [LmdbDataset(tiny_data / "mol" / "test")[i] for i in range(3)]
    before = _predictions(tmp_path / "ft" / "best.pt", structures, "mol")
    after = _predictions(tmp_path / "more" / "last.pt", structures, "mol")
    for name in ("energy", "forces"):
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-6, msg=name)


def test_init_heads_refusals(tiny_data, tmp_path):
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre"))).save_last()
    pre = tmp_path / "pre" / "last.pt"
    with pytest.raises(ConfigError, match="model.init_heads needs model.init_checkpoint"):
        build_config(finetune_config(tiny_data, tmp_path / "ft", init="", init_heads=True))
    loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "ft", init=pre, forces="direct"))).save_last()
    renamed = pretrain_config(tiny_data, tmp_path / "r")
    for task in renamed["tasks"]:
        task["name"] += "2"
    torch.save({"state_dict": PretrainModel(BackboneConfig.tiny(**SMALL), ["mol"]).state_dict()}, tmp_path / "jmp.ckpt")
    other_unit = load_checkpoint(tmp_path / "ft" / "last.pt")  # (its energy in another unit than this data's)
    other_unit["config"]["tasks"][0]["targets"][0]["unit"] = "kcal/mol"
    torch.save(other_unit, tmp_path / "other_unit.pt")
    cases = [(finetune_config(tiny_data, tmp_path / "a", init=pre), pre,
              r"a pretrain checkpoint and this run a finetune: their heads differ"),
             (renamed, pre, r"trained the tasks \['box', 'mol'\], none of this run's \['mol2', 'box2'\]"),
             (finetune_config(tiny_data, tmp_path / "b"), tmp_path / "ft" / "last.pt",
              r"tasks.0 \(mol\) has other targets or forces than .*last.pt's task of that name \(forces: direct -> "
              r"gradient\): keep the checkpoint's, or set model.init_heads=false to start the heads new"),
             (pretrain_config(tiny_data, tmp_path / "c"), tmp_path / "jmp.ckpt", "is not a jmp_ext run's checkpoint"),
             (finetune_config(tiny_data, tmp_path / "d", forces="direct"), tmp_path / "other_unit.pt",
              r"tasks.0 \(mol\) has other targets or forces than .*\(targets.0.unit: 'kcal/mol' -> 'eV'\)")]
    for raw, checkpoint, message in cases:
        raw["model"].update(init_checkpoint=str(checkpoint), init_heads=True, init_ema=checkpoint != tmp_path / "jmp.ckpt")
        with pytest.raises(TrainError, match=r"^model\.init_heads: .*" + message):
            loop.Trainer(build_config(raw))


def test_pretraining_says_how_it_samples_and_warns_of_periodic_data_on_molecule_graphs(tiny_data, tmp_path, capsys):
    """The sampling probabilities were nowhere to be read; and a periodic task given a
    molecule preset (ani1x) trained its crystals as isolated clusters without a word, where
    predict and the calculator warn."""
    raw = pretrain_config(tiny_data, tmp_path / "pre")
    raw["tasks"][0].update(train=str(tiny_data / "mol" / "val"), val=str(tiny_data / "mol" / "test"))  # 4 vs box's 12
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = loop.Trainer(build_config(raw))
        trainer.log.close()
    p = 4 ** 0.5 / (4 ** 0.5 + 12 ** 0.5)  # p_i ∝ N_i^(1/T); the largest task once per epoch: 12 / (1 - p) draws
    assert (f"temperature sampling (data.temperature=2), per epoch of {trainer.steps_per_epoch} steps: mol 4 "
            f"structures, p {p:.3f}, {round(p * 12 / (1 - p))} drawn; box 12 structures, p {1 - p:.3f}, 12 drawn"
            ) in capsys.readouterr().out
    # data.temperature reaches the sampler (T = 1: in proportion to the sizes, 4 / 16)
    raw["data"]["temperature"] = 1.0
    trainer = loop.Trainer(build_config(raw, [f"run_dir={tmp_path / 't1'}"]))
    trainer.log.close()
    assert "mol 4 structures, p 0.250, 4 drawn; box 12 structures, p 0.750, 12 drawn" in capsys.readouterr().out
    # T < 1 shrinks the small task's share: 12 * (1/3)^(1/0.3) rounds to none, and its heads never
    # trained (the line above said "0 drawn", nothing else).
    raw["data"]["temperature"] = 0.3
    with pytest.raises(TrainError, match=r"data.temperature=0.3 draws no structure of mol \(4 structures\) in an "
                                         r"epoch of 12: its heads would never train; raise data.temperature"):
        loop.Trainer(build_config(raw, [f"run_dir={tmp_path / 't03'}"]))
    raw["data"]["temperature"] = 2.0
    raw["tasks"][1]["graph"] = {"preset": "ani1x"}
    with pytest.warns(UserWarning, match=r"tasks\.1 \(box\): its graphs are non-periodic \(graph preset 'ani1x'\), "
                                         r"but its training data is periodic \(.*box/train entry 0\)"):
        loop.Trainer(build_config(raw, [f"run_dir={tmp_path / 'pbc'}"])).log.close()


def test_a_finetune_on_other_graphs_than_the_checkpoints_is_pointed_out(tiny_data, tmp_path, capsys):
    """The demo's checkpoint is at 5 Å / 8 neighbours; a fine-tune that leaves graph: out builds
    OC20's 12 Å / 30 and starts far from the pretrained weights (forces_cos -0.15 after 20 steps
    in a user's run, 0.96 at the checkpoint's graph)."""
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre"))).save_last()
    init = tmp_path / "pre" / "last.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the checkpoint's own graph: no warning
        loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "same", init=init))).log.close()
    assert f"initialised the embedding and backbone from {init} (its EMA weights where it has them)" in \
        capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"last\.pt was trained on graphs with cutoff 4 Å, max_neighbors 8; this run "
                                         r"builds cutoff 5 Å, max_neighbors 8\. .*set graph\.cutoff"):
        trainer = loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "other", init=init),
                                            ["graph.cutoff=5"]))
    trainer.log.close()
    # A molecule preset's non-periodic graphs count too, not only the cutoff and k
    with pytest.warns(UserWarning, match=r"this run builds cutoff 4 Å, max_neighbors 8, non-periodic\."):
        trainer = loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "spice", init=init),
                                            ["graph.preset=spice"]))
    trainer.log.close()
    # but not MatBench's smaller k above 200 atoms, JMP's recipe for fine-tuning its checkpoints
    # (it warned on a user's cells of 2-4 atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "matbench", init=init),
                                  ["graph.preset=matbench"])).log.close()


def test_the_weight_of_gradient_forces_is_said_with_jmps_equivalent(tiny_data, tmp_path, capsys):
    """Gradient forces are weighted coef / energy std where JMP's are coef / force RMS (README):
    a preset's coefficients balanced energy and forces other than JMP's without a word."""
    from jmp_ext.data import load_stats

    loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "run"))).log.close()
    stats = load_stats(tiny_data / "mol" / "train")
    std, rms = stats["targets"]["energy"]["std"], stats["force_rms"]
    line = next(x for x in capsys.readouterr().out.splitlines() if "gradient forces, weighted" in x)
    assert line == (f"tasks.0.targets.1 (forces): gradient forces, weighted coef / energy std = 10 / {std:.4g} eV; "
                    f"for JMP's weight of this coef, coef / force RMS ({rms:.4g} eV/Å), set coef {10 * std / rms:.4g}")
    loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "direct", forces="direct"))).log.close()
    assert "gradient forces, weighted" not in capsys.readouterr().out


def test_init_from_half_precision_weights_reads_and_warns_once(tiny_data, tmp_path):
    """init_from_checkpoint read the weights, then load_jmp_checkpoint read them again: every
    check twice, and the bfloat16 warning twice."""
    net = PretrainModel(BackboneConfig.tiny(**SMALL), ["mol"])
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in net.state_dict().items()},
               tmp_path / "half.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "run", init=tmp_path / "half.pt",
                                                  forces="direct"))).log.close()
    assert sum("weights in bfloat16" in str(w.message) for w in caught) == 1


def test_init_ema_false_from_a_best_pt_says_it_holds_the_ema_weights(tiny_data, tmp_path, capsys):
    """A best.pt holds its run's validated weights, the EMA ones: model.init_ema=false loaded them
    and the log said "its raw weights"."""
    pretrain = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "pre")))
    pretrain.save_best({})
    pretrain.save_last()
    pretrain.log.close()
    raw = finetune_config(tiny_data, tmp_path / "ft", init=tmp_path / "pre" / "best.pt")
    with pytest.warns(UserWarning, match=r"model.init_ema=false, but .*best.pt \(a best.pt\) holds only its run's "
                                         r"validated weights, which are the EMA weights .* in the run's last.pt"):
        loop.Trainer(build_config(raw, ["model.init_ema=false"])).log.close()
    assert "(its raw weights where it has them)" in capsys.readouterr().out
    with warnings.catch_warnings():  # (last.pt has both)
        warnings.simplefilter("error", UserWarning)
        raw = finetune_config(tiny_data, tmp_path / "ft2", init=tmp_path / "pre" / "last.pt")
        loop.Trainer(build_config(raw, ["model.init_ema=false"])).log.close()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_in_fp32_on_the_cpu_and_say_so(tiny_data, tmp_path, precision):
    """bf16 / fp16 autocast only on a GPU: on the CPU the run trains in fp32 (no autocast, float32
    weights), and the warning says so, and that config.yaml keeps the setting a GPU resume uses."""
    raw = pretrain_config(tiny_data, tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match=rf"loop.precision={precision} autocasts on GPUs only: this run trains in "
                                         rf"fp32 on the CPU \(its config.yaml keeps {precision}, which a resume on a "
                                         r"GPU uses\)"):
        trainer = loop.Trainer(build_config(raw, [f"loop.precision={precision}"]))
    assert trainer.autocast is None and trainer.scaler is None and trainer.dtype == torch.float32
    trainer.release_run_dir()


def test_fp16_overflows_lower_the_scale_and_training_goes_on(tiny_data, tmp_path, capsys):
    """loop.precision=fp16 on a GPU: autocast + GradScaler. Run here on the CPU (which has both),
    from a scale so large that the first steps overflow: each overflow halves the scale and skips
    the step without counting as a bad step (the log says so), until the optimizer steps with
    finite gradients."""
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path, max_steps=12, max_nan_steps=2,
                                                        ema_decay=0.0, val_every=0)))
    trainer.autocast = torch.float16
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()  # with max_nan_steps=2, counting the overflows would raise TrainError
    scale = trainer.scaler.get_scale()
    assert scale < 2.0**24 / 4, scale
    assert trainer.nan_streak == 0
    skips = re.findall(r"step (\d+): fp16 gradients overflowed at loss scale (\S+), step skipped; scale now (\S+)",
                       capsys.readouterr().out)
    assert skips and [float(a) for _, a, _ in skips] == pytest.approx([2.0**24 / 2**k for k in range(len(skips))],
                                                                       rel=1e-5)  # (printed to 6 digits)
    assert [float(now) for _, _, now in skips] == pytest.approx([float(at) / 2 for _, at, _ in skips], rel=1e-5)
    assert [int(step) for step, _, _ in skips] == list(range(1, len(skips) + 1))
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "no step was taken after the overflows"
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_each_pretraining_task_gets_its_own_graphs(tiny_data, tmp_path):
    """JMP pretrains OC20/OC22 on periodic 12 Å graphs and ANI-1x/T1x on 8 Å molecular ones; a
    task's `graph` settings must reach the structures of that task in mixed batches."""
    presets = tasks.graph_configs(build_config({"preset": "jmp_s_pretrain"}, [f"tasks.{i}.train=x" for i in range(4)]))
    assert [(g.cutoff_a2a, g.max_neighbors, g.pbc) for g in presets] == [
        (12.0, 30, True), (12.0, 30, True), (8.0, 30, False), (8.0, 30, False)]
    # The run's graph.cutoff / graph.max_neighbors still change every task (unless a task sets its own).
    overridden = tasks.graph_configs(build_config({"preset": "jmp_s_pretrain"}, [
        *[f"tasks.{i}.train=x" for i in range(4)], "graph.cutoff=6.0", "graph.max_neighbors=10",
        "tasks.3.graph.cutoff=5.0"]))
    assert [(g.cutoff_a2a, g.max_neighbors, g.pbc) for g in overridden] == [
        (6.0, 10, True), (6.0, 10, True), (6.0, 10, False), (5.0, 10, False)]

    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "run"),
                                        ["tasks.0.graph={preset: ani1x, cutoff: 2.0, max_neighbors: 4}"]))
    batch = next(iter(batches.load_batches(trainer.train_set, [list(range(len(trainer.train_set)))], torch.float32)))
    assert set(batch["task"].tolist()) == {0, 1}
    graphs = trainer.model.graphs(batch)
    for name in ("main", "a2ee2a"):
        g = graphs[name]
        task = batch["task"][batch["batch"][g["edge_index"][1]]]
        neighbors = torch.bincount(g["edge_index"][1], minlength=batch["pos"].shape[0])
        assert g["distance"][task == 0].max() <= 2.0 < g["distance"][task == 1].max() <= 4.0, name
        if name == "a2ee2a":  # (main is symmetrised: an atom can get more than k edges)
            assert neighbors[batch["task"][batch["batch"]] == 0].max() == 4 * 20 // 30
    trainer.train()


def test_a_val_split_that_holds_training_entries_is_pointed_out(tmp_path):
    """Training on a dataset and validating on a part split from it (or the other way round, or
    on a copy, or on parts of two splits of it) measured the fit of the training data as the
    train-as-val case does, without a word; parts of one split side by side are the normal
    case, and so is a part of a source since rewritten with other data."""
    import shutil

    from helpers import write_molecules

    from jmp_ext.data import LmdbDataset
    from jmp_ext.data.split import split_dataset

    source = write_molecules(tmp_path / "all", 12, seed=5)
    parts = split_dataset(source, tmp_path / "parts", {"train": np.arange(8), "val": np.arange(8, 12)})
    other = split_dataset(source, tmp_path / "other", {"train": np.arange(4, 12), "val": np.arange(4)})
    shutil.copytree(source, tmp_path / "copy")
    full, train, val = LmdbDataset(source), LmdbDataset(parts["train"]), LmdbDataset(parts["val"])
    assert re.fullmatch(r"\(.*parts/val\) was split from the dataset the run trains on \(.*all\): its entries are "
                        r"training entries too", tasks.shared_entries(full, val))
    assert re.fullmatch(r"\(.*all\) is the dataset the training split \(.*parts/train\) was split from: it holds "
                        r"every training entry", tasks.shared_entries(train, full))
    assert re.fullmatch(r"\(.*copy\) is a copy of the training split \(.*all\)",
                        tasks.shared_entries(full, LmdbDataset(tmp_path / "copy")))
    assert re.fullmatch(r"\(.*other/val\) and the training split \(.*parts/train\) are parts of two splits of one "
                        r"dataset \(.*all\): they may share entries",
                        tasks.shared_entries(train, LmdbDataset(other["val"])))
    assert tasks.shared_entries(train, val) is None and tasks.shared_entries(val, train) is None
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=str(parts["train"]), val=source, test="")
    with pytest.warns(UserWarning, match=r"tasks.0.val \(.*\) is the dataset the training split .* was split from: it "
                                         r"holds every training entry: its metrics, and best.pt chosen by them"):
        loop.Trainer(build_config(raw)).log.close()
    write_molecules(tmp_path / "all", 12, seed=6)  # (the source rewritten: its old parts share nothing with it)
    assert tasks.shared_entries(LmdbDataset(source), val) is None


def test_out_of_memory_says_what_to_lower(tiny_data, tmp_path, monkeypatch):
    """A batch too large for the memory gave torch's allocator error alone (no batch, no advice),
    in training and in validation."""
    trainer = loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "run", forces="direct")))
    original = tasks.TaskModel.forward

    def allocation_fails(self, batch, *args):
        if not self.training or trainer.step == 0:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
        return original(self, batch, *args)

    monkeypatch.setattr(tasks.TaskModel, "forward", allocation_fails)
    message = (r"out of memory on a batch of \d+ structures, \d+ atoms \(the largest \d+\): lower data.max_atoms or "
               r"data.batch_size \(validation: data.val_batch_size; eval and predict: --batch-size\), or "
               r"graph.max_neighbors / graph.cutoff, .* \(RuntimeError: DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(TrainError, match=message):
        trainer.train()
    with pytest.raises(TrainError, match=message):
        trainer.evaluate("val")
    # In the backward pass, where gradient forces take the most memory, too.
    monkeypatch.setattr(tasks.TaskModel, "forward", original)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *args, **kwargs: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")))
    with pytest.raises(TrainError, match=message):
        trainer.train_step(next(trainer._epoch_batches()))
    monkeypatch.setattr(tasks.TaskModel, "forward", lambda self, batch, *args: (_ for _ in ()).throw(
        RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"):  # (others unchanged)
        trainer.evaluate("val")


def test_scalar_target_with_per_element_references(tmp_path):
    """JMP subtracts per-element references from QM9's extensive targets (U_0, U, H, G, ZPVE,
    c_v) before normalising: the network then learns the small residual, not -100 eV per atom."""
    from helpers import write_molecules

    from jmp_ext.data import load_stats

    data = write_molecules(tmp_path / "u0", 16, seed=4, u0=True)
    stats = load_stats(data)
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=data, val=data, test="",
                           targets=[{"name": "u0", "kind": "scalar", "reduction": "sum", "linref": True}])
    raw["loop"].update(max_steps=2, val_every=0)
    with pytest.warns(UserWarning, match=r"tasks.0.val is the training split itself .*: its metrics, and best.pt "
                                         r"chosen by them, measure how well the training data are fitted"):
        trainer = loop.Trainer(build_config(raw))
    model = trainer.model
    fit = stats["linrefs"]["u0"]
    assert torch.equal(model.norm_u0_linref[0], torch.as_tensor(fit["linref"]))
    assert model.norm_u0_std.item() == fit["std"] < 0.1 * stats["targets"]["u0"]["std"]
    batch = next(trainer._epoch_batches())
    model.eval()
    with torch.no_grad():
        out = model.net(batch, model.graphs(batch))["u0"].double()
        pred = model(batch)["u0"]
    refs = torch.zeros_like(pred).index_add_(0, batch["batch"], model.norm_u0_linref[0, batch["atomic_numbers"]])
    # (no per-structure mean: the references carry the offset, and the prediction stays extensive)
    assert model.norm_u0_mean.item() == 0.0 and fit["mean"] != 0.0
    torch.testing.assert_close(pred, out * fit["std"] + refs, rtol=1e-12, atol=1e-9)
    # Physical predictions stay close to the labels (-100 eV per unit of Z away without references).
    assert (pred - batch["u0"]).abs().max() < 50 * fit["std"] + 1.0
    summary = trainer.train()
    assert summary["val"]["mol/u0_mae"] < 10.0

    with pytest.raises(ConfigError, match="linref is for scalar targets"):
        build_config({**raw, "tasks": [{**raw["tasks"][0], "targets": [{"name": "forces", "kind": "forces", "linref": True}]}]})
    for bad in ({"normalize": False}, {"reduction": "mean"}):
        with pytest.raises(ConfigError, match="linref needs normalize: true and reduction: sum"):
            build_config({**raw, "tasks": [{**raw["tasks"][0], "targets": [{**raw["tasks"][0]["targets"][0], **bad}]}]})
    # An int label has no references (its stats have none): said so, not "recompute the stats".
    cls_data = write_molecules(tmp_path / "cls", 4, seed=5, classes=2)
    raw["tasks"][0].update(train=cls_data, val="", targets=[{"name": "cls", "kind": "scalar", "linref": True}])
    raw["overwrite"] = True
    with pytest.raises(TrainError, match="'cls' is int64 .* fitted on float labels"):
        loop.Trainer(build_config(raw))


def test_given_references_replace_the_fitted_ones(tmp_path, monkeypatch, capsys):
    """TargetConfig.references (isolated-atom energies, JMP's QM9 atom energies): the model's
    references are the given ones plus one per-atom shift, the least-squares fit of the residual
    r = y - sum_i references[Z_i] on the atom count (MACE's), and the std that of r minus it
    (checked against numpy on the dataset): isolated-atom energies leave r the binding energy,
    tens of eV per structure, which a network normalised with mean 0 could not learn (a review
    measured 16.8 eV validation MAE against 0.17 eV with fitted references). An element without
    one is named; a head trained with other references is not continued (init_heads)."""
    from helpers import write_molecules

    from jmp_ext.data import LmdbDataset

    data = write_molecules(tmp_path / "u0", 16, seed=4, u0=True)
    given = {"H": -13.6, "C": -1029.5, "N": -1484.0, "O": -2041.8}
    energy_refs = {"H": 1.5, "C": 2.0, "N": -0.5, "O": 3.0}
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=data, val="", test="", targets=[
        {"name": "energy", "kind": "energy", "references": energy_refs},
        {"name": "u0", "kind": "scalar", "linref": True, "references": given}])
    raw["loop"].update(max_steps=1, val_every=0)
    trainer = loop.Trainer(build_config(raw))
    model = trainer.model
    trainer.train()
    logged = capsys.readouterr().out
    ds = LmdbDataset(data)
    numbers = [ds.read(i)["atomic_numbers"] for i in range(len(ds))]
    natoms = np.array([len(z) for z in numbers], dtype=float)
    for name, refs, linref in [("energy", energy_refs, model.norm_linref), ("u0", given, model.norm_u0_linref)]:
        residual = np.array([float(ds.read(i)[name]) - sum(refs[chemical_symbols[z]] for z in numbers[i])
                             for i in range(len(ds))])
        ((shift,),), *_ = np.linalg.lstsq(natoms[:, None], residual[:, None], rcond=None)
        expected = torch.zeros(119, dtype=torch.float64)
        for symbol, value in refs.items():
            expected[atomic_numbers[symbol]] = value + shift
        torch.testing.assert_close(linref[0], expected, rtol=1e-12, atol=1e-9, msg=name)
        shifted = residual - shift * natoms
        assert getattr(model, f"norm_{name}_std").item() == pytest.approx(shifted.std(), rel=1e-9), name
        assert getattr(model, f"norm_{name}_mean").item() == 0.0
        assert abs(shifted.mean()) < min(shifted.std(), 0.5 * abs(residual.mean())), name  # (the offset absorbed)
        k, unit = (0, " eV") if name == "energy" else (1, "")  # (and the run's log says what it uses; u0: as stored)
        assert (f"tasks.0.targets.{k} ({name}): the given references plus {shift:+.6g}{unit} per atom (fitted on the "
                f"training split), residual std {shifted.std():.6g}{unit}") in logged
    # The run's config.yaml holds them: a resume reads them back.
    # (and takes the normalisation from last.pt, without a pass over the split)
    with monkeypatch.context() as m:
        m.setattr(tasks, "with_given_references", lambda i, d: pytest.fail("recomputed the references' statistics"))
        resumed = loop.Trainer(load_config(tmp_path / "run" / "config.yaml", ["resume=true"]))
    assert resumed.config.tasks[0].targets[1].references == given
    assert torch.equal(resumed.model.norm_u0_linref, model.norm_u0_linref)
    assert torch.equal(resumed.model.norm_energy_std, model.norm_energy_std)
    resumed.release_run_dir()
    # A head trained with other references predicts in other units: not continued.
    again = {**raw, "run_dir": str(tmp_path / "again"),
             "model": {**raw["model"], "init_checkpoint": str(tmp_path / "run" / "last.pt"), "init_heads": True}}
    again["tasks"] = [{**raw["tasks"][0], "targets": [raw["tasks"][0]["targets"][0], {**raw["tasks"][0]["targets"][1],
                                                                                       "references": None}]}]
    with pytest.raises(TrainError, match=r"model.init_heads: tasks.0 \(mol\) has other targets or forces than .* "
                                         r"\(targets.1.references: \{'H': -13.6, .*\} -> None\)"):
        loop.Trainer(build_config(again))
    # Every element of the training split needs a reference.
    raw["overwrite"] = True
    raw["tasks"][0]["targets"][1]["references"] = {"H": -13.6, "C": -1029.5}
    with pytest.raises(TrainError, match=r"tasks\.0\.targets\.1\.references has no reference for N, O, element\(s\) "
                                         r"of the train split"):
        loop.Trainer(build_config(raw))
    # Only where fitted references would be: an energy or a linref scalar, normalised.
    for target in ({"name": "u0", "kind": "scalar", "references": given},
                   {"name": "energy", "kind": "energy", "normalize": False, "references": given}):
        with pytest.raises(ConfigError, match="references replace the fitted per-element references of an energy"):
            build_config({**raw, "tasks": [{**raw["tasks"][0], "targets": [target]}]})
    with pytest.raises(ConfigError, match="references: 'Hx' is not an element symbol"):
        build_config({**raw, "tasks": [{**raw["tasks"][0], "targets": [
            {"name": "energy", "kind": "energy", "references": {"Hx": 1.0}}]}]})
    with pytest.raises(ConfigError, match=r"references: False is not an element symbol .* \(YAML reads a bare No as "
                                          r"false: write 'No'\)"):
        build_config(raw, ["tasks.0.targets.0.references={No: -1.0}"])


@pytest.mark.filterwarnings("ignore:tasks.0.val is the training split itself")  # (one small dataset serves both)
def test_spatial_extent_target_trains_unnormalised(tmp_path):
    """QM9's R² with JMP's head: the prediction is the head's sum_i s_i |r_i - COM|^2 itself
    (no mean, std or references), and it trains; a normalised one is refused up front."""
    from helpers import write_molecules

    data = write_molecules(tmp_path / "r2", 8, seed=6, r2=True)
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=data, val=data, test="",
                           targets=[{"name": "r2", "kind": "scalar", "reduction": "spatial_extent",
                                     "normalize": False}])
    raw["loop"].update(max_steps=2, val_every=0)
    trainer = loop.Trainer(build_config(raw))
    model = trainer.model
    batch = next(trainer._epoch_batches())
    model.eval()
    with torch.no_grad():
        out = model.net(batch, model.graphs(batch))["r2"]
        torch.testing.assert_close(model(batch)["r2"], out.double(), rtol=0, atol=0)
    summary = trainer.train()
    assert summary["val"]["mol/r2_mae"] >= 0
    for bad in ({}, {"normalize": False, "linref": True}):
        with pytest.raises(ConfigError, match="spatial_extent is JMP's R² head, for a kind scalar target with "
                                              "normalize: false and linref: false"):
            build_config({**raw, "tasks": [{**raw["tasks"][0], "targets": [
                {"name": "r2", "kind": "scalar", "reduction": "spatial_extent", **bad}]}]})


def test_resume_restores_the_force_scale(tiny_data, tmp_path):
    """Gradient forces under fp16 have their own scale (jmp_ext.models.force_scaler), which a
    resumed run continues from, as it does the GradScaler's."""
    raw = finetune_config(tiny_data, tmp_path / "run")
    raw["loop"].update(max_steps=1, val_every=0)
    trainer = loop.Trainer(build_config(raw))
    trainer.train()
    trainer.force_scaler.scale, trainer.force_scaler.finite_in_a_row = 64.0, 5
    trainer.save_last()
    resumed = loop.Trainer(build_config({**raw, "resume": True}))
    assert resumed.force_scaler is resumed.model.net.force_scaler
    assert resumed.force_scaler.state_dict() == {"scale": 64.0, "finite_in_a_row": 5}


def test_scale_factors_are_fitted_on_the_backbone_alone(tiny_data, tmp_path):
    """The trainer fits the ScaleFactors with backbone passes only (no heads, no gradient forces):
    the same factors as fitting with the whole network's forward."""
    import copy

    from jmp_ext.models import fit_scale_factors

    raw = finetune_config(tiny_data, tmp_path / "run")
    raw["loop"].update(fit_scale_factors=2)
    trainer = loop.Trainer(build_config(raw))
    net = copy.deepcopy(trainer.model.net)
    batches = [next(trainer._epoch_batches())]
    trainer.model.eval()
    expected = fit_scale_factors(net, [(b, trainer.model.graphs(b)) for b in batches], forward=lambda m, bg: m(*bg))
    fitted = fit_scale_factors(trainer.model.net, [(b, trainer.model.graphs(b)) for b in batches])
    assert fitted == expected and len(fitted) > 1


def test_without_a_progress_bar_the_log_shows_steps_and_validations(tiny_data, tmp_path, capsys):
    """loop.progress=false (batch jobs): a line per logged step and per validation, so that a
    log file shows the run advancing (a 15-minute run printed only its summary)."""
    loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "run", max_steps=4, log_every=2))).train()
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    steps = [line for line in lines if line.startswith("step ") and "/4: loss " in line]
    assert [line.split(":")[0] for line in steps] == ["step 2/4", "step 4/4"]
    assert all(" struct/s, " in line and " ETA 0:00:" in line for line in steps)
    validations = [line for line in lines if " validation: mean of mol/forces_mae, box/forces_mae " in line]
    assert [line.split()[1] for line in validations] == ["2", "4"]
    assert "(the best yet: saved best.pt)" in validations[0]


def test_throughput_leaves_validation_and_checkpoints_out(tiny_data, tmp_path, monkeypatch):
    """structures/s was a mean over all the time since the start: it halved after a validation
    (a slowdown that was not there), and the summary's "s training" counted validations."""
    from jmp_ext.train import logger

    clock = iter(range(0, 1000, 10))  # (each reading of the clock: 10 s later)
    monkeypatch.setattr(logger.time, "perf_counter", lambda: float(next(clock)))
    log = logger.RunLogger(tmp_path, enabled=False, start_step=0, total_steps=2, progress=False)
    log.start_clock()  # 0
    with log.paused():  # 10 .. 20
        pass
    log.step(structures=30, atoms=300)  # 30: 30 s since the start, 10 of them paused
    figures = log.throughput()  # 40
    assert figures["wall_seconds"] == 40 and figures["seconds"] == 30 and figures["structures_per_s"] == 1.0
    monkeypatch.undo()
    # A run's validations and checkpoints happen inside paused(), its training steps outside.
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "run", max_steps=2, val_every=1)))
    pausing, calls = [False], []

    @contextlib.contextmanager
    def paused():
        pausing[0] = True
        try:
            yield
        finally:
            pausing[0] = False

    def recorded(method):
        def call(*args, **kwargs):
            calls.append((method.__name__, pausing[0]))
            return method(*args, **kwargs)
        return call

    trainer.log.paused = paused
    for name in ("evaluate", "save_best", "_write_last", "train_step"):
        setattr(trainer, name, recorded(getattr(trainer, name)))
    trainer.train()
    assert {name for name, _ in calls} == {"evaluate", "save_best", "_write_last", "train_step"}
    assert all(inside == (name != "train_step") for name, inside in calls), calls


def test_a_failed_best_checkpoint_is_not_said_saved(tiny_data, tmp_path, capsys):
    """The validation line said "saved best.pt" before saving it; on a full disk the error came after."""
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "run", max_steps=2)))

    def full_disk(metrics):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "best.pt"))
    trainer.save_best = full_disk
    with pytest.raises(OSError, match="best.pt"):
        trainer.train()
    out = capsys.readouterr()
    assert "saved best.pt" not in out.out + out.err


def test_logged_training_figures_are_means_over_the_window(tiny_data, tmp_path):
    """A logged loss was one batch's (15.6 -> 68.1 -> 16.3 -> 90.4 in a user's pretraining run),
    and {task}/loss was missing whenever that batch had drawn no structure of the task. The
    same run logged every step gives the steps' own values to compare with."""
    def rows(name, log_every):
        loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / name, max_steps=4, log_every=log_every,
                                                  val_every=0))).train()
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return {(int(r["step"]), r["name"]): float(r["value"]) for r in csv.DictReader(f) if r["split"] == "train"}

    each, window, three = rows("each", 1), rows("window", 4), rows("three", 3)
    for name in ("loss", "loss_energy", "loss_forces", "grad_norm"):
        assert window[4, name] == pytest.approx(sum(each[k, name] for k in range(1, 5)) / 4, rel=1e-12), name
        # The run's last steps, short of a window (log_every=3 of 4 steps): logged at its end (they were lost).
        assert three[3, name] == pytest.approx(sum(each[k, name] for k in range(1, 4)) / 3, rel=1e-12), name
        assert three[4, name] == pytest.approx(each[4, name], rel=1e-12), name
    assert window[4, "lr"] == each[4, "lr"]
    # Per task, pooled over the window's structures (every term of these runs is per structure:
    # structure-wise force loss): the steps' own losses weighted by the task's structures in them.
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "batches")))
    trainer.log.close()
    offsets = [0, *np.cumsum(trainer.train_set.sizes)]
    for t, task in enumerate(("mol", "box")):
        counts = [sum(offsets[t] <= i < offsets[t + 1] for i in batch) for batch in trainer.sampler.batches(0)[:4]]
        own = {k: each[k, f"{task}/loss"] for k in range(1, 5) if (k, f"{task}/loss") in each}
        assert [k for k in range(1, 5) if counts[k - 1]] == list(own) and len(set(own.values())) > 1, task
        pooled = sum(counts[k - 1] * loss for k, loss in own.items()) / sum(counts)
        assert window[4, f"{task}/loss"] == pytest.approx(pooled, rel=1e-12), task


def test_a_run_resumed_between_two_logs_logs_the_same_means(tiny_data, tmp_path, monkeypatch):
    """The logging window (log_every=3) outlives a stop after step 2: last.pt keeps its sums,
    so the resumed run's step-3 means are the uninterrupted run's (they covered step 3 alone)."""
    def train_rows(name):
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return {(r["step"], r["name"]): r["value"] for r in csv.DictReader(f) if r["split"] == "train"}

    config = lambda name, *overrides: build_config(  # noqa: E731
        pretrain_config(tiny_data, tmp_path / name, log_every=3, val_every=0), list(overrides))
    loop.Trainer(config("full")).train()
    original = loop.Trainer.train_step

    def stopped_at_step_3(self, batch, stand_in):
        if self.step == 2:  # two steps done and in last.pt (ckpt_every=2), two of the window of three
            raise KeyboardInterrupt
        return original(self, batch, stand_in)

    monkeypatch.setattr(loop.Trainer, "train_step", stopped_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.Trainer(config("stopped")).train()
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    loop.Trainer(config("stopped", "resume=true")).train()
    full, resumed = train_rows("full"), train_rows("stopped")
    assert ("3", "loss") in full and ("3", "box/loss") in full
    assert resumed == full


def test_resume_without_a_checkpoint_says_it_starts_over(tiny_data, tmp_path):
    with pytest.warns(UserWarning, match=r"resume=true, but there is no .*nowhere/last.pt: starting a new run"):
        loop.Trainer(build_config({**pretrain_config(tiny_data, tmp_path / "nowhere"), "resume": True}))


def test_the_lock_is_never_written_through_a_link_or_a_fifo(tmp_path):
    """run_dir/.lock pointing elsewhere: writing the PID there truncated the file it pointed to
    (a crafted or unpacked run directory could wipe a user's file); a FIFO there would block."""
    from jmp_ext.train.run_dir import lock_run_dir, unlock_run_dir

    victim = tmp_path / "thesis.txt"
    victim.write_text("years of work\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(TrainError, match=r"\.lock is a symbolic link: a run writes its lock there; remove it"):
        lock_run_dir(run)
    assert victim.read_text() == "years of work\n"
    (run / ".lock").unlink()
    os.mkfifo(run / ".lock")
    with pytest.raises(TrainError, match=r"\.lock is not a regular file"):
        lock_run_dir(run)
    (run / ".lock").unlink()
    unlock_run_dir(lock_run_dir(run))  # (a regular file is made and locked)
    assert (run / ".lock").is_file()


def test_a_dropped_lock_is_released():
    """The at-fork hook's registry of locks must not keep a dropped Trainer's lock alive (a
    notebook or a sweep building another Trainer there was refused)."""
    import gc
    import tempfile

    from jmp_ext.train.run_dir import lock_run_dir, unlock_run_dir

    with tempfile.TemporaryDirectory() as run:
        lock = lock_run_dir(Path(run))
        del lock
        gc.collect()
        again = lock_run_dir(Path(run))  # (raises TrainError "in use" while the dropped lock is held)
        assert again is not None
        unlock_run_dir(again)


def test_a_killed_runs_forked_workers_do_not_keep_its_lock(tmp_path):
    """After a kill -9 of a training process, its DataLoader workers (forked, alive a few
    seconds more) kept the run_dir lock through their copy of its descriptor: an immediate
    requeue was refused as 'in use by another training run'."""
    from jmp_ext.train.run_dir import lock_run_dir, unlock_run_dir

    code = ("import os, sys, time; from pathlib import Path; from jmp_ext.train.run_dir import lock_run_dir\n"
            "lock = lock_run_dir(Path(sys.argv[1]))\n"
            "worker = os.fork()\n"
            "if worker == 0:\n    os.write(1, b'forked\\n')\n    time.sleep(30)\n    os._exit(0)\n"
            "os.write(1, f'{worker}\\n'.encode())  # (one write each: lines the two processes do not interleave)\n"
            "os._exit(0)  # (as killed: nothing released)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    # Both lines, in either order: the worker's says that fork has returned in it, at-fork hooks
    # run (a loaded machine may not have scheduled the child yet when its parent has exited).
    lines = {process.stdout.readline().strip(), process.stdout.readline().strip()}
    assert "forked" in lines
    worker = int((lines - {"forked"}).pop())  # (the pipe stays open in the worker: no wait for its end)
    assert process.wait(timeout=60) == 0
    try:
        os.kill(worker, 0)  # (the worker lives on)
        unlock_run_dir(lock_run_dir(tmp_path))
    finally:
        os.kill(worker, signal.SIGKILL)
        process.stdout.close()


@pytest.mark.parametrize("name, make", [("best.pt", Path.mkdir), ("summary.json", Path.mkdir), ("tb", Path.touch),
                                        ("tb", lambda tb: tb.symlink_to(tb.parent / "gone"))])
def test_a_run_file_blocked_by_something_else_is_found_before_training(tiny_data, tmp_path, name, make):
    """A directory named best.pt (or summary.json) stopped the run when it was written, after the
    training; a file named tb, with a bare "File exists"."""
    raw = pretrain_config(tiny_data, tmp_path / "run", max_steps=1)
    loop.Trainer(build_config(raw)).train()
    if (tmp_path / "run" / name).is_dir():  # (tb/, with TensorBoard installed)
        shutil.rmtree(tmp_path / "run" / name)
    (tmp_path / "run" / name).unlink(missing_ok=True)
    make(tmp_path / "run" / name)
    for resume in (False, True):  # (a resumed run wrote summary.json after its training too)
        with pytest.raises(TrainError, match=rf"run_dir .*run: the run writes its files \({name}\) where something "
                                             r"else is"):
            loop.Trainer(build_config({**raw, "resume": resume, "overwrite": not resume}))


def test_a_run_dir_is_used_by_one_run_at_a_time(tiny_data, tmp_path, monkeypatch):
    """A resume beside a run still going (its torchrun agent killed, its ranks not) trained
    alongside it, both writing last.pt and metrics.csv. The run holds a lock on run_dir until
    train() ends, however it ends; the OS drops it when a killed process dies."""
    raw = pretrain_config(tiny_data, tmp_path / "run", max_steps=2)
    first = loop.Trainer(build_config(raw))
    assert f"PID {os.getpid()} on " in (tmp_path / "run" / ".lock").read_text()
    in_use = rf"run_dir {tmp_path / 'run'} is in use by another training run \(a Trainer of this same process"
    with monkeypatch.context() as m, pytest.raises(TrainError, match=in_use):
        # (refused before its data and network are built: that can take minutes)
        m.setattr(tasks, "load_task_data", lambda config: pytest.fail("loaded the data of a run it refuses"))
        loop.Trainer(build_config({**raw, "overwrite": True}))
    assert (tmp_path / "run" / "config.yaml").is_file()  # (overwrite=true deleted nothing)
    with pytest.warns(UserWarning, match="no .*last.pt: starting a new run"), pytest.raises(TrainError, match=in_use):
        loop.Trainer(build_config({**raw, "resume": True}))
    first.train()
    loop.Trainer(build_config({**raw, "resume": True})).train()
    script = ("import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); "
              "f.truncate(0); f.write('PID 1 on elsewhere'); f.flush(); sys.stdout.write('locked'); "
              "sys.stdout.flush(); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run" / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.read(6) == "locked"
        with pytest.raises(TrainError, match=r"in use by another training run \(PID 1 on elsewhere\)"):
            loop.Trainer(build_config({**raw, "overwrite": True}))
    finally:
        holder.kill()
        holder.wait()
    untrained = loop.Trainer(build_config({**raw, "overwrite": True}))  # (its holder gone, the lock went with it)
    untrained.release_run_dir()  # (a Trainer that is not trained lets go of it so)
    loop.Trainer(build_config({**raw, "overwrite": True})).release_run_dir()
    (tmp_path / "file").write_text("notes")
    for run_dir, where in ((tmp_path / "file", ""), (tmp_path / "file" / "run", rf" \({tmp_path / 'file'} is one\)")):
        with monkeypatch.context() as m, pytest.raises(TrainError, match=rf"run_dir {run_dir} is a file, not a "
                                                                         rf"directory{where}: choose another"):
            m.setattr(tasks, "load_task_data", lambda config: pytest.fail("loaded the data of a run it refuses"))
            loop.Trainer(build_config({**raw, "run_dir": str(run_dir)}))
    # A failure after the lock was taken (config.yaml cannot be written) does not keep it.
    def full_disk(config, path):
        raise OSError(28, "No space left on device", str(path))
    with monkeypatch.context() as m, pytest.raises(OSError, match="config.yaml"):
        m.setattr(loop, "save_config", full_disk)
        loop.Trainer(build_config({**raw, "overwrite": True}))
    loop.Trainer(build_config({**raw, "overwrite": True})).release_run_dir()


@pytest.mark.filterwarnings("ignore:resume=true, but there is no")  # (the run meanwhile: a new one)
@pytest.mark.filterwarnings("ignore:resume. the cosine after the warmup")  # (it runs to step 4)
@pytest.mark.parametrize("second", [{}, {"resume": True}, {"overwrite": True}])
def test_a_run_that_ends_in_run_dir_while_another_starts_there_is_kept(tiny_data, tmp_path, monkeypatch, second):
    """The lock is taken once the data and network are built (minutes for large data): a run
    that started and finished in run_dir meanwhile was overwritten without a word, its
    last.pt, metrics.csv and summary replaced by the later run's (or, resuming, cut back to
    the older last.pt it had loaded)."""
    from jmp_ext.train.run_dir import lock_run_dir, unlock_run_dir

    raw = pretrain_config(tiny_data, tmp_path / "run", max_steps=2)
    if second.get("resume"):
        loop.Trainer(build_config(raw)).train()
    load = tasks.load_task_data

    def meanwhile(config):
        with monkeypatch.context() as m:
            m.setattr(tasks, "load_task_data", load)
            loop.Trainer(build_config({**raw, "resume": True, "loop": {**raw["loop"], "max_steps": 4}})).train()
        return load(config)

    monkeypatch.setattr(tasks, "load_task_data", meanwhile)
    with pytest.raises(TrainError, match=rf"run_dir {tmp_path / 'run'} changed while this run was starting: another "
                                         r"run wrote its last.pt meanwhile"):
        loop.Trainer(build_config({**raw, **second}))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["loop"]["step"] == 4
    unlock_run_dir(lock_run_dir(tmp_path / "run"))  # (the refused run let go of its lock)


def test_a_filesystem_without_locks_is_warned_about_not_fatal(tiny_data, tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"cannot be locked \(\[Errno 37\] No locks available\): make sure no other"):
        trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path / "run", max_steps=1)))
    trainer.train()


def test_a_failing_run_with_loader_workers_exits(tiny_data, tmp_path):
    """Workers ignore their first SIGTERM (a scheduler's stop is the training process's to
    handle); an exception in training kept their iterator alive to interpreter exit, whose one
    SIGTERM they ignored, and the process hung there instead of exiting."""
    import yaml

    raw = pretrain_config(tiny_data, tmp_path / "run", max_steps=4)
    raw["data"] = {**raw["data"], "num_workers": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    script = ("import sys; from jmp_ext.data.dataset import LmdbDataset; from jmp_ext.train.__main__ import main; "
              "LmdbDataset._read = lambda self, index: b'garbage bytes'; sys.exit(main([sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run.yaml")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    # (and a message: the worker's DataError, raised again by torch, is still the dataset's error)
    assert done.returncode == 2 and done.stderr.startswith("error: Caught DataError"), done.stderr[-2000:]


def test_a_fine_tune_from_scratch_says_so(tiny_data, tmp_path, capsys):
    """A preset's init_checkpoint is empty until given: a run without it trained a random
    network without a word (and, with the presets' fit_scale_factors=0, unscaled)."""
    loop.Trainer(build_config(finetune_config(tiny_data, tmp_path / "run")))
    out = capsys.readouterr()
    assert "model.init_checkpoint is empty: fine-tuning a randomly initialised network" in out.out + out.err


def test_a_constant_target_is_warned_of(tiny_data, tmp_path):
    """A band gap converted with --skip-invalid from a file whose metals wrote it as 0 (an
    integer, the others floats) kept the metals alone: a target of std 0 trained without a word."""
    from jmp_ext.data import DatasetWriter, LmdbDataset, compute_stats, save_stats

    for split in ("train", "val"):
        with DatasetWriter(tmp_path / split) as writer:
            for entry in LmdbDataset(tiny_data / "mol" / split):
                writer.add({**{name: value.numpy() for name, value in entry.items()}, "gap": np.float64(0.0)})
        save_stats(tmp_path / split, compute_stats(LmdbDataset(tmp_path / split)))
    raw = finetune_config(tiny_data, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=str(tmp_path / "train"), val=str(tmp_path / "val"), test="",
                           targets=[{"name": "gap", "kind": "scalar", "reduction": "mean"}])
    with pytest.warns(UserWarning, match=r"tasks.0 \(mol\): target 'gap' is 0.0 in every one of the 12 structures of "
                                         r".*train: there is nothing to learn"):
        loop.Trainer(build_config(raw)).release_run_dir()


def test_a_structure_without_edges_is_named_by_its_dataset_entry(tmp_path):
    """Atoms all farther apart than the cutoff (or one atom alone) give no graph: the error
    named positions in a batch ("structure(s) [0, 1, 2] of the batch"), not dataset entries."""
    import numpy as np

    from helpers import write_molecules

    from jmp_ext.data import DatasetWriter, LmdbDataset, compute_stats, save_stats

    data = write_molecules(tmp_path / "mol", 6, seed=1)
    apart = tmp_path / "apart"
    with DatasetWriter(apart) as writer:
        for k, entry in enumerate(LmdbDataset(data)):
            entry = {name: value.numpy() for name, value in entry.items()}
            if k == 4:  # two H atoms 10 Å apart
                entry.update(pos=np.array([[0.0, 0, 0], [10.0, 0, 0]]), atomic_numbers=np.array([1, 1]),
                             tags=np.full(2, 2), fixed=np.zeros(2, bool), forces=np.zeros((2, 3)))
            writer.add(entry)
    save_stats(apart, compute_stats(LmdbDataset(apart)))
    raw = finetune_config(tmp_path, tmp_path / "run", forces="direct")
    raw["tasks"][0].update(train=str(apart), val="", test="")
    raw["loop"].update(max_steps=3, val_every=0)
    raw["data"].update(batch_size=6)
    with pytest.raises(TrainError, match=rf"{apart} entry 4: no pair of atoms within cutoff_main=4.0 Å"):
        loop.Trainer(build_config(raw)).train()
    raw["loop"]["fit_scale_factors"] = 1  # (fitted on the first structures of every task, before any step)
    raw["overwrite"] = True
    with pytest.raises(TrainError, match=rf"{apart} entry 4: no pair of atoms"):
        loop.Trainer(build_config(raw)).train()
    raw["tasks"][0].update(train=data, val=str(apart))
    raw["loop"].update(val_every=1, fit_scale_factors=0)
    with pytest.raises(TrainError, match=rf"{apart} entry 4: no pair of atoms"):
        loop.Trainer(build_config(raw)).train()


def test_target_names_the_batch_uses_itself_are_refused(tiny_data, tmp_path):
    """A property named like one of the batch's own keys (its entries, task, natoms...) was
    overwritten by them: a target 'index' trained on entry numbers."""
    raw = finetune_config(tiny_data, tmp_path / "run", forces="direct")
    for name in ("natoms", "task", "_entry"):
        raw["tasks"][0]["targets"] = [{"name": name, "kind": "scalar"}]
        with pytest.raises(ConfigError, match=f"target '{name}': the batch uses that name itself"):
            build_config(raw)
    for name in ("energies", "energy_atoms"):  # (a scalar 'energies' replaced the per-atom energies)
        raw["tasks"][0]["targets"] = [{"name": name, "kind": "scalar"}]
        with pytest.raises(ConfigError, match=f"target '{name}': the model's predictions use that name itself"):
            build_config(raw)


def test_the_validation_line_names_only_the_tasks_validated(tiny_data, tmp_path):
    config = build_config(pretrain_config(tiny_data, tmp_path))
    assert tasks.describe_primary(config, {"mol/forces_mae": 0.5}, 0.5) == "mol/forces_mae 0.5"
    assert tasks.describe_primary(config, {"mol/forces_mae": 0.5, "box/forces_mae": 0.3}, 0.4) == \
        "mean of mol/forces_mae, box/forces_mae 0.4"


def test_what_ends_the_run_and_a_moved_cosine_are_said(tiny_data, tmp_path, capsys):
    """A preset's max_epochs silently capped a loop.max_steps override ("step 10/60"); a
    resumed run with a new length stretched the cosine (schedule.cosine=0 runs to the end) and
    its lr jumped, without a word."""
    raw = pretrain_config(tiny_data, tmp_path / "run", max_steps=50, max_epochs=1, val_every=0, ckpt_every=1)
    trainer = loop.Trainer(build_config(raw))
    out = capsys.readouterr()
    assert (f"loop.max_epochs=1 ({trainer.steps_per_epoch} steps each) ends the run at step "
            f"{trainer.steps_per_epoch}, before loop.max_steps=50" in out.out + out.err)
    trainer.train()
    raw["loop"].update(max_epochs=0, max_steps=trainer.steps_per_epoch + 4)
    with pytest.warns(UserWarning, match=rf"resume: the cosine after the warmup is now \d+ steps instead of "
                                         rf"{trainer.schedule.cosine_steps} steps .* the lr jumps at step "
                                         rf"{trainer.steps_per_epoch};"):
        loop.Trainer(build_config({**raw, "resume": True}))
    # Resumed within the warmup, in a run that ended there (no cosine): nothing jumps yet.
    raw = pretrain_config(tiny_data, tmp_path / "warm", max_steps=2, val_every=0, ckpt_every=1)
    raw["schedule"]["warmup"] = 5
    loop.Trainer(build_config(raw)).train()
    raw["loop"]["max_steps"] = 9
    with pytest.warns(UserWarning, match=r"the cosine after the warmup is now 4 steps instead of none \(.*\), from "
                                         r"the end of the warmup \(step 5\); set schedule.cosine"):
        loop.Trainer(build_config({**raw, "resume": True})).release_run_dir()
    # Neither the old nor the new length reaches past the warmup: no cosine either way, no warning
    raw["loop"]["max_steps"] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loop.Trainer(build_config({**raw, "resume": True}))


def test_each_pretraining_task_logs_its_own_training_loss(tiny_data, tmp_path):
    """Multi-domain pretraining is watched by each domain's loss; only their sum was logged.
    A task's loss is the loss of a batch of its structures alone (same predictions)."""
    raw = pretrain_config(tiny_data, tmp_path / "run", max_steps=1, val_every=0)
    raw["model"]["edge_dropout"] = 0.0
    trainer = loop.Trainer(build_config(raw))
    seen = {}
    original = tasks.loss_terms

    def keep(model, preds, batch, only=None):
        if only is None:
            seen.update(preds={k: v.detach() for k, v in preds.items()}, batch=batch)
        return original(model, preds, batch, only)

    import unittest.mock
    with unittest.mock.patch.object(tasks, "loss_terms", keep):
        trainer.train()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        logged = {r["name"]: float(r["value"]) for r in csv.DictReader(f) if r["split"] == "train"}
    batch, preds = seen["batch"], seen["preds"]
    for t, name in enumerate(("mol", "box")):
        sel = batch["task"] == t
        if not sel.any():
            assert f"{name}/loss" not in logged
            continue
        atoms = sel[batch["batch"]]
        natoms = batch["natoms"][sel]
        alone = {"task": batch["task"][sel], "natoms": natoms, "energy": batch["energy"][sel],
                 "forces": batch["forces"][atoms],
                 "batch": torch.repeat_interleave(torch.arange(natoms.numel()), natoms)}
        terms = original(trainer.model, {"energy": preds["energy"][sel], "forces": preds["forces"][atoms]}, alone)
        expected = sum(s.item() for s, kind in terms.values()) / natoms.numel()  # (structure-wise terms)
        assert logged[f"{name}/loss"] == pytest.approx(expected, rel=1e-6)
    assert sum(f"{n}/loss" in logged for n in ("mol", "box")) >= 1


def test_a_run_capped_by_epochs_says_so(tiny_data, tmp_path):
    trainer = loop.Trainer(build_config(pretrain_config(tiny_data, tmp_path, max_steps=0, max_epochs=1, val_every=0)))
    summary = trainer.train()
    assert summary["stop"] == "max_epochs" and summary["steps"] == trainer.steps_per_epoch > 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_stop_signal_finishes_the_step_saves_and_resumes_exactly(tiny_data, tmp_path, monkeypatch, signum):
    """Ctrl-C, or a scheduler's SIGTERM, during step 3 (of 6, no periodic checkpoint due): the
    step ends, last.pt is saved at step 3, the run stops with a KeyboardInterrupt that says so
    (no step 4 starts: the next step's all-reduce, which tells every rank, skipped it), and
    resuming it gives the weights of an uninterrupted run, bit for bit. The previous handlers
    are back afterwards."""

    def config(run_dir, *overrides):
        return build_config(pretrain_config(tiny_data, run_dir, max_steps=6, val_every=100, ckpt_every=100),
                            list(overrides))

    full = loop.Trainer(config(tmp_path / "full"))
    full.train()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    original, steps = loop.tasks.loss_terms, []

    def signal_in_step_3(*args):  # (after the step's all-reduce; per-task logging passes a 4th)
        if len(args) == 3:
            steps.append(len(steps) + 1)
        if len(args) == 3 and len(steps) == 3:
            signal.raise_signal(signum)  # (the handler only sets a flag: no exception here)
        return original(*args)

    monkeypatch.setattr(loop.tasks, "loss_terms", signal_in_step_3)
    with pytest.raises(KeyboardInterrupt, match=r"stopped after step 3, saved in .*last\.pt"):
        loop.Trainer(config(tmp_path / "cut")).train()
    assert steps == [1, 2, 3]  # (no forward of step 4)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["loop"]["step"] == 3
    monkeypatch.setattr(loop.tasks, "loss_terms", original)
    resumed = loop.Trainer(config(tmp_path / "cut", "resume=true"))
    resumed.train()
    assert_same_state(resumed.model.state_dict(), full.model.state_dict())
    assert_same_state(resumed.ema.state_dict(), full.ema.state_dict())
    assert_same_state(resumed.optimizer.state_dict(), full.optimizer.state_dict())


def test_a_stop_in_the_final_validation_keeps_the_steps(tiny_data, tmp_path, monkeypatch):
    """The final validation runs outside the steps' signal handling: a Ctrl-C or SIGTERM there
    (a scheduler's time limit) interrupted it, and the steps since the last checkpoint were
    lost. last.pt is now saved before it; the resumed run validates and ends as an
    uninterrupted one."""
    def config(run_dir, *overrides):
        return build_config(pretrain_config(tiny_data, run_dir, max_steps=5, val_every=0, ckpt_every=2),
                            list(overrides))

    full = loop.Trainer(config(tmp_path / "full"))
    full_summary = full.train()
    original = loop.Trainer.validate_and_check

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "validate_and_check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.Trainer(config(tmp_path / "cut")).train()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["loop"]["step"] == 5
    monkeypatch.setattr(loop.Trainer, "validate_and_check", original)
    resumed = loop.Trainer(config(tmp_path / "cut", "resume=true"))
    summary = resumed.train()
    assert summary["val"] == full_summary["val"] and summary["steps"] == 5
    assert_same_state(resumed.model.state_dict(), full.model.state_dict())


def test_resume_restores_the_plateau_schedule(tiny_data, tmp_path):
    """The reduce-on-plateau state (its scale, best metric and count) continues: a short run
    never reaches a plateau, so it is set in last.pt here and must come back, lr included."""
    from jmp_ext.train.checkpoint import save_checkpoint

    raw = pretrain_config(tiny_data, tmp_path, max_steps=2, val_every=0)
    loop.Trainer(build_config(raw)).train()
    state = load_checkpoint(tmp_path / "last.pt")
    state["schedule"].update(plateau_scale=0.25, best=1.5, bad=1)
    save_checkpoint(tmp_path / "last.pt", state)
    trainer = loop.Trainer(build_config({**raw, "resume": True}))
    assert trainer.schedule.state_dict() == state["schedule"]
    for group in trainer.optimizer.param_groups:
        expected = trainer.schedule.base_lr * group["lr_mult"] * trainer.schedule.factor(2, group["lr_mult"]) * 0.25
        assert group["lr"] == pytest.approx(expected, rel=1e-12)
