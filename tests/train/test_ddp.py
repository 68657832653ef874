"""2 CPU processes with gloo on loopback train exactly like 1 process with the same global batch;
an error on one rank ends every rank with its message; a run resumes on another number of ranks."""

import dataclasses
import json
import re
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from jmp_ext.train import TrainError, distributed, loop, tasks
from jmp_ext.train.checkpoint import load_checkpoint
from jmp_ext.train.config import build_config

SMALL = {"num_blocks": 1, "num_radial": 16}


def _config(data, run_dir):
    tasks = [{"name": n, "train": str(data / n / "train"), "val": str(data / n / "val"), "forces": "direct",
              "structure_wise_force_loss": True,
              "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces", "coef": 10.0}]}
             for n in ("mol", "box")]
    return build_config({"mode": "pretrain", "tasks": tasks, "run_dir": str(run_dir), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 8},
                         "model": {"backbone": "tiny", "backbone_overrides": SMALL},
                         "data": {"batch_size": 6, "val_batch_size": 4}, "schedule": {"warmup": 1},
                         "loop": {"max_steps": 3, "val_every": 0, "ckpt_every": 3, "ema_decay": 0.9,
                                  "precision": "fp64", "fit_scale_factors": 1, "progress": False}})


def _finetune(data, run_dir, forces="gradient", val="val", data_kw=None, schedule=None, resume=False, **loop_kw):
    """Fine-tuning on the 'mol' task (energy + forces), fp64."""
    task = {"name": "mol", "train": str(data / "mol" / "train"), "val": str(data / "mol" / val) if val else "",
            "test": str(data / "mol" / "test"), "forces": forces,
            "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces", "coef": 10.0}]}
    return build_config({"mode": "finetune", "tasks": [task], "run_dir": str(run_dir), "threads": 1, "resume": resume,
                         "graph": {"cutoff": 4.0, "max_neighbors": 8},
                         "model": {"backbone": "tiny", "backbone_overrides": SMALL},
                         "data": {"batch_size": 4, "val_batch_size": 4, **(data_kw or {})},
                         "schedule": schedule or {"warmup": 1},
                         "loop": {"max_steps": 3, "val_every": 2, "ckpt_every": 2, "precision": "fp64",
                                  "fit_scale_factors": 1, "progress": False, **loop_kw}})


def _worker(rank, world_size, port, fn, args):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a rank left waiting in a collective fails the test rather than hanging it.
    distributed.setup("cpu", timeout=timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        distributed.teardown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_ranks(fn, *args, world_size=2):
    """fn(rank, *args) on `world_size` gloo ranks (a module-level function: it is pickled)."""
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)


def _train(rank, configs, out=None):
    """Trains every config in turn; rank 0 saves the last summary and both ranks the warnings."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for config in configs:
            summary = loop.Trainer(config).train()
    if out is not None:
        (out / f"warnings{rank}.json").write_text(json.dumps([str(w.message) for w in caught]))
        if rank == 0:
            (out / "summary.json").write_text(json.dumps(summary))


def _assert_same_weights(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["loop"]["step"] == b["loop"]["step"]
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tiny_data, tmp_path):
    one = loop.Trainer(_config(tiny_data, tmp_path / "one")).train()
    _on_ranks(_train, [_config(tiny_data, tmp_path / "two")], tmp_path)
    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["loop"]["step"] == b["loop"]["step"] == 3
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-9, atol=1e-11, msg=key)
    for key in a["ema"]:
        torch.testing.assert_close(b["ema"][key], a["ema"][key], rtol=1e-9, atol=1e-11, msg=key)
    # Validation metrics reduced over the ranks equal the single-process ones.
    val = json.loads((tmp_path / "summary.json").read_text())["val"]
    assert val == pytest.approx(one["val"], rel=1e-9)


def _stopped_at_step_3_and_resumed(rank, full, cut, resumed):
    """Trains `full`; trains `cut` until a KeyboardInterrupt in its third step (after last.pt at
    step 2, mid logging window), then `resumed`."""
    loop.Trainer(full).train()
    original = loop.Trainer.train_step

    def stopped(self, batch, stand_in=False):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, batch, stand_in)

    loop.Trainer.train_step = stopped
    try:
        loop.Trainer(cut).train()
    except KeyboardInterrupt:
        pass
    finally:
        loop.Trainer.train_step = original
    loop.Trainer(resumed).train()


@pytest.mark.slow
def test_two_ranks_resumed_between_two_logs_log_the_same_means(tiny_data, tmp_path):
    """last.pt held the logging window's sum over ranks on rank 0: the resumed run added the
    ranks' terms in another order, and its logged means differed in the last bits."""
    import csv

    def config(name, resume=False):
        c = _config(tiny_data, tmp_path / name)
        return dataclasses.replace(c, resume=resume, loop=dataclasses.replace(c.loop, max_steps=4, log_every=3,
                                                                              ckpt_every=2))

    def train_rows(name):
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return {(r["step"], r["name"]): r["value"] for r in csv.DictReader(f) if r["split"] == "train"}

    _on_ranks(_stopped_at_step_3_and_resumed, config("full"), config("cut"), config("cut", resume=True))
    full, resumed = train_rows("full"), train_rows("cut")
    assert ("3", "loss") in full and ("3", "mol/loss") in full
    assert resumed == full


@pytest.mark.slow
def test_gradient_forces_on_two_ranks(tiny_data, tmp_path):
    """Fine-tuning with gradient forces (double backward) on 2 ranks: the weights and the
    metrics of 1 process, and no "Grad strides do not match bucket view strides" from DDP.
    Validation and test have one batch (4 structures) for 2 ranks: rank 1 evaluates nothing."""
    one = loop.Trainer(_finetune(tiny_data, tmp_path / "one", ema_decay=0.9)).train()
    _on_ranks(_train, [_finetune(tiny_data, tmp_path / "two", ema_decay=0.9)], tmp_path)
    _assert_same_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
    two = json.loads((tmp_path / "summary.json").read_text())
    assert two["val"] == pytest.approx(one["val"], rel=1e-9)
    assert two["test"] == pytest.approx(one["test"], rel=1e-9)  # (all ranks read rank 0's best.pt)
    for rank in (0, 1):
        assert not [w for w in json.loads((tmp_path / f"warnings{rank}.json").read_text()) if "strides" in w]


# ---------------------------------------------------------------- an error on one rank


def _fail_on_one_rank(rank, data, tmp_path):
    """Runs a job per way of failing on one rank, and records what each rank raised."""
    import contextlib
    from unittest import mock

    def raise_on_call(n, error):
        calls = []

        def fail(*args, original):
            calls.append(1)
            if len(calls) == n:
                raise error
            return original(*args)
        return fail

    def patched(target, name, fail):
        original = getattr(target, name)
        return mock.patch.object(target, name, lambda *a: fail(*a, original=original))

    nothing = contextlib.nullcontext()
    jobs = {  # name: (config, patch on the failing rank, the failing rank)
        "setup": (_finetune(data, tmp_path / "setup", val="missing" if rank == 1 else "val"), nothing, 1),
        "step": (_finetune(data, tmp_path / "step"),
                 patched(tasks, "loss_terms", raise_on_call(2, TrainError("bad batch (injected)"))), 1),
        "validation": (_finetune(data, tmp_path / "validation", data_kw={"val_batch_size": 2}),  # (a batch each)
                       patched(tasks, "update_metrics", raise_on_call(1, TrainError("bad val batch (injected)"))), 1),
        "run_dir": (_finetune(data, tmp_path / "a_file" / "run"), nothing, 0),
        "checkpoint": (_finetune(data, tmp_path / "checkpoint"),
                       patched(loop, "save_checkpoint", raise_on_call(1, OSError(28, "disk full (injected)"))), 0),
    }
    results = {}
    for name, (config, patch, failing) in jobs.items():
        try:
            with patch if rank == failing else nothing:
                loop.Trainer(config).train()
            results[name] = None
        except Exception as e:
            results[name] = [type(e).__name__, str(e)]
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_an_error_on_one_rank_ends_every_rank_with_its_message(tiny_data, tmp_path):
    """A dataset only rank 1 cannot open, a batch or a validation batch only it cannot use, a
    run_dir or a checkpoint rank 0 cannot write: every rank raises at once (none waits in a
    collective for a rank that is gone), the others with the failed rank's message."""
    (tmp_path / "a_file").write_text("")  # rank 0 cannot make run_dir a_file/run
    _on_ranks(_fail_on_one_rank, tiny_data, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {"setup": (1, "TrainError", "missing"), "step": (1, "TrainError", "bad batch (injected)"),
                "validation": (1, "TrainError", "bad val batch (injected)"),
                "run_dir": (0, "TrainError", "a_file is one"), "checkpoint": (0, "OSError", "disk full (injected)")}
    for name, (failing, kind, text) in expected.items():
        own, other = results[failing][name], results[1 - failing][name]
        assert own is not None and own[0] == kind and text in own[1], (name, own)
        assert other is not None and other[0] == "TrainError", (name, other)
        assert other[1].startswith(f"rank {failing} failed: {kind}: ") and text in other[1], (name, other)


def _nan_on_rank_1(rank, data, tmp_path):
    """A non-finite loss from rank 1's share of step 2: rank 0's log line and both ranks' errors."""
    import contextlib
    import io
    from unittest import mock

    original, calls = tasks.loss_terms, []

    def nan_at_step_2(model, preds, batch, only=None):
        terms = original(model, preds, batch, only)
        if only is None:
            calls.append(1)
        if only is None and len(calls) == 2:
            terms["energy"] = (terms["energy"][0] * float("nan"), terms["energy"][1])
        return terms

    out = io.StringIO()
    patch = mock.patch.object(tasks, "loss_terms", nan_at_step_2) if rank == 1 else contextlib.nullcontext()
    trainer = loop.Trainer(_finetune(data, tmp_path / "run", max_nan_steps=1, val_every=0))
    shares = []
    load = trainer._epoch_batches

    def recording_loader():
        for batch in load():
            shares.append(batch["_entry"].tolist())
            yield batch
    trainer._epoch_batches = recording_loader
    try:
        with patch, contextlib.redirect_stdout(out):
            trainer.train()
        error = None
    except TrainError as e:
        error = str(e)
    (tmp_path / f"rank{rank}.json").write_text(json.dumps({"log": out.getvalue(), "error": error, "shares": shares}))


@pytest.mark.slow
def test_a_non_finite_step_names_every_ranks_entries(tiny_data, tmp_path):
    """Rank 0 logs the skipped step, naming the entries of every rank's share (rank 1's loss was
    the non-finite one), and every rank stops alike."""
    _on_ranks(_nan_on_rank_1, tiny_data, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["error"] and "loss was not finite for 1 steps in a row" in r["error"] for r in results)
    (line,) = [line for line in results[0]["log"].splitlines() if "non-finite loss" in line]
    named = re.fullmatch(r"step 2: non-finite loss on a batch of \S+ entries ([\d, ]+), step skipped \(1/1 in a row\)",
                         line)
    assert named, line
    assert sorted(map(int, named.group(1).split(", "))) == sorted(results[0]["shares"][1] + results[1]["shares"][1])


def test_raise_together(monkeypatch):
    """The decision every rank takes from the gathered messages (here faked: rank 1 failed)."""
    gathered = [None, "TrainError: tasks.0.val: dataset directory /x does not exist"]
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: gathered)
    with pytest.raises(TrainError, match=r"^rank 1 failed: TrainError: tasks.0.val: dataset directory /x"):
        distributed.raise_together(None)  # rank 0: the message of rank 1
    own = OSError("rank 1's own")
    with pytest.raises(OSError) as raised:
        distributed.raise_together(own)  # rank 1: its own exception
    assert raised.value is own
    with pytest.raises(TrainError, match=r"^rank 1 failed: OSError: x$"):
        with distributed.together():  # (the block of a rank that did not fail)
            gathered[1] = "OSError: x"
    gathered[:] = [None, None]
    distributed.raise_together(None)  # nobody failed
    with distributed.together():
        pass
    gathered[:] = ["ValueError: a", "ValueError: b", None]
    with pytest.raises(TrainError, match=r"^rank 0 \(and 1 other rank\(s\)\) failed: ValueError: a$"):
        distributed.raise_together(None)


# ---------------------------------------------------------------- resuming on another number of ranks


def test_resume_position_of_an_older_last_pt():
    """An older jmp_ext left out the global batches of fewer structures than ranks and did not
    count them in batch_in_epoch. Batches of 2, 2, 1, 2, 2, 1, 1, 1 structures: its 2 ranks
    trained 0, 1, 3, 4, which every batch now counts as 0..4."""
    batches = [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9], [10], [11]]
    assert loop.resume_position(batches, 3, 2) == 4  # trained 0, 1, 3: go on at 4
    assert loop.resume_position(batches, 4, 2) == 5  # its epoch done: 5, 6, 7 remain
    assert loop.resume_position(batches, 0, 2) == 0
    assert loop.resume_position(batches, 3, 1) == 3  # 1 process left nothing out
    assert loop.resume_position(batches, 1, 3) == 0  # 3 ranks: no batch of this epoch was trained


def test_an_older_last_pt_of_two_ranks_resumes_after_the_batches_it_trained(tiny_data, tmp_path, capsys):
    """A last.pt without counts_every_batch, of 2 ranks that had trained global batches 0, 1, 3
    (batch_in_epoch 3, batch 2 left out): the run goes on at batch 4."""
    from jmp_ext.train.checkpoint import save_checkpoint

    loop.Trainer(_resume_config(tiny_data, tmp_path / "run", 3)).train()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["loop"].pop("counts_every_batch") is True and state["loop"]["batch_in_epoch"] == 3
    state["rng"] = state["rng"] * 2  # (one per rank)
    save_checkpoint(tmp_path / "run" / "last.pt", state)
    with pytest.warns(UserWarning, match="resuming with 1 ranks from a run with 2"):
        trainer = loop.Trainer(_resume_config(tiny_data, tmp_path / "run", 5, resume=True))
    assert [len(b) for b in trainer.sampler.batches(0)][:5] == [2, 2, 1, 2, 2] and trainer.batch_in_epoch == 4
    assert f"at step 3 of 5 (epoch 1, 4 of its {trainer.steps_per_epoch} batches done)" in capsys.readouterr().out


def test_a_rank_the_saved_run_did_not_have_gets_a_stream_of_its_own(tiny_data, tmp_path):
    """Resuming a 1-process run on 2 ranks: rank 0 continues the saved random stream (edge
    dropout), rank 1 must not draw the very same numbers."""
    trainer = loop.Trainer(_resume_config(tiny_data, tmp_path / "run", 2))
    trainer.train()
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["rng"]
    streams = []
    for rank in (0, 1):
        trainer.dist = dataclasses.replace(trainer.dist, rank=rank, world_size=2)
        with pytest.warns(UserWarning, match="resuming with 2 ranks from a run with 1"):
            trainer._load_resume_state(tmp_path / "run" / "last.pt")
        streams.append(torch.rand(4))
    torch.set_rng_state(saved[0]["cpu"])
    assert torch.equal(streams[0], torch.rand(4)) and not torch.equal(streams[1], streams[0])


def _resume_config(data, run_dir, steps, resume=False):
    """Global batches of 2, 2, 1, 2, 2, 1, 1, 1 structures in epoch 0; a schedule that does not
    depend on max_steps (which a resumed run raises)."""
    return _finetune(data, run_dir, forces="direct", val="", data_kw={"batch_size": 3, "max_atoms": 8},
                     schedule={"warmup": 1, "cosine": 100}, resume=resume, max_steps=steps, ckpt_every=100,
                     ema_decay=0.9)


@pytest.mark.slow
def test_small_global_batches_and_resumes_on_another_number_of_ranks(tiny_data, tmp_path):
    """A global batch of fewer structures than ranks (batch 2 here) was left out on 2 ranks: an
    epoch had fewer steps and some structures were never trained. Now the rank without a
    structure trains a stand-in that counts zero: 2 ranks, 1 process -> 2 ranks and 2 ranks ->
    1 process all end with 1 process's weights, neither repeating nor skipping a batch."""
    cfg = lambda name, steps, resume=False: _resume_config(tiny_data, tmp_path / name, steps, resume)  # noqa: E731
    loop.Trainer(cfg("one_two", 3)).train()  # global batches 0, 1, 2
    _on_ranks(_train, [cfg("one_two", 5, resume=True),  # 3, 4
                       cfg("two_one", 3),  # 0, 1, 2
                       cfg("two", 5)])  # 0..4
    with pytest.warns(UserWarning, match="resuming with 1 ranks from a run with 2"):
        loop.Trainer(cfg("two_one", 5, resume=True)).train()  # 3, 4
    loop.Trainer(cfg("one", 5)).train()  # 0..4
    for name in ("two", "one_two", "two_one"):
        _assert_same_weights(tmp_path / name / "last.pt", tmp_path / "one" / "last.pt")


def test_a_rank_without_a_structure_trains_a_stand_in(tiny_data, tmp_path):
    """data.batch_size=2 on 3 ranks: every global batch leaves rank 2 without a structure (the
    loop went from empty epoch to empty epoch when no batch had one for every rank); it trains
    the batch's smaller structure, the least work."""
    trainer = loop.Trainer(_finetune(tiny_data, tmp_path / "run", forces="direct", val="", data_kw={"batch_size": 2},
                                     fit_scale_factors=0))
    batches, natoms = trainer.sampler.batches(0), trainer.train_set.natoms
    assert trainer.steps_per_epoch == 6 and any(natoms[a] != natoms[b] for a, b in batches)
    trainer.dist = dataclasses.replace(trainer.dist, rank=2, world_size=3)
    for (a, b), loaded in zip(batches, trainer._epoch_batches()):
        smaller = a if natoms[a] <= natoms[b] else b
        assert torch.equal(loaded["pos"], trainer.train_set[smaller]["pos"].to(loaded["pos"].dtype))
    # (that its loss counts zero: test_small_global_batches_and_resumes_on_another_number_of_ranks)
    trainer.dist = dataclasses.replace(trainer.dist, rank=0)
    with pytest.warns(UserWarning, match=r"6 of the 6 global batches of epoch 0 have fewer structures than the 3 "
                                         r"ranks, which then train a stand-in .*: raise data.batch_size \(global, "
                                         r"now 2\)"):
        trainer._log_startup()
    # An epoch's last, smaller batch alone is no reason to warn: 2 of 2 ranks, 5 + 1 of 6 structures.
    trainer.dist = dataclasses.replace(trainer.dist, world_size=2)
    trainer.sampler.batches = lambda epoch: [[0, 1]] * 5 + [[2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", EncodingWarning)  # (ASE's, under -X warn_default_encoding)
        trainer._log_startup()
    # Each rank validates whole batches: of at most its training share of data.max_atoms.
    assert trainer.val_max_atoms is None
    trainer.config = dataclasses.replace(trainer.config, data=dataclasses.replace(trainer.config.data, max_atoms=25))
    assert trainer.val_max_atoms == 13


def _classification(data, run_dir):
    return build_config({"mode": "finetune", "run_dir": str(run_dir), "threads": 1,
                         "graph": {"cutoff": 4.0, "max_neighbors": 8},
                         "tasks": [{"name": "cls", "train": str(data), "forces": "direct",
                                    "targets": [{"name": "cls", "kind": "classification", "num_classes": 2}]}],
                         "model": {"backbone": "tiny", "backbone_overrides": SMALL},
                         "data": {"batch_size": 4}, "optim": {"grad_clip_value": 0.0, "grad_clip_norm": 0.0},
                         "loop": {"max_steps": 3, "val_every": 0, "precision": "fp64", "fit_scale_factors": 0,
                                  "progress": False, "log_every": 1}})


@pytest.mark.slow
def test_classification_on_two_ranks(tmp_path):
    """The cross-entropy is summed over the batch (JMP): on 2 ranks it was each rank's sum,
    which DDP averaged, half the gradient and the logged loss of 1 process."""
    import csv

    from helpers import write_molecules

    data = write_molecules(tmp_path / "cls", 12, seed=3, classes=2)
    loop.Trainer(_classification(data, tmp_path / "one")).train()
    _on_ranks(_train, [_classification(data, tmp_path / "two")])
    _assert_same_weights(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt")

    def losses(name):
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "loss_cls"]

    assert len(losses("one")) == 3 and losses("two") == pytest.approx(losses("one"), rel=1e-9)


# ---------------------------------------------------------------- gradient layout


def test_keep_grad_layout(tiny_data, tmp_path):
    """With gradient forces, the energy head's last weight [1, F] gets a gradient of strides
    (1, 1), not (F, 1): keep_grad_layout gives it the parameter's strides (DDP's buckets have
    them), with the same values."""
    trainer = loop.Trainer(_finetune(tiny_data, tmp_path / "run"))
    batch = next(trainer._epoch_batches())

    def grads():
        trainer.model.zero_grad(set_to_none=True)
        preds = trainer.model(batch)
        sum(s for s, _ in tasks.loss_terms(trainer.model, preds, batch).values()).backward()
        return {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    trainer.model.train()
    before = grads()
    params = dict(trainer.model.named_parameters())
    if all(g.stride() == params[n].stride() for n, g in before.items()):
        pytest.skip("this torch gives every gradient its parameter's strides")
    loop.keep_grad_layout(trainer.model)
    after = grads()
    assert after.keys() == before.keys()
    for name, g in after.items():
        assert g.stride() == params[name].stride(), name
        assert torch.equal(g, before[name]), name
