r"""python -m jmp_ext.train: pretrain, fine-tune, evaluate and predict.

usage:
  python -m jmp_ext.train [demo [key=value ...]]              the CPU demo (makes demo_data/ if missing)
  python -m jmp_ext.train CONFIG.yaml [key=value ...]          the mode the config says
  python -m jmp_ext.train pretrain|finetune [CONFIG.yaml] [key=value ...]
  python -m jmp_ext.train ... --print-config                   the resolved config (YAML), no run
  python -m jmp_ext.train eval CHECKPOINT DATASET_OR_FILE [--task NAME] [--out metrics.json]
  python -m jmp_ext.train predict CHECKPOINT INPUT --out predictions.npz|.extxyz [--task NAME]
  (eval --help, predict --help: all their options)

Training reads CONFIG.yaml (optional), then the key=value overrides: dotted keys, list items by
index (tasks.0.train=/data/train), values parsed as YAML. preset=NAME starts from a named recipe
(jmp_ext/train/presets.py). Every key, its default and meaning: the dataclasses of
jmp_ext/train/config.py (TrainConfig and the classes it holds); each run saves its resolved
config as run_dir/config.yaml. A sub-command that contradicts the config's mode is an error.
example:
  python -m jmp_ext.train finetune preset=jmp_s_qm9 model.init_checkpoint=jmp-s.pt \
      tasks.0.train=/data/qm9/train tasks.0.val=/data/qm9/val run_dir=runs/qm9

INPUT is a dataset directory or any file ASE reads (extxyz, traj, ASE db, ...). Under torchrun
every training mode runs data-parallel; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import textwrap
from pathlib import Path

# (torch and the rest are imported inside main's handlers: a Ctrl-C during those imports, the
# first second or two, is a message too, not a traceback)
from jmp_ext.interrupts import sigterm_interrupts
from jmp_ext.train.config import ConfigError, TrainError, build_config, load_config
from jmp_ext.warn import plain_warnings


def run_training(config) -> dict:
    from jmp_ext.train import distributed
    from jmp_ext.train.loop import Trainer

    try:
        trainer = Trainer(config)
        summary = trainer.train()
    finally:
        distributed.teardown()
    if trainer.main:  # (the trainer's config: the targets' units as the data gave them)
        print_summary(trainer.config, summary)
    return summary


def print_summary(config, summary: dict) -> None:
    from jmp_ext.train.run_dir import RUN_FILES
    from jmp_ext.train.tasks import metric_unit

    print(f"\n== {config.mode} finished: {summary['steps']} steps ({summary['epochs']:.2f} epochs), stop: {summary['stop']}")
    if summary.get("resumed_at_step") == summary["steps"]:
        print(f"   no steps left: the run had already finished at step {summary['steps']}")
    else:
        since = f" since resuming at step {summary['resumed_at_step']}" if "resumed_at_step" in summary else ""
        print(f"   {summary['seconds']:.1f} s training{since} ({summary['wall_seconds']:.1f} s with validation and "
              f"checkpoints), {summary['structures_per_s']:.1f} structures/s, {summary['atoms_per_s']:.0f} atoms/s")
    for split in ("val", "test"):
        for name, value in (summary.get(split) or {}).items():
            print(f"   {split:4s} {name:40s} {value:<12.5g} {metric_unit(config, name)}".rstrip())
    # (Trainer.train has written summary.json by now; best.pt exists only with a validation split.)
    run = Path(config.run_dir)
    files = [name for name in RUN_FILES if (run / name).is_file()] + ["tb/"] * (run / "tb").is_dir()
    print(f"   run directory {run}: {', '.join(files)}")


def print_config(config) -> None:
    import yaml

    from jmp_ext.train.config import to_dict

    print(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), end="")


def demo(overrides: list[str], only_print: bool = False) -> dict:
    from jmp_ext.data import make_demo
    from jmp_ext.train import distributed
    from jmp_ext.train.presets import demo as demo_config

    config = build_config(demo_config(), overrides)
    if only_print:
        print_config(config)
        return {}
    check_device(config.device, "device=")
    # The demo's data are made where the preset reads them; tasks overridden to other data are
    # read as given (their parent's parent could be anywhere, / or a dataset collection).
    root = Path(demo_config()["tasks"][0]["train"]).parents[1]
    distributed.setup(config.device)
    if distributed.is_main() and any(Path(t.train).is_relative_to(root) for t in config.tasks):
        if not (root / "demo.json").is_file():
            print(f"making the demo data in {root}/ (once)")
        make_demo(root)
    distributed.barrier()  # the other ranks wait for rank 0's data
    return run_training(config)


def check_device(device: str, flag: str) -> None:
    """tasks.check_device, imported when called (see the imports above)."""
    from jmp_ext.train import tasks

    tasks.check_device(device, flag)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_out_path(out: str | None, checkpoint: str, data: str) -> None:
    """eval's / predict's --out replaces a file: never the checkpoint, the input, a directory or
    a file of a dataset (a metrics JSON written over meta.json destroyed the dataset), and it must
    be writable (checked before the work, which may take hours)."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise TrainError(f"--out {out} is a directory; give a file name in it")
    for given, what in ((checkpoint, "the checkpoint"), (data, "the input")):
        if path.exists() and Path(given).exists() and path.resolve() == Path(given).resolve():
            raise TrainError(f"--out {out} is {what}: it would be replaced; choose another file")
    from jmp_ext.data.format import META_FILE

    if (path.parent / META_FILE).is_file():
        raise TrainError(f"--out {out} is inside the dataset {path.parent}: write it elsewhere")
    # Before the work, not after it (the file is written at the end; missing directories are made).
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise TrainError(f"--out {out}: {where} is a file, not a directory; write it elsewhere")
    if not os.access(where, os.W_OK):
        raise TrainError(f"--out {out}: cannot write in {where} (read-only or not yours); write it elsewhere")


def check_resume_place(config, path: str | None, overrides: list[str]) -> None:
    """resume=true with a run's own config.yaml, from another working directory than the run's:
    its relative run_dir names a directory without last.pt there, and the run would start anew
    (a job resubmitted from elsewhere), where the config sits beside the last.pt it meant."""
    if not (config.resume and path) or any(o.startswith("run_dir=") for o in overrides):
        return
    beside, run_dir = Path(path).parent, Path(config.run_dir)
    if (beside / "last.pt").is_file() and not (run_dir / "last.pt").is_file():
        raise TrainError(f"resume=true: {path} is the config of the run in {beside}, which has last.pt, but its "
                         f"run_dir {config.run_dir} ({run_dir.resolve()} from here) has none: give "
                         f"{shlex.quote(f'run_dir={beside}')}, or run from the directory the run was started in (a "
                         "config's relative paths are relative to the working directory)")


def is_config_path(arg: str) -> bool:
    """The first training argument is the config when it names one; a path may hold '=' (a sweep's
    runs/lr=1e-3/config.yaml), so that alone does not make it an override."""
    return arg.lower().endswith((".yaml", ".yml")) or Path(arg).is_file()


def raised_by_jmp_ext(error: BaseException) -> bool:
    """The error comes from this package's checks of the user's input, not from a library it
    calls: its class is one of jmp_ext's (ConfigError, TrainError, DataError, ..., also when a
    DataLoader worker's is raised again by torch), or a plain one raised in jmp_ext's code. (A
    library function written in C that fails inside jmp_ext's code counts as ours: it leaves no
    frame of its own.)"""
    if type(error).__module__.split(".")[0] == "jmp_ext":
        return True
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parents[1]
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def print_error(message: str) -> None:
    """Prints an error to stderr; under torchrun (WORLD_SIZE > 1) prefixed with the rank. Every
    rank says its own: even a config error may be one rank's (a file its node lacks), and a rank
    that failed in silence would leave the others waiting for it."""
    rank, world_size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(message if world_size in ("", "1") else f"[rank {rank}] {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    inference = bool(argv) and argv[0] in ("eval", "predict")  # (their --out is written at the end, once)
    try:
        with sigterm_interrupts(), plain_warnings():
            return run_command(argv)
    except (ConfigError, TrainError, ValueError) as e:
        if not raised_by_jmp_ext(e):  # (torch's or numpy's: a bug to report, with its traceback)
            raise
        print_error(f"error: {e}")  # bad input, said by our checks: a message, no traceback
        return 2
    except OSError as e:  # a path of the user's: missing, a file for a directory, not writable, a full disk
        full = ""
        if e.errno == errno.ENOSPC:
            full = " (the disk is full: free space and run it again"
            if not inference:
                full += ("; a training run resumes from its last checkpoint, run_dir/last.pt once it has one, with "
                         "resume=true: a failed write leaves the files as they were")
            full += ")"
        print_error(f"error: {e}{full}")
        return 2
    except RuntimeError as e:
        # torch raises a killed worker's error wherever the training process happens to be (its
        # traceback ends in the model, which reads as a bug of the model); a worker's crash
        # (a segmentation fault) is a bug to report, with the traceback
        if not (str(e).startswith("DataLoader worker (pid") and "killed by signal: Killed" in str(e)):
            raise
        print_error(f"error: {e}\n  a data-loading worker process died; the usual cause is the out-of-memory killer "
                    "(dmesg says): lower data.num_workers (0: none), and set data.in_memory=false if it is "
                    "true. A training run continues from run_dir/last.pt with resume=true")
        return 1
    except KeyboardInterrupt as e:  # (training's first Ctrl-C or SIGTERM ends the step and saves last.pt: e says so)
        # Under torchrun a terminal's Ctrl-C reaches every rank, and every rank stops alike: one message.
        if inference:
            print(f"\ninterrupted: {argv[0]} writes --out only at its end, so nothing was written", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0":
            saved = (f": {e}. A training run continues from run_dir/last.pt with resume=true" if str(e) else
                     ". A training run continues from run_dir/last.pt with resume=true if it saved one (every "
                     "loop.ckpt_every steps, and at the first Ctrl-C or SIGTERM once training has started; "
                     "none before that, while data load and scale factors are fitted)")
            print(f"\ninterrupted{saved}", file=sys.stderr)
        return 130


def run_command(argv: list[str]) -> int:
    """main's work: the sub-command of argv; returns the exit code."""
    if argv and argv[0] in ("eval", "predict"):
        is_eval = argv[0] == "eval"
        parser = argparse.ArgumentParser(
            prog=f"python -m jmp_ext.train {argv[0]}",
            description="Metrics (JSON) of a trained checkpoint on a dataset." if is_eval else
            "Predictions of a trained checkpoint for every structure of INPUT, in INPUT's order: "
            "one per target the checkpoint predicts, under its name (energy in eV, forces in eV/Å, "
            "stress in eV/Å^3, properties in their units, a classification's logits [M, C]: the "
            "class is their argmax), and with an energy target energies, each atom's term of the "
            "energy (eV). OUT.npz: those arrays, natoms, and sid (and fid) when every structure "
            "has them (a dataset's entries, a file's frames' info, OC20's frame log beside an "
            "extxyz); OUT.extxyz (or .xyz): the structures with predicted_NAME beside "
            "their own labels.",
            epilog="Training: python -m jmp_ext.train --help.")
        parser.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt or last.pt of a run")
        parser.add_argument("data", metavar="DATASET" if is_eval else "INPUT",
                            help="dataset directory or ASE-readable file" + (
                                " (or an sGDML or rMD17 npz; a file's energy, forces and stress read with convert's "
                                "default keys, a property target from the key of its name)" if is_eval else
                                " (positions in Å: convert a file in other units first)"))
        parser.add_argument("--task", default=None, help="task whose heads to use (needed when the checkpoint has several: pretraining)")
        parser.add_argument("--out", required=not is_eval, default=None,
                            help="metrics JSON file" if is_eval else "OUT.npz, OUT.extxyz or OUT.xyz")
        parser.add_argument("--batch-size", type=positive_int, default=16,
                            help="structures per batch (default 16), and at most the run's data.max_atoms atoms")
        parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                            help="the network's precision (default: the one it was trained in); float64 for the "
                                 "gradient forces of small periodic cells, which float32 gets wrong (README)")
        if is_eval:
            from jmp_ext.data.convert import ENERGY_UNITS, LENGTH_UNITS

            parser.add_argument("--energy-unit", default="eV", choices=list(ENERGY_UNITS),
                                help="a file's energy unit (default eV): its energy, forces and stress are "
                                     "converted to eV as by convert (MD17/MD22 come in kcal/mol)")
            parser.add_argument("--length-unit", default="Å", choices=list(LENGTH_UNITS),
                                help="a file's length unit (default Å), as convert's")
            parser.add_argument("--subtract-reference", action="store_true",
                                help="an OC20 S2EF extxyz: subtract its frame log's reference energies, as convert's")
        else:
            parser.add_argument("--skip-invalid", action="store_true",
                                help="give a structure the model cannot take (a single atom, an unknown element, "
                                     "...) NaN predictions, named on stderr, instead of stopping (npz: valid [M])")
        try:
            a = parser.parse_args(argv[1:])
        except SystemExit as e:  # --help (0) or a usage error (2): an exit code like any other outcome
            return int(e.code or 0)
        # (under torchrun, which names its run: every rank would do it all, and write --out)
        if os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainError(f"{argv[0]} runs in one process: run it with python, not under torchrun")
        if a.device.partition(":")[0] not in ("cpu", "cuda"):
            raise TrainError(f"--device {a.device!r} is not cpu, cuda or cuda:N")
        check_device(a.device, "--device ")
        check_out_path(a.out, a.checkpoint, a.data)
        from jmp_ext.train.inference import evaluate_checkpoint, predict_checkpoint

        if is_eval:
            evaluate_checkpoint(a.checkpoint, a.data, a.task, a.out, a.batch_size, a.device, a.dtype, a.energy_unit,
                                a.length_unit, a.subtract_reference)
        else:
            predict_checkpoint(a.checkpoint, a.data, a.out, a.task, a.batch_size, a.device, a.skip_invalid, a.dtype)
    elif "-h" in argv or "--help" in argv:  # (never a config path or a key=value override)
        from jmp_ext.train.presets import PRESETS

        print(__doc__.rstrip())
        print(textwrap.fill(", ".join(PRESETS), width=96, initial_indent="presets (preset=NAME): ",
                            subsequent_indent="  "))
    else:
        only_print = "--print-config" in argv
        argv = [a for a in argv if a != "--print-config"]
        if not argv or argv[0] == "demo":
            demo(argv[1:], only_print)
            return 0
        mode = argv[0] if argv[0] in ("pretrain", "finetune") else None
        rest = argv[1:] if mode else argv
        path = rest[0] if rest and is_config_path(rest[0]) else None
        overrides = rest[1:] if path else rest
        config = load_config(path, overrides, mode)
        if only_print:
            print_config(config)
            return 0
        check_resume_place(config, path, overrides)
        check_device(config.device, "device=")
        run_training(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
