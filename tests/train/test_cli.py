"""python -m jmp_ext.train as a new user meets it: help, how arguments are read, and a message
(`error: ...`, exit 2) rather than a traceback for the usual mistakes."""

import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from jmp_ext.train import loop
from jmp_ext.train.__main__ import main
from jmp_ext.train.config import build_config
from jmp_ext.train.presets import PRESETS

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message of a machine without CUDA")


def finetune_raw(tiny_data, run_dir) -> dict:
    """A one-step fine-tuning run of a tiny network on 'mol' (no validation split: no best.pt)."""
    return {"mode": "finetune", "run_dir": str(run_dir), "threads": 1, "graph": {"cutoff": 4.0, "max_neighbors": 8},
            "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"), "forces": "direct",
                       "targets": [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"}]}],
            "model": {"backbone": "tiny", "backbone_overrides": {"num_blocks": 1, "num_radial": 16}},
            "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    loop.Trainer(build_config(finetune_raw(tiny_data, run))).save_best({})
    return str(run / "best.pt")


def test_help_lists_the_commands_presets_and_where_the_keys_are(capsys):
    for argv in (["--help"], ["-h"], ["demo", "--help"], ["pretrain", "--help"], ["finetune", "x.yaml", "-h"]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert all(word in out for word in ("pretrain", "finetune", "eval", "predict", "CONFIG.yaml", "key=value",
                                            "jmp_ext/train/config.py", "example")), argv
        assert all(name in out for name in PRESETS), argv
    for command in ("eval", "predict"):
        assert main([command, "--help"]) == 0
        assert f"usage: python -m jmp_ext.train {command}" in capsys.readouterr().out


def test_the_example_of_the_help_is_a_valid_config(capsys):
    main(["--help"])
    words = capsys.readouterr().out.split("example:")[1].replace("\\\n", " ").strip().splitlines()[0].split()
    assert words[:4] == ["python", "-m", "jmp_ext.train", "finetune"]
    assert build_config({}, words[4:]).mode == "finetune"


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    """A preset with its overrides, as the run would save it in config.yaml: what a user reads
    before a long run (it had to start one and read run_dir/config.yaml)."""
    argv = ["finetune", "preset=jmp_s_qm9", "tasks.0.train=/data/qm9/train", "data.batch_size=16",
            f"run_dir={tmp_path / 'run'}", "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["mode"] == "finetune" and printed["data"]["batch_size"] == 16
    assert printed["optim"]["llrd_blocks"] == [0.30, 0.40, 0.55, 0.625] and printed["tasks"][0]["name"] == "qm9"
    assert build_config(printed).data.batch_size == 16  # (a config file as it stands)
    assert not (tmp_path / "run").exists()
    assert main(["--print-config", *argv[:-1]]) == 0  # (anywhere on the line)
    assert yaml.safe_load(capsys.readouterr().out) == printed
    assert main(["demo", "loop.max_steps=7", "--print-config"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["mode"] == "pretrain" and demo["loop"]["max_steps"] == 7
    assert main(["--print-config"]) == 0 and yaml.safe_load(capsys.readouterr().out)["loop"]["max_steps"] == 150


def test_print_config_needs_no_data_paths_but_training_does(tmp_path, capsys):
    """A preset is read before its data exists (to write a config file from it); a run without
    a training split says which key to set."""
    assert main(["finetune", "preset=jmp_s_qm9", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tasks"][0]["train"] == "" and printed["tasks"][0]["name"] == "qm9"
    with pytest.warns(UserWarning, match="fp16 autocasts on GPUs only"):  # (the preset's, said before the data are read)
        assert main(["finetune", "preset=jmp_s_qm9", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "task 'qm9': train is empty; give the LMDB directory (tasks.0.train=/data/qm9/train)" in capsys.readouterr().err


def test_under_torchrun_every_rank_says_its_error_with_its_rank(tmp_path, capsys, monkeypatch):
    """Every rank of a torchrun job printed 'error: ...' alike (8 GPUs: 8 copies that said
    nothing of whose each was). Each line now names its rank; none stays silent, since an error
    may be one rank's own (a file its node lacks)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(["finetune", "preset=jmp_s_qm9", "loop.max_steps=-1", "--print-config"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"[rank {rank}] error: ") and "max_steps" in err, err
        assert main(["finetune", f"{tmp_path / 'missing.yaml'}"]) == 2
        assert capsys.readouterr().err.startswith(f"[rank {rank}] error: config file {tmp_path / 'missing.yaml'} "
                                                  "does not exist")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["finetune", f"{tmp_path / 'missing.yaml'}"]) == 2
    assert capsys.readouterr().err.startswith("error: config file")


def test_a_config_path_may_hold_an_equals_sign(tiny_data, tmp_path, capsys):
    """A sweep's directories are often named lr=1e-3: the path is still the config, not an override."""
    path = tmp_path / "lr=1e-3" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    assert main(["finetune", str(path)]) == 0
    assert "finetune finished: 1 steps" in capsys.readouterr().out
    assert main([str(tmp_path / "lr=1e-4" / "config.yaml")]) == 2
    assert f"config file {tmp_path / 'lr=1e-4' / 'config.yaml'} does not exist" in capsys.readouterr().err


def test_the_summary_lists_the_files_the_run_wrote(tiny_data, tmp_path, capsys):
    """Without a validation split there is no best.pt: the summary does not promise one."""
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    assert main([str(path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    run = tmp_path / "run"
    expected = [p.name + "/" * p.is_dir() for p in run.iterdir() if not p.name.startswith(".")]  # (.lock)
    assert "best.pt" not in expected and {"config.yaml", "last.pt", "summary.json"} <= set(expected)
    assert line.startswith(f"   run directory {run}:")
    assert sorted(line.split(":")[-1].strip().split(", ")) == sorted(expected)


def test_resuming_a_finished_run_says_so(tiny_data, tmp_path, capsys):
    """A resume of a run that had reached its end trains nothing: the summary says the run had
    finished, not "0.0 structures/s" since resuming."""
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    assert main([str(path)]) == 0
    assert "1 steps" in capsys.readouterr().out
    assert main([str(path), "resume=true"]) == 0
    out = capsys.readouterr().out
    assert "no steps left: the run had already finished at step 1" in out and "structures/s" not in out
    with pytest.warns(UserWarning, match="the cosine after the warmup is now 2 steps"):
        assert main([str(path), "resume=true", "loop.max_steps=2"]) == 0
    assert "training since resuming at step 1" in capsys.readouterr().out


def test_resuming_from_another_working_directory_is_pointed_out(tiny_data, tmp_path, capsys, monkeypatch):
    """A run's config.yaml holds its run_dir as given, relative to where it started: resumed from
    another directory (a resubmitted job), resume=true found no last.pt there and started a new
    run, with a warning, beside the real one."""
    monkeypatch.chdir(tmp_path)
    raw = finetune_raw(tiny_data, "runs/r")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["r.yaml"]) == 0
    config = tmp_path / "runs" / "r" / "config.yaml"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main([str(config), "resume=true"]) == 2
    assert capsys.readouterr().err == (
        f"error: resume=true: {config} is the config of the run in {config.parent}, which has last.pt, but its run_dir "
        f"runs/r ({tmp_path / 'elsewhere' / 'runs' / 'r'} from here) has none: give run_dir={config.parent}, or run "
        f"from the directory the run was started in (a config's relative paths are relative to the working "
        f"directory)\n")
    assert not (tmp_path / "elsewhere" / "runs").exists()
    with pytest.warns(UserWarning, match="the cosine after the warmup is now 2 steps"):
        assert main([str(config), "resume=true", f"run_dir={config.parent}", "loop.max_steps=2"]) == 0
    assert "since resuming at step 1" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # (from its own directory, as before)
    assert main([str(config), "resume=true"]) == 0


def test_a_sub_command_that_contradicts_the_config_is_an_error(tiny_data, tmp_path, capsys):
    """Neither may silently win: `finetune` on a pretraining config would pretrain (or the reverse)."""
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump({**finetune_raw(tiny_data, tmp_path / "run"), "mode": "pretrain"}))
    cases = [(["pretrain", "mode=finetune"], "sub-command pretrain contradicts mode finetune of the config"),
             (["finetune", str(path)], "sub-command finetune contradicts mode pretrain of the config"),
             (["finetune", "preset=jmp_s_pretrain"],
              "sub-command finetune contradicts mode pretrain of the config"),
             (["finetune", str(path), "mode=pretrain"], "sub-command finetune contradicts mode pretrain of the config")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "run").exists()
    assert main(["train"]) == 2  # a mistyped sub-command
    assert "sub-commands demo, pretrain, finetune, eval, predict" in capsys.readouterr().err
    # Overrides alone are not the demo: say how to give tasks, or how to override the demo.
    assert main(["loop.max_steps=5"]) == 2
    assert "python -m jmp_ext.train demo key=value" in capsys.readouterr().err


def test_pretraining_tasks_with_other_targets_are_a_message(tiny_data, tmp_path, capsys):
    """The normalisers are looked up by task 0's target names: a task with other targets crashed
    there with a bare StopIteration."""
    raw = finetune_raw(tiny_data, tmp_path / "run")
    mol = raw["tasks"][0]
    box = {**mol, "name": "box", "train": str(tiny_data / "box" / "train"),
           "targets": [{"name": "energy", "kind": "energy"}]}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump({**raw, "mode": "pretrain", "tasks": [mol, box]}))
    assert main(["pretrain", str(path)]) == 2
    assert "tasks.1 (box): pretraining tasks have exactly an energy and a forces target" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("name, text", [("notes.txt", "hello\n"), ("table.csv", "a,b\n1,2\n")])
def test_predict_on_a_file_ase_cannot_read(checkpoint, tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    assert main(["predict", checkpoint, str(tmp_path / name), "--out", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: input {tmp_path / name} could not be read as a structure file") and "extxyz" in err


def test_predict_names_a_broken_frame_of_its_input(checkpoint, tmp_path, capsys):
    """The input is read frame by frame (not all at once): a frame that cannot be parsed is
    named by its index, and an empty file is said to be one."""
    import ase.io
    from ase.build import molecule

    ase.io.write(tmp_path / "good.extxyz", [molecule("CH3OH"), molecule("H2O")])
    lines = (tmp_path / "good.extxyz").read_text().splitlines()
    (tmp_path / "broken.extxyz").write_text("\n".join(lines[:8] + ["3", lines[1], "O 0 0"]) + "\n")
    assert main(["predict", checkpoint, str(tmp_path / "broken.extxyz"), "--out", str(tmp_path / "p.npz")]) == 2
    assert f"error: input {tmp_path / 'broken.extxyz'}: frame 1 could not be read" in capsys.readouterr().err
    bad = [molecule("CH3OH"), molecule("H2O"), molecule("CH4")]
    bad[2].positions[1, 0] = float("nan")
    ase.io.write(tmp_path / "nan.extxyz", bad)
    assert main(["predict", checkpoint, str(tmp_path / "nan.extxyz"), "--out", str(tmp_path / "p.npz")]) == 2
    assert f"error: input {tmp_path / 'nan.extxyz'}: frame 2: atoms: " in capsys.readouterr().err
    (tmp_path / "empty.extxyz").write_text("")
    assert main(["predict", checkpoint, str(tmp_path / "empty.extxyz"), "--out", str(tmp_path / "p.npz")]) == 2
    assert "could not be read as a structure file (UnknownFileTypeError: Empty file" in capsys.readouterr().err


@no_cuda
def test_cuda_on_a_machine_without_it(checkpoint, tiny_data, tmp_path, capsys):
    """Said as such: torch.load's failure read as a broken checkpoint, the trainer's as a traceback."""
    assert main(["eval", checkpoint, str(tiny_data / "mol" / "test"), "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err
    assert main(["predict", checkpoint, str(tiny_data / "mol" / "test"), "--out", "p.npz", "--device", "cuda:0"]) == 2
    assert "--device cuda:0: CUDA is not available" in capsys.readouterr().err
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    assert main([str(path), "device=cuda"]) == 2
    assert "device=cuda: CUDA is not available on this machine; use device=cpu" in capsys.readouterr().err
    assert main(["demo", "device=cuda", f"run_dir={tmp_path / 'demo'}"]) == 2
    assert "device=cuda: CUDA is not available" in capsys.readouterr().err


class LightningHyperParameters:
    """Stands for the config objects a JMP (Lightning) checkpoint pickles."""


def test_bad_checkpoints_and_datasets_are_messages(checkpoint, tiny_data, tmp_path, capsys):
    torch.save({"a": 1}, tmp_path / "random.pt")
    torch.save({"state_dict": {"backbone.w": torch.zeros(2)}, "hyper_parameters": LightningHyperParameters()},
               tmp_path / "jmp.ckpt")  # (torch's weights-only error suggested loading it unsafely)
    diverged = torch.load(checkpoint, weights_only=True)  # (NaN weights predicted NaN, silently)
    diverged["model"]["net.embedding.atom_embedding.weight"][3, 0] = float("nan")
    torch.save(diverged, tmp_path / "nan.pt")
    (tmp_path / "empty").mkdir()
    test_set = str(tiny_data / "mol" / "test")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    cases = [(["eval", str(tmp_path / "none.pt"), test_set], f"checkpoint {tmp_path / 'none.pt'} does not exist"),
             (["eval", str(tmp_path / "random.pt"), test_set], "is not a jmp_ext training checkpoint"),
             (["eval", str(tmp_path / "jmp.ckpt"), test_set], "it holds a state_dict, as a JMP (Lightning) "
              "checkpoint does, without heads for your targets: fine-tune from it (model.init_checkpoint)"),
             (["eval", str(tmp_path / "empty"), test_set], "is a directory; give the file"),
             (["eval", str(tmp_path / "nan.pt"), test_set], "nan.pt: 1 weight(s) hold NaN or inf, first "
              "'net.embedding.atom_embedding.weight' (the weights of a diverged run?)"),
             (["predict", str(tmp_path / "nan.pt"), test_set, "--out", "p.npz"], "1 weight(s) hold NaN"),
             (["predict", str(tmp_path / "random.pt"), test_set, "--out", "p.npz"],
              "is not a jmp_ext training checkpoint"),
             (["eval", checkpoint, str(tmp_path / "empty")], "is not a jmp_ext dataset"),
             (["eval", checkpoint, str(tiny_data / "mol")], f"{tiny_data / 'mol'} is not a jmp_ext dataset (no "
              f"meta.json). It holds the datasets test, train, val: give one of them, e.g. {tiny_data / 'mol' / 'test'}"),
             (["predict", checkpoint, str(tmp_path / "empty"), "--out", "p.npz"], "is not a jmp_ext dataset"),
             ([str(path), f"tasks.0.train={tmp_path / 'empty'}"], "is not a jmp_ext dataset"),
             ([str(path), f"model.init_checkpoint={tmp_path / 'none.pt'}"], "none.pt does not exist"),
             ([str(path), f"model.init_checkpoint={tmp_path / 'random.pt'}"], "random.pt")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, argv


def test_mistakes_with_paths_and_values_are_messages(checkpoint, tiny_data, tmp_path, capsys, monkeypatch):
    """From a fuzzing of the CLI: --out over the checkpoint, the input or a dataset's meta.json
    (each was silently replaced), an empty run_dir (the run wrote into the current directory),
    a run_dir that is a file, a binary config, --batch-size 0, --device gpu, seed=-1: each a
    one-line message with exit code 2, nothing replaced."""
    test_set = tiny_data / "mol" / "test"
    copy = tmp_path / "copy.pt"
    copy.write_bytes(open(checkpoint, "rb").read())
    meta = (test_set / "meta.json").read_bytes()
    (tmp_path / "outdir").mkdir()
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "a_file").write_text("notes")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    cases = [(["eval", str(copy), str(test_set), "--out", str(copy)], "is the checkpoint: it would be replaced"),
             (["eval", str(copy), str(test_set), "--out", str(test_set / "meta.json")], "is inside the dataset"),
             (["eval", str(copy), str(test_set), "--out", str(tmp_path / "outdir")], "is a directory"),
             (["predict", str(copy), str(test_set), "--out", str(tmp_path / "a_file" / "sub" / "p.npz")],
              f"{tmp_path / 'a_file'} is a file, not a directory; write it elsewhere"),
             (["eval", str(copy), str(test_set), "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
             (["eval", str(copy), str(test_set), "--device", "gpu"], "--device 'gpu' is not cpu, cuda or cuda:N"),
             ([str(path), "run_dir="], "run_dir is empty"),
             ([str(path), "seed=-1"], "seed must be >= 0, got -1"),
             ([str(path), f"run_dir={tmp_path / 'a_file'}"], "a_file"),
             ([str(checkpoint)], "is not a YAML config (not UTF-8 text)"),
             ([str(tmp_path / "dir.yaml")], "config file " + str(tmp_path / "dir.yaml") + " is a directory")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert copy.read_bytes() == open(checkpoint, "rb").read() and (test_set / "meta.json").read_bytes() == meta
    assert (tmp_path / "a_file").read_text() == "notes"
    # A read-only directory was an error after all the work (root can write anywhere but on a
    # read-only filesystem: os.access says so).
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda path, mode: not (mode == os.W_OK and Path(path) == tmp_path))
        assert main(["predict", str(copy), str(test_set), "--out", str(tmp_path / "new" / "p.npz")]) == 2
    assert f"cannot write in {tmp_path} (read-only or not yours)" in capsys.readouterr().err
    # A directory of one's own that happens to hold a config.yaml: kept (no .lock: no run of ours).
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("my notes")
    assert main([str(path), f"run_dir={tmp_path / 'mine'}"]) == 2
    assert "holds config.yaml, which no jmp_ext run wrote there (it has no .lock)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "config.yaml").read_text() == "my notes"
    # A run's own files (its .lock beside them: a run that stopped before its first checkpoint) go.
    (tmp_path / "mine" / ".lock").write_text("")
    assert main([str(path), f"run_dir={tmp_path / 'mine'}"]) == 0
    capsys.readouterr()
    assert (tmp_path / "mine" / "last.pt").is_file()
    # The demo makes its data where its preset reads them, not beside data a user named.
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "x" / "train"
    assert main(["demo", f"tasks.0.train={elsewhere}", f"tasks.1.train={elsewhere}", "loop.max_steps=1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "demo_data").exists()


def test_the_cli_imports_torch_inside_its_handlers():
    """A Ctrl-C in the first second or two (while torch loads) printed a KeyboardInterrupt
    traceback: the module python -m runs imports neither torch nor numpy before main()."""
    import subprocess
    import sys

    code = "import sys, jmp_ext.train.__main__; print(sorted({'torch', 'numpy', 'ase'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]"


def test_a_dead_data_worker_is_a_message(tiny_data, tmp_path, capsys, monkeypatch):
    """A DataLoader worker killed (the out-of-memory killer) raised torch's RuntimeError from
    wherever the training process was, with a traceback through the model's forward."""
    import jmp_ext.train.__main__ as cli

    def worker_killed(config):
        raise RuntimeError("DataLoader worker (pid 24253) is killed by signal: Killed. ")

    monkeypatch.setattr(cli, "run_training", worker_killed)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    assert main([str(path)]) == 1
    assert capsys.readouterr().err == (
        "error: DataLoader worker (pid 24253) is killed by signal: Killed. \n  a data-loading worker process died; "
        "the usual cause is the out-of-memory killer (dmesg says): lower data.num_workers (0: none), "
        "and set data.in_memory=false if it is true. A training run continues from run_dir/last.pt with resume=true\n")
    for other in ("CUDA error", "DataLoader worker (pid 7) is killed by signal: Segmentation fault. "):
        monkeypatch.setattr(cli, "run_training", lambda config: (_ for _ in ()).throw(RuntimeError(other)))
        with pytest.raises(RuntimeError, match=re.escape(other)):  # (a crash: a traceback to report)
            main([str(path)])


def test_eval_and_predict_stopped_say_what_they_left(tiny_data, tmp_path, capsys, monkeypatch):
    """A Ctrl-C or a full disk in eval or predict told how to resume a training run, which they
    are not: they write --out once, at their end."""
    import errno
    import signal

    from jmp_ext.train import inference

    raw = {"mode": "finetune", "run_dir": str(tmp_path / "run"), "threads": 1,
           "tasks": [{"name": "mol", "train": str(tiny_data / "mol" / "train"),
                      "targets": [{"name": "energy", "kind": "energy"}]}],
           "model": {"backbone": "tiny"}, "loop": {"max_steps": 1, "progress": False, "fit_scale_factors": 0}}
    loop.Trainer(build_config(raw)).save_best({})
    args = [str(tmp_path / "run" / "best.pt"), str(tiny_data / "mol" / "val")]
    for command in ("eval", "predict"):
        name = {"eval": "evaluate_checkpoint", "predict": "predict_checkpoint"}[command]
        monkeypatch.setattr(inference, name, lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
        assert main([command, *args, "--out", str(tmp_path / "out.npz")]) == 130
        err = capsys.readouterr().err
        assert err == f"\ninterrupted: {command} writes --out only at its end, so nothing was written\n"
        full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.npz"))
        monkeypatch.setattr(inference, name, lambda *a, **k: (_ for _ in ()).throw(full))
        assert main([command, *args, "--out", str(tmp_path / "out.npz")]) == 2
        assert capsys.readouterr().err == (f"error: [Errno 28] No space left on device: '{tmp_path / 'out.npz'}' "
                                           "(the disk is full: free space and run it again)\n")


def test_a_library_error_keeps_its_traceback(tiny_data, tmp_path, capsys, monkeypatch):
    """Bad input our checks name is a message; a ValueError raised inside torch or numpy is a
    bug to report, and a bare message would hide where it came from."""
    import numpy as np

    import jmp_ext.train.__main__ as cli

    monkeypatch.setattr(cli, "run_training", lambda config: np.zeros(6).reshape(4, 4))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    with pytest.raises(ValueError, match="cannot reshape"):
        main([str(path)])
    assert capsys.readouterr().err == ""


def test_ctrl_c_is_a_message_with_how_to_resume(tiny_data, tmp_path, capsys, monkeypatch):
    import jmp_ext.train.__main__ as cli

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_training", interrupted)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(finetune_raw(tiny_data, tmp_path / "run")))
    assert main([str(path)]) == 130
    assert "interrupted. A training run continues from run_dir/last.pt with resume=true" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # (torchrun: the other ranks stop as quietly as they were told)
    assert main([str(path)]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    # A SIGTERM before training starts (loading data, fitting scale factors) killed the run
    # without a word (exit 143); it now ends it as Ctrl-C does, saying nothing was saved then.
    import os
    import signal

    monkeypatch.setattr(cli, "run_training", lambda config: os.kill(os.getpid(), signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    assert main([str(path)]) == 130
    assert "if it saved one (every loop.ckpt_every steps, and at the first Ctrl-C or SIGTERM once training has " \
           "started; none before that" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler
    # An unset string is an empty value, not null: the message says so.
    assert main([str(path), "model.init_checkpoint=null"]) == 2
    assert "for none, give an empty value: model.init_checkpoint=" in capsys.readouterr().err


def test_the_summary_gives_each_metric_its_unit(tiny_data, tmp_path, capsys):
    """`test m/forces_mae 1.4108` said nothing of the unit, and MD22 and SPICE users compare with
    tables in meV/Å: each line ends in its metric's unit (none for cosines and shares)."""
    from jmp_ext.train.__main__ import print_summary
    from jmp_ext.train.config import build_config
    from jmp_ext.train.tasks import metric_unit

    raw = finetune_raw(tiny_data, tmp_path / "run")
    raw["tasks"][0]["targets"] = [{"name": "energy", "kind": "energy"}, {"name": "forces", "kind": "forces"},
                                  {"name": "gap", "kind": "scalar", "unit": "eV"},
                                  {"name": "mu", "kind": "scalar", "unit": ""}]
    config = build_config(raw)
    task = config.tasks[0].name
    expected = {"energy_mae": "eV", "energy_per_atom_rmse": "eV/atom", "forces_mae": "eV/Å", "forces_cos": "",
                "efwt": "", "gap_mae": "eV", "mu_rmse": "", "nope_mae": ""}
    assert {name: metric_unit(config, f"{task}/{name}") for name in expected} == expected
    assert metric_unit(config, "other/energy_mae") == ""
    # Through a run: a target given without its unit takes the data's, which the summary shows.
    from helpers import write_molecules

    data = {split: write_molecules(tmp_path / split, 6, seed=k, u0=True, u0_unit="eV")
            for k, split in enumerate(("train", "val"))}
    run = finetune_raw(tiny_data, tmp_path / "u0_run")
    run["tasks"][0].update(train=data["train"], val=data["val"], targets=[{"name": "u0", "kind": "scalar"}])
    path = tmp_path / "u0.yml"
    path.write_text(yaml.safe_dump(run))
    capsys.readouterr()
    assert main([str(path)]) == 0
    assert re.search(r"\n   val  mol/u0_mae +[-0-9.e+]+ +eV\n", capsys.readouterr().out)
    summary = {"steps": 1, "epochs": 1.0, "stop": "max_steps", "seconds": 1.0, "wall_seconds": 1.5,
               "structures_per_s": 1.0, "atoms_per_s": 1.0,
               "test": {f"{task}/forces_mae": 0.0123, f"{task}/forces_cos": 0.5}}
    print_summary(config, summary)
    lines = capsys.readouterr().out.splitlines()
    assert any(re.fullmatch(rf"   test {task}/forces_mae +0\.0123 +eV/Å", line) for line in lines)
    assert any(re.fullmatch(rf"   test {task}/forces_cos +0\.5", line) for line in lines)
