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
import contextlib
import io
import json
import os
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from jmp_ext.train.config import ConfigError, build_config, load_config
from jmp_ext.train.tasks import TrainError, check_device


def run_training(config) -> dict:
    from jmp_ext.train import distributed
    from jmp_ext.train.loop import Trainer

    try:
        trainer = Trainer(config)
        summary = trainer.train()
    finally:
        distributed.teardown()
    if trainer.main:
        print_summary(config, summary)
    return summary


def print_summary(config, summary: dict) -> None:
    from jmp_ext.train.run_dir import RUN_FILES

    print(f"\n== {config.mode} finished: {summary['steps']} steps ({summary['epochs']:.2f} epochs), stop: {summary['stop']}")
    since = f" since resuming at step {summary['resumed_at_step']}" if "resumed_at_step" in summary else ""
    print(f"   {summary['seconds']:.1f} s training{since}, {summary['structures_per_s']:.1f} structures/s, "
          f"{summary['atoms_per_s']:.0f} atoms/s")
    for split in ("val", "test"):
        for name, value in (summary.get(split) or {}).items():
            print(f"   {split:4s} {name:40s} {value:.5g}")
    # (Trainer.train has written summary.json by now; best.pt exists only with a validation split.)
    run = Path(config.run_dir)
    files = [name for name in RUN_FILES if (run / name).is_file()] + ["tb/"] * (run / "tb").is_dir()
    print(f"   run directory {run}: {', '.join(files)}")


def print_config(config) -> None:
    import yaml

    from jmp_ext.train.config import to_dict

    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")


def demo(overrides: list[str], only_print: bool = False) -> dict:
    from jmp_ext.data import make_demo
    from jmp_ext.train import distributed
    from jmp_ext.train.presets import demo as demo_config

    config = build_config(demo_config(), overrides)
    if only_print:
        print_config(config)
        return {}
    check_device(config.device, "device=")
    root = Path(config.tasks[0].train).parents[1]
    distributed.setup(config.device)
    if distributed.is_main():
        if not (root / "demo.json").is_file():
            print(f"making the demo data in {root}/ (once)")
        make_demo(root)
    distributed.barrier()  # the other ranks wait for rank 0's data
    return run_training(config)


def evaluate_checkpoint(checkpoint: str, dataset: str, task: str | None, out: str | None,
                        batch_size: int, device: str) -> dict:
    """Metrics of `checkpoint` on a dataset directory, or on a file (extxyz, ASE db, ...) that
    is first converted, into a temporary directory: the energy, forces and stress (with
    convert's default keys) that the checkpoint predicts, the others left out, and its
    property targets from the keys of their names, as stored."""
    import tempfile

    from jmp_ext.data.convert import detect_format
    from jmp_ext.train.inference import load_trained, task_index

    model, config = load_trained(checkpoint, device)  # (before a conversion: a bad checkpoint or task costs none)
    t = task_index(config, task, "--task")
    if not Path(dataset).is_file():
        return _evaluate_dataset(model, config, t, dataset, dataset, out, batch_size, device)
    if detect_format(Path(dataset)) == "lmdb":
        raise TrainError(f"{dataset} is an LMDB file, as OC20's splits are: convert it first, "
                         f"`python -m jmp_ext.data convert {dataset} OUT_DIR --allow-pickle` (unpickling can run "
                         "code: trusted files only), and evaluate OUT_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        _convert_labels(dataset, Path(tmp) / "data", {target.name for target in config.tasks[t].targets})
        return _evaluate_dataset(model, config, t, str(Path(tmp) / "data"), dataset, out, batch_size, device)


def _convert_labels(source: str, dst: Path, names: set[str]) -> None:
    """convert of an eval input for a checkpoint whose targets are `names`: those of energy,
    forces and stress with convert's default keys, and not the others (a stress that only some
    frames have would stop it); the other names as properties from the keys of the same names,
    as stored, and left out where the file lacks them (eval then warns)."""
    from jmp_ext.data import DataError
    from jmp_ext.data.convert import KeyMap, MissingProperty, convert

    labels = ("energy", "forces", "stress")
    properties = {name: name for name in sorted(names - set(labels))}
    while True:
        keys = KeyMap(**{label: "none" for label in labels if label not in names}, properties=properties)
        try:
            with warnings.catch_warnings():
                # (its advice for a file without labels names a temporary directory and convert's
                # options; eval's own error says which target is missing)
                warnings.filterwarnings("ignore", message=r".* has (no labels|only a stress)")
                convert(source, dst, keys=keys)
            return
        except DataError as e:
            if isinstance(e.__cause__, MissingProperty):
                del properties[e.__cause__.name]
                continue
            # (a structure the data refuses: a single atom, a cell in nm, ...)
            raise TrainError(f"{e}; to leave such structures out, convert the file yourself, `python -m "
                             f"jmp_ext.data convert {source} OUT_DIR --skip-invalid`, and evaluate OUT_DIR") from e
        except Exception as e:  # (ASE's readers raise anything on a file that is not theirs)
            raise TrainError(f"{source} could not be read as a labelled structure file ({type(e).__name__}: "
                             f"{e}); give a dataset directory, or a file ASE reads: extxyz, traj, ASE db (.db), "
                             "...") from e


def _evaluate_dataset(model, config, t: int, path: str, name: str, out: str | None, batch_size: int,
                      device: str) -> dict:
    """Metrics of task t of a loaded checkpoint on the dataset directory `path`, which the user
    knows as `name`."""
    from jmp_ext.files import write_bytes_atomic
    from jmp_ext.train.inference import evaluate
    from jmp_ext.train.tasks import describe_unit, open_dataset

    ds = open_dataset(path, "dataset", in_memory=False)
    missing = [target for target in config.tasks[t].targets if target.name not in ds.schema]
    if len(missing) == len(config.tasks[t].targets):  # (nothing to score)
        target = missing[0]
        how = ("" if path == name else f"; convert it with the label's key: python -m jmp_ext.data convert "
               f"{name} OUT_DIR " + (f"--{target.kind}-key KEY" if target.kind in ("energy", "forces", "stress")
                                     else f"--property {target.name}=KEY"))
        raise TrainError(f"target {target.name!r} of the checkpoint is not in {name} "
                         f"(it has: {', '.join(sorted(ds.schema))}){how}")
    for target in config.tasks[t].targets:
        unit = ds.schema[target.name]["unit"] if target.name in ds.schema else target.unit
        if target.unit is not None and unit != target.unit:  # (None: a checkpoint that predates the record)
            how = (f"convert {name} with its unit: python -m jmp_ext.data convert {name} OUT_DIR --property "
                   f"{target.name}:UNIT (to eV), and evaluate OUT_DIR" if path != name else
                   "convert its source as the training data was")
            raise TrainError(f"target {target.name!r} of the checkpoint was trained in {describe_unit(target.unit)}, "
                             f"but {name} has it in {describe_unit(unit)}: the metrics would compare two units; {how}")
    if missing:
        warnings.warn(f"{name} has no {', '.join(repr(target.name) for target in missing)} label(s): the metrics "
                      "are those of the checkpoint's other targets", stacklevel=3)
    datasets = [ds if i == t else None for i in range(len(config.tasks))]
    dtype = next(model.net.parameters()).dtype
    metrics = evaluate(model, datasets, batch_size, dtype, torch.device(device))
    text = json.dumps(metrics, indent=1)
    print(text)
    if out:
        write_bytes_atomic(Path(out), text.encode())
    return metrics


PREDICTION_FORMATS = (".npz", ".extxyz", ".xyz")


def predict(checkpoint: str, source: str, out: str, task: str | None, batch_size: int, device: str,
            skip_invalid: bool = False) -> dict:
    """Predictions for every structure of a dataset directory or an ASE-readable file, in the
    input's order, saved as `out` says:
    - .npz: natoms [M], energy [M] (eV), forces [sum natoms, 3] (eV/Å), stress [M, 3, 3] (eV/Å^3;
      NaN for a structure without a cell), a property such as U_0 [M(, k)], a classification's
      logits [M, C] (the class is their argmax): natoms and one array per target the checkpoint
      predicts, under its name; with a target of kind energy, energies [sum natoms] (eV: each atom's term,
      which sum to its structure's energy); with a dataset whose entries carry one, sid [M] too
      (the source's frame or row, which a split reorders).
    - .extxyz / .xyz: the structures (an input file's as read, its labels kept) with each
      prediction beside them as predicted_{name}: per-structure values in the frame's info,
      per-atom ones (forces, energies) as columns.
    skip_invalid: a structure the model cannot take (a single atom, an unknown element, two atoms
    on one spot, ...) gets NaN predictions, and is named on stderr, instead of ending the run;
    the npz then holds valid [M] (bool) too.
    Returns the npz arrays."""
    from jmp_ext.calculator import atoms_to_entry
    from jmp_ext.data.format import DataError
    from jmp_ext.files import write_bytes_atomic
    from jmp_ext.graphs import BatchStructureError
    from jmp_ext.train.inference import load_trained, predict_structures, task_index
    from jmp_ext.train.tasks import open_dataset

    suffix = Path(out).suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise TrainError(f"--out {out}: predictions are written as {', '.join(PREDICTION_FORMATS)} (the name's "
                         "suffix chooses)")
    model, config = load_trained(checkpoint, device)
    t = task_index(config, task, "--task")
    # Streamed, batch by batch: an input of millions of structures is never held as Atoms,
    # unless they are written back (extxyz).
    if Path(source).is_dir():
        ds = open_dataset(source, "input", in_memory=False)
        items = ((ds[i], None) for i in range(len(ds)))
    else:
        items = ((None, atoms) for atoms in iter_structures(source))
    keep = ("pos", "atomic_numbers", "cell", "pbc", "tags", "fixed")
    outputs: dict[str, list[np.ndarray]] = {}  # the evaluated structures' predictions, in order
    natoms, valid, sids, images = [], [], [], []  # every input structure's
    pending, pending_index = [], []
    skipped: list[str] = []

    def skip(index: int, problem: str) -> None:
        valid[index] = False
        skipped.append(f"{index}: {problem}")

    def run_batch() -> None:
        while pending:
            try:
                preds = predict_structures(model, pending, t)
                break
            except BatchStructureError as e:
                if not skip_invalid:
                    raise TrainError(f"input structure(s) {[pending_index[s] for s in e.structures]} (0-based, in "
                                     f"the input's order): {e.problem}") from e
                for s in sorted(e.structures, reverse=True):  # (left out: the others go on)
                    skip(pending_index.pop(s), e.problem)
                    del pending[s]
        else:
            return
        for name, value in preds.items():
            outputs.setdefault(name, []).append(value.detach().double().cpu().numpy())
        pending.clear()
        pending_index.clear()

    for index, (entry, atoms) in enumerate(items):
        valid.append(True)
        natoms.append(len(entry["atomic_numbers"]) if entry is not None else len(atoms))
        try:
            entry = entry if entry is not None else atoms_to_entry(atoms)
        except DataError as e:  # (an unknown element, a NaN position: "atoms: ..." would not say where)
            if not skip_invalid:
                raise TrainError(f"input {source}: frame {index}: {e}") from e
            skip(index, str(e))
        else:
            pending.append({key: entry[key] for key in keep})
            pending_index.append(index)
            if "sid" in entry:
                sids.append(int(entry["sid"]))
        if suffix != ".npz":
            images.append(atoms if atoms is not None else entry_to_atoms(entry))
        if len(pending) == batch_size:
            run_batch()
    run_batch()
    count = len(valid)
    if count == 0:
        raise TrainError(f"input {source} holds no structure")
    if not any(valid):
        raise TrainError(f"no structure of {source} could be evaluated: {skipped[0]}")
    if skipped:
        print(f"skipped {len(skipped)} structure(s) (NaN predictions):", file=sys.stderr)
        for line in skipped[:20] + ([f"... and {len(skipped) - 20} more"] if len(skipped) > 20 else []):
            print(f"  {line}", file=sys.stderr)
    per_atom = {"energies", *(target.name for target in config.tasks[t].targets if target.kind == "forces")}
    arrays = {"natoms": np.array(natoms, dtype=np.int64)}
    valid_atoms = np.repeat(valid, natoms)
    for name, values in outputs.items():  # (NaN rows for the structures left out)
        evaluated = np.concatenate(values)
        rows = valid_atoms if name in per_atom else np.array(valid)
        arrays[name] = np.full((len(rows), *evaluated.shape[1:]), np.nan)
        arrays[name][rows] = evaluated
    if len(sids) == count:
        arrays["sid"] = np.array(sids, dtype=np.int64)
    if skip_invalid:
        arrays["valid"] = np.array(valid)
    if suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes_atomic(Path(out), buf.getvalue())
    else:
        write_bytes_atomic(Path(out), predictions_as_extxyz(images, arrays, per_atom).encode())
    print(f"wrote predictions for {count} structures to {out}: {', '.join(sorted(arrays))}")
    return arrays


def iter_structures(path: str):
    """Every frame of a file ASE reads, as Atoms, one at a time."""
    import ase.io

    if not Path(path).is_file():
        raise TrainError(f"input {path} does not exist")
    frames = ase.io.iread(path, index=":")
    index = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as e:  # (ASE's readers raise anything on a file that is not theirs)
            if index == 0:
                raise TrainError(f"input {path} could not be read as a structure file ({type(e).__name__}: {e}); "
                                 "give a dataset directory or a file ASE reads: extxyz, xyz, traj, ASE db (.db), "
                                 "cif, POSCAR, ...") from e
            raise TrainError(f"input {path}: frame {index} could not be read ({type(e).__name__}: {e})") from e
        yield atoms
        index += 1


def entry_to_atoms(entry: dict):
    """A dataset entry as Atoms (Å): its tags, fixed atoms (FixAtoms), labels (energy, forces,
    stress as a SinglePointCalculator's results, as an extxyz file holds them) and sid (info)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    atoms = Atoms(numbers=np.asarray(entry["atomic_numbers"]), positions=np.asarray(entry["pos"], dtype=np.float64),
                  cell=np.asarray(entry["cell"], dtype=np.float64).reshape(3, 3), pbc=np.asarray(entry["pbc"]).reshape(3),
                  tags=np.asarray(entry["tags"]))
    fixed = np.asarray(entry["fixed"], dtype=bool)
    if fixed.any():
        atoms.set_constraint(FixAtoms(mask=fixed))
    labels = {name: np.asarray(entry[name], dtype=np.float64) for name in ("energy", "forces", "stress") if name in entry}
    if labels:
        if "energy" in labels:
            labels["energy"] = float(labels["energy"])
        atoms.calc = SinglePointCalculator(atoms, **labels)
    if "sid" in entry:
        atoms.info["sid"] = int(entry["sid"])
    return atoms


def predictions_as_extxyz(images: list, arrays: dict[str, np.ndarray], per_atom: set[str]) -> str:
    """extxyz text of `images` (Atoms, changed in place) with predict's arrays attached as
    predicted_{name}: those named in `per_atom` (forces, energies), one row per atom, as columns, the
    others per structure in info. An image's calculator results (the input file's labels) are
    kept."""
    import ase.io

    starts = np.concatenate([[0], np.cumsum(arrays["natoms"])])
    for m, atoms in enumerate(images):
        for name, value in arrays.items():
            if name in ("natoms", "sid", "valid"):
                continue
            if m == 0 and f"predicted_{name}" in {**atoms.info, **atoms.arrays}:
                warnings.warn(f"the input already has predicted_{name}: the output replaces it", stacklevel=2)
            if name in per_atom:
                atoms.arrays[f"predicted_{name}"] = value[starts[m]:starts[m + 1]]
            else:
                atoms.info[f"predicted_{name}"] = value[m]
    text = io.StringIO()
    ase.io.write(text, images, format="extxyz")
    return text.getvalue()


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


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's time limit, `timeout`, torchrun stopping its ranks) raises
    KeyboardInterrupt as Ctrl-C does, so a run stopped before training starts ends with a
    message rather than silently (training's first one then saves last.pt: Trainer)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        # The next one kills at once: a handler runs only between bytecodes, not while a rank
        # waits in a collective.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with sigterm_interrupts():
            return run_command(argv)
    except (ConfigError, TrainError, FileNotFoundError, ValueError) as e:
        if not raised_by_jmp_ext(e):  # (torch's or numpy's: a bug to report, with its traceback)
            raise
        print(f"error: {e}", file=sys.stderr)  # bad input, said by our checks: a message, no traceback
        return 2
    except KeyboardInterrupt as e:  # (training's first Ctrl-C or SIGTERM ends the step and saves last.pt: e says so)
        # Under torchrun a terminal's Ctrl-C reaches every rank, and every rank stops alike: one message.
        if os.environ.get("RANK", "0") == "0":
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
            "energy (eV). OUT.npz: those arrays, natoms, and sid when the dataset's "
            "entries have one; OUT.extxyz (or .xyz): the structures with predicted_NAME beside "
            "their own labels.",
            epilog="Training: python -m jmp_ext.train --help.")
        parser.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt or last.pt of a run")
        parser.add_argument("data", metavar="DATASET" if is_eval else "INPUT",
                            help="dataset directory or ASE-readable file" + (
                                " (a file's energy, forces and stress read with convert's default keys, a "
                                "property target from the key of its name)" if is_eval else ""))
        parser.add_argument("--task", default=None, help="task whose heads to use (needed when the checkpoint has several: pretraining)")
        parser.add_argument("--out", required=not is_eval, default=None,
                            help="metrics JSON file" if is_eval else "OUT.npz, OUT.extxyz or OUT.xyz")
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
        if not is_eval:
            parser.add_argument("--skip-invalid", action="store_true",
                                help="give a structure the model cannot take (a single atom, an unknown element, "
                                     "...) NaN predictions, named on stderr, instead of stopping (npz: valid [M])")
        try:
            a = parser.parse_args(argv[1:])
        except SystemExit as e:  # --help (0) or a usage error (2): an exit code like any other outcome
            return int(e.code or 0)
        check_device(a.device, "--device ")
        if is_eval:
            evaluate_checkpoint(a.checkpoint, a.data, a.task, a.out, a.batch_size, a.device)
        else:
            predict(a.checkpoint, a.data, a.out, a.task, a.batch_size, a.device, a.skip_invalid)
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
        check_device(config.device, "device=")
        run_training(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
