"""A trained model in use: load a run's checkpoint (load_trained), predict structures with one
task's heads (predict_structures; structures_batch makes its batch, for the ASE calculator too)
and compute metrics on datasets (evaluate; validation and test during training). Below them,
what `python -m jmp_ext.train eval` and `predict` run: evaluate_checkpoint (a dataset
directory, or a file converted first) and predict_checkpoint (to npz or extxyz)."""

from __future__ import annotations

import io
import json
import operator
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from jmp_ext import cpu
from jmp_ext.data import atoms_to_entry
from jmp_ext.data.format import MAX_Z
from jmp_ext.data.samplers import AtomBalancedBatchSampler
from jmp_ext.graphs import BatchStructureError
from jmp_ext.models.checkpoint import checked_weights, is_training_checkpoint, run_weights, safe_load
from jmp_ext.train import distributed, tasks
from jmp_ext.train.batches import check_finite_labels, collate_batch, entries_named, load_batches, to_device
from jmp_ext.train.checkpoint import load_checkpoint
from jmp_ext.train.config import TaskConfig, TrainConfig, TrainError, from_dict
from jmp_ext.train.metrics import Metrics
from jmp_ext.train.tasks import TaskModel, build_model, param_dtype
from jmp_ext.warn import warn_user


def load_trained(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
                 ) -> tuple[TaskModel, TrainConfig]:
    """A trained TaskModel (eval mode) and its config from best.pt or last.pt (EMA weights when the
    run had an EMA), its network in `dtype` ("float32" or "float64"; None: the precision it was
    trained in). The checkpoint is read with weights_only=True. On the CPU the process then
    keeps freed memory for reuse (jmp_ext.cpu.keep_freed_memory, as the trainer does): the
    calculator's, eval's and predict's calls allocate the same large tensors again and again (a
    108-atom cell's force calls: 20-35% faster), and the process keeps its peak memory."""
    if dtype not in (None, "float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    tasks.check_device(str(device), "device ")  # (torch.load's error would read as an unsafe file)
    try:
        state = load_checkpoint(path, device)
    except ValueError:  # (a JMP Lightning file pickles classes weights_only refuses: say what it is)
        if not Path(path).is_file():
            raise
        state = safe_load(path)
    if not is_training_checkpoint(state):
        jmp = "state_dict" in state if isinstance(state, dict) else False
        raise TrainError(f"{path} is not a jmp_ext training checkpoint (best.pt / last.pt of a run)"
                         + ("; it holds a state_dict, as a JMP (Lightning) checkpoint does, without heads for "
                            "your targets: fine-tune from it (model.init_checkpoint) and evaluate the run's "
                            "best.pt" if jmp else ""))
    config = from_dict(TrainConfig, state["config"])
    try:
        weights = checked_weights(run_weights(state), path)
    except ValueError as e:  # (NaN weights predicted NaN, silently)
        raise TrainError(str(e)) from e
    # (TaskModel's own, float64 whatever the file holds: a half-precision copy would not add to them)
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in weights.items() if not k.startswith("net.")}

    def load_into(model: TaskModel) -> None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # (e.g. written by an older jmp_ext whose network differed)
            raise TrainError(f"{path}: its weights do not fit the network its config builds in this jmp_ext; "
                             f"was it written by another version? ({key_mismatch(e)})") from e

    # First on the meta device, which allocates nothing: a config whose sizes its weights do not
    # have (an edited emb_size_edge: 60000) would otherwise allocate gigabytes before the check.
    with torch.device("meta"):
        skeleton = build_model(config, buffers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta parameter.*is a no-op")
        load_into(skeleton)
    model = build_model(config, buffers).to(device)
    model.net.to(param_dtype(config.loop.precision))  # before loading: fp64 stays fp64
    load_into(model)
    if dtype is not None:
        model.net.to(getattr(torch, dtype))
    if torch.device(device).type == "cpu":
        cpu.keep_freed_memory()
    return model.eval(), config


def task_index(tasks: list[TaskConfig], task: str | None, option: str = "task=") -> int:
    """Index in `tasks` (a run's config.tasks, or TaskModel.tasks) of the task (heads) to predict
    with, by name; task None: the only one. option: how the user names it (`--task`, `task=`),
    for the error."""
    names = [t.name for t in tasks]
    if task is None:
        if len(names) > 1:  # (a pretraining checkpoint: each task has its own heads)
            raise TrainError(f"the checkpoint has {len(names)} tasks, {names}: choose one with {option}")
        return 0
    if task not in names:
        raise TrainError(f"{option.strip('=')} {task!r} is not a task of the checkpoint (tasks: {names})")
    return names.index(task)


def key_mismatch(error: RuntimeError) -> str:
    """load_state_dict's message without its header line, shortened: the keys that differ."""
    text = " ".join(line.strip() for line in str(error).splitlines()[1:]) or str(error)
    return text if len(text) <= 600 else text[:600] + " ..."


def warn_about_inputs(model: TaskModel, task: int, elements: torch.Tensor, periodic: bool) -> None:
    """Warns when structures with these `elements` (atomic numbers, int64 CPU) and `periodic`
    (whether any has periodic boundary conditions) are outside what task index `task` was
    trained on: periodic structures on non-periodic graphs (their pbc is ignored), or elements
    its training data did not have (model.train_elements)."""
    name = model.tasks[task].name
    if periodic and not model.graph_configs[task].pbc:
        warn_user(f"task {name!r} was trained on non-periodic graphs: these structures' periodic boundary "
                  "conditions are ignored (each is seen as an isolated cluster)")
    seen = getattr(model, "train_elements", None)
    if seen is not None:
        unknown = elements[~seen[task].cpu()[elements]].tolist()
        if unknown:
            named = ", ".join(f"{chemical_symbols[z]} ({z})" for z in unknown)
            warn_user(f"element(s) {named} are not in the training data of task {name!r}: the predictions "
                      "for them extrapolate")


def predict_structures(model: TaskModel, structures: list, task: int | str | None = None,
                       derivatives: bool = True) -> dict[str, torch.Tensor]:
    """A trained model's predictions (load_trained) for `structures`, as one batch: ase.Atoms,
    or entries with the structure fields (pos, atomic_numbers, cell, pbc, tags, fixed; as a
    dataset or jmp_ext.data.atoms_to_entry gives them). task: the name or index of the task
    whose heads predict (None: the only one). Returns {target name: tensor} as in training
    (energy [M] eV float64, forces [sum natoms, 3] eV/Å, stress [M, 3, 3] eV/Å^3, a property
    [M] in its unit, ...) and "energies" [sum natoms] eV, each atom's term of the energy, on
    the model's device. derivatives=False: without gradient forces and stress."""
    if task is None or isinstance(task, str):
        task = task_index(model.tasks, task)
    elif isinstance(task, bool) or not hasattr(task, "__index__"):
        raise TypeError(f"task must be a task's name, index or None, got {type(task).__name__} {task!r}")
    else:
        task = operator.index(task)  # (numpy and 0-d torch integers too)
        if not 0 <= task < len(model.tasks):
            raise IndexError(f"task {task} is not a task index of the model (it has {len(model.tasks)} tasks)")
    batch = structures_batch(model, structures, task)
    with torch.no_grad():  # (gradient forces re-enable autograd inside the network)
        return model(batch, derivatives)


def structures_batch(model: TaskModel, structures: list, task: int, warn: bool = True) -> dict:
    """`structures` (as predict_structures takes them) as one batch for task index `task`, in
    the net's dtype on its device, after warning about elements and periodicity the task did
    not train on (warn_about_inputs; warn=False: the caller warns once for many batches)."""
    structures = [atoms_to_entry(s) if isinstance(s, Atoms) else s for s in structures]
    parameter = next(model.net.parameters())
    batch = collate_batch(structures, parameter.dtype, task)
    if warn:
        warn_about_inputs(model, task, batch["atomic_numbers"].unique(), bool(batch["pbc"].any()))
    return to_device(batch, parameter.device)


@torch.no_grad()
def evaluate(model: TaskModel, datasets: list, batch_size: int, dtype: torch.dtype, device: torch.device,
             rank: int = 0, world_size: int = 1, max_atoms: int | None = None) -> dict[str, float]:
    """Metrics of `model` on datasets[t] (the split of task t, or None), all-reduced over ranks.
    Batches are consecutive entries, at most batch_size structures and max_atoms atoms (a
    larger structure alone; the run's data.max_atoms: a cap set for memory holds here too);
    rank r takes batches r, r + W, ... (no duplicates). Rank 0 warns, once per task, about its
    share's structures as predict_structures does."""
    model.eval()
    metrics = Metrics()
    batches = [(t, b) for t, ds in enumerate(datasets) if ds is not None
               for b in AtomBalancedBatchSampler(ds.natoms, max_atoms=max_atoms, max_structures=batch_size,
                                                 shuffle=False).batches(0)]
    elements = torch.zeros(len(datasets), MAX_Z + 1, dtype=torch.bool)  # seen per task, and pbc
    periodic = torch.zeros(len(datasets), dtype=torch.bool)
    with distributed.together():  # (a bad batch of one rank: every rank raises)
        for t, idx in batches[rank::world_size]:
            (batch,) = load_batches(datasets[t], [idx], dtype, task=t)
            check_finite_labels(batch, datasets[t], [target.name for target in model.tasks[t].targets
                                                     if target.name in batch])
            elements[t, batch["atomic_numbers"]] = True
            periodic[t] |= batch["pbc"].any()
            batch = to_device(batch, device)
            with entries_named(batch, datasets[t]):  # (and out of memory, said with what to lower)
                tasks.update_metrics(metrics, model, model(batch), batch)
    metrics.all_reduce()  # (before the warnings: one raised under -W error must not leave the others waiting)
    if rank == 0:
        for t in range(len(datasets)):
            if elements[t].any():
                warn_about_inputs(model, t, elements[t].nonzero()[:, 0], bool(periodic[t]))
    return metrics.compute()


# ---------------------------------------------------------------- eval and predict of the CLI


def evaluate_checkpoint(checkpoint: str, dataset: str, task: str | None, out: str | None,
                        batch_size: int, device: str, dtype: str | None = None, energy_unit: str = "eV",
                        length_unit: str = "Å", subtract_reference: bool = False) -> dict:
    """Metrics of `checkpoint` on a dataset directory, or on a file (extxyz, ASE db, sGDML or
    rMD17 npz, ...) that is first converted, into a temporary directory: the energy, forces and
    stress (with convert's default keys, from energy_unit and length_unit to eV and Å) that the
    checkpoint predicts, the others left out, and its property targets from the keys of their
    names, as stored; subtract_reference: an OC20 S2EF extxyz's frame log's reference energies
    are subtracted from its energies, as convert's --subtract-reference does."""
    import tempfile

    from jmp_ext.data.convert import ENERGY_UNITS, LENGTH_UNITS, detect_format, reference_subtraction_applies

    model, config = load_trained(checkpoint, device, dtype)  # (before a conversion: a bad checkpoint costs none)
    t = task_index(config.tasks, task, "--task")
    if not Path(dataset).is_file():
        if ENERGY_UNITS[energy_unit] != 1.0 or LENGTH_UNITS[length_unit] != 1.0 or subtract_reference:
            raise TrainError(f"--energy-unit, --length-unit and --subtract-reference apply to a file: dataset "
                             f"{dataset} is stored in eV and Å, its energies as it was converted")
        return _evaluate_dataset(model, config, t, dataset, dataset, out, batch_size, device)
    if detect_format(Path(dataset)) == "lmdb":  # (eval converts the others itself)
        raise _convert_first(dataset, dataset, "lmdb", "evaluate")
    if subtract_reference and not reference_subtraction_applies(detect_format(Path(dataset)), energy_unit):
        raise TrainError(f"--subtract-reference applies to an OC20 S2EF extxyz, in eV: not to {dataset}"
                         + (f" read in {energy_unit}" if ENERGY_UNITS[energy_unit] != 1.0 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        partial, options = _convert_labels(dataset, Path(tmp) / "data",
                                           {target.name: target.unit for target in config.tasks[t].targets},
                                           energy_unit, length_unit, subtract_reference)
        return _evaluate_dataset(model, config, t, str(Path(tmp) / "data"), dataset, out, batch_size, device,
                                 partial, options)


# Files that convert reads and ASE does not: what they are, the options convert needs, a note.
_CONVERT_FIRST = {
    "lmdb": ("an LMDB file, as OC20's splits are", " --allow-pickle",
             " (unpickling can run code: trusted files only)"),
    "npz": ("an sGDML or rMD17 trajectory", " --energy-unit kcal/mol",
            " (MD17, MD22 and rMD17 are in kcal/mol; an sGDML file records its unit, which convert checks)"),
    "hdf5": ("an HDF5 file of conformations", "",
             " (with the units of its set: convert warns of ANI-1x's and SPICE's)"),
}


def _convert_first(source: str, named: str, kind: str, verb: str) -> TrainError:
    """The error for a `kind` file (_CONVERT_FIRST) given where a dataset is read: the convert
    command that makes one of it. named: the file as the message names it."""
    what, options, note = _CONVERT_FIRST[kind]
    return TrainError(f"{named} is {what}: convert it first, `python -m jmp_ext.data convert {shlex.quote(source)} "
                      f"OUT_DIR{options}`{note}, and {verb} OUT_DIR")


def _convert_labels(source: str, dst: Path, units: dict[str, str | None], energy_unit: str, length_unit: str,
                    subtract_reference: bool) -> tuple[dict[str, bool], list[str]]:
    """convert of an eval input for a checkpoint whose targets have these units (by name):
    those of energy, forces and stress with convert's default keys, and not the others; the
    other targets as properties from the keys of their names, as stored. A target the file
    lacks, or that only some of its structures carry, is left out (eval then warns). Returns
    {label: whether the first structure has it} for the latter, and the convert options that
    read the file as eval did (for the messages' commands)."""
    from jmp_ext.data import DataError
    from jmp_ext.data.convert import (ENERGY_UNITS, LENGTH_UNITS, KeyMap, MissingProperty, PartialLabels,
                                      SourceError, UnreadableSource, convert)

    labels = ("energy", "forces", "stress")
    properties = {name: name for name in sorted(units.keys() - set(labels))}
    partial: dict[str, bool] = {}  # label -> whether the structures without it come after the first
    # (how the file is read, for the convert commands the messages give)
    unit_options = ([f"--energy-unit {energy_unit}"] if ENERGY_UNITS[energy_unit] != 1.0 else []) + (
        [f"--length-unit {length_unit}"] if LENGTH_UNITS[length_unit] != 1.0 else []) + (
        ["--subtract-reference"] if subtract_reference else [])

    def read_options() -> list[str]:  # (a property trained in eV was converted from its unit, only the user knows)
        return [*unit_options, *(f"--property {name}{':UNIT' if units[name] == 'eV' else ''}" for name in properties)]

    while True:
        keys = KeyMap(**{label: "none" for label in labels if label not in units or label in partial},
                      properties=properties, energy_unit=energy_unit, length_unit=length_unit)
        try:
            with warnings.catch_warnings():
                # (its advice for a file without labels names a temporary directory and convert's
                # options; eval's own error says which target is missing)
                warnings.filterwarnings("ignore", message=r".* has (no labels|only a stress)")
                warnings.filterwarnings("ignore", message=r".* the energies are the extxyz files' total DFT")
                warnings.filterwarnings("ignore", message=r".* converted nothing")  # (its labels left out)
                report = convert(source, dst, keys=keys, progress=True, subtract_reference=subtract_reference)
            if report.oc20_logs_with_references and not subtract_reference and "energy" in report.labels:
                warn_user(f"{source}: the energies scored are its total DFT energies, though its OC20 frame log "
                          "lists reference energies: a model of OC20's referenced energies (trained on a dataset "
                          "converted with --subtract-reference) is evaluated with --subtract-reference")
            return partial, read_options()
        except DataError as e:
            if isinstance(e.__cause__, MissingProperty):
                del properties[e.__cause__.name]
                continue
            if isinstance(e.__cause__, PartialLabels):
                partial.update(dict.fromkeys(e.__cause__.labels, e.__cause__.lacking))
                continue
            if isinstance(e, SourceError):
                raise TrainError(str(e)) from e
            if isinstance(e, UnreadableSource):
                raise TrainError(f"{e}; give a dataset directory, or a file ASE reads: extxyz, traj, ASE db (.db), "
                                 "...") from e
            # (a structure the data refuses: a single atom, a cell in nm, ...)
            options = [*(f"--{label}-key none" for label in labels if label not in units), *read_options(),
                       "--skip-invalid"]
            raise TrainError(f"{e}; to leave such structures out, convert the file yourself, `python -m "
                             f"jmp_ext.data convert {shlex.quote(source)} OUT_DIR {' '.join(options)}`, and "
                             "evaluate OUT_DIR") from e
        except Exception as e:  # (ASE's readers raise anything on a file that is not theirs)
            if isinstance(e, OSError) and str(dst.parent) in str(e):  # (writing the copy: a full $TMPDIR)
                raise TrainError(f"eval converts {source} into a temporary directory first, and writing it failed "
                                 f"({e}): point TMPDIR at a writable disk with room (the copy takes about 1.5 times "
                                 f"an extxyz's size), or convert it yourself, `python -m jmp_ext.data convert "
                                 f"{' '.join([shlex.quote(source), 'OUT_DIR', *unit_options])}`, and evaluate "
                                 "OUT_DIR") from e
            raise TrainError(f"{source} could not be read as a labelled structure file ({type(e).__name__}: "
                             f"{e}); give a dataset directory, or a file ASE reads: extxyz, traj, ASE db (.db), "
                             "...") from e


def _evaluate_dataset(model, config, t: int, path: str, name: str, out: str | None, batch_size: int,
                      device: str, partial: dict[str, bool] | None = None, options: list[str] = ()) -> dict:
    """Metrics of task t of a loaded checkpoint on the dataset directory `path`, which the user
    knows as `name`; `partial`, `options`: a file's labels left out because only some of its
    structures carry them, and the options it was read with (_convert_labels)."""
    from jmp_ext.files import write_bytes_atomic
    from jmp_ext.train.tasks import describe_unit, open_dataset

    partial = partial or {}
    ds = open_dataset(path, "dataset", in_memory=False)
    missing = [target for target in config.tasks[t].targets if target.name not in ds.schema]
    if len(missing) == len(config.tasks[t].targets):  # (nothing to score)
        target = missing[0]
        # (--skip-invalid leaves out the structures that lack a label the first one has, not those
        # that lack one of later ones)
        first = "" if partial.get(target.name) else " (with one of them first)"
        how = ("" if path == name else
               f"; only some of its structures have it: evaluate a dataset of those, `python -m jmp_ext.data "
               f"convert {' '.join([shlex.quote(name), 'OUT_DIR', *options, '--skip-invalid'])}`{first}"
               if target.name in partial else
               f"; convert it with the label's key: python -m jmp_ext.data convert "
               f"{shlex.quote(name)} OUT_DIR " + (f"--{target.kind}-key KEY"
                                                  if target.kind in ("energy", "forces", "stress")
                                                  else f"--property {target.name}=KEY"))
        raise TrainError(f"target {target.name!r} of the checkpoint is not in {name} "
                         f"(it has: {', '.join(sorted(ds.schema))}){how}")
    for target in config.tasks[t].targets:
        unit = ds.schema[target.name]["unit"] if target.name in ds.schema else target.unit
        if target.unit is not None and unit != target.unit:  # (None: a checkpoint that predates the record)
            how = (f"convert {name} with its unit: python -m jmp_ext.data convert {shlex.quote(name)} OUT_DIR "
                   f"--property {target.name}:UNIT (to eV), and evaluate OUT_DIR" if path != name else
                   "convert its source as the training data was")
            raise TrainError(f"target {target.name!r} of the checkpoint was trained in {describe_unit(target.unit)}, "
                             f"but {name} has it in {describe_unit(unit)}: the metrics would compare two units; {how}")
    if missing:
        only_some = [target.name for target in missing if target.name in partial]
        some = f" ({', '.join(map(repr, only_some))}: on some of its structures only)" if only_some else ""
        warn_user(f"{name} has no {', '.join(repr(target.name) for target in missing)} label(s){some}: the metrics "
                  "are those of the checkpoint's other targets")
    datasets = [ds if i == t else None for i in range(len(config.tasks))]
    dtype = next(model.net.parameters()).dtype
    metrics = evaluate(model, datasets, batch_size, dtype, torch.device(device),
                       max_atoms=config.data.max_atoms or None)
    text = json.dumps(metrics, indent=1)
    print(text)
    if out:
        write_bytes_atomic(Path(out), text.encode())
    return metrics


PREDICTION_FORMATS = (".npz", ".extxyz", ".xyz")


def predict_checkpoint(checkpoint: str, source: str, out: str, task: str | None, batch_size: int, device: str,
                       skip_invalid: bool = False, dtype: str | None = None) -> dict:
    """Predictions for every structure of a dataset directory or an ASE-readable file, in the
    input's order, saved as `out` says:
    - .npz: natoms [M], energy [M] (eV), forces [sum natoms, 3] (eV/Å), stress [M, 3, 3] (eV/Å^3;
      NaN for a structure without pbc, as the calculator refuses it), a property such as U_0 [M(, k)], a classification's
      logits [M, C] (the class is their argmax): natoms and one array per target the checkpoint
      predicts, under its name; with a target of kind energy, energies [sum natoms] (eV: each atom's term,
      which sum to its structure's energy); where every structure has them, sid [M] and fid [M]
      too: a dataset's (as convert stored them: the source's own, or as sid its frame or row,
      which a split reorders), or a file's frames' (integers in their info, or OC20 S2EF's frame
      log beside an extxyz); where structures have fixed atoms, fixed [sum natoms] (bool: OC20
      scores the free atoms' forces).
    - .extxyz / .xyz: the structures (an input file's as read, its labels kept) with each
      prediction beside them as predicted_{name}: per-structure values in the frame's info,
      per-atom ones (forces, energies) as columns.
    skip_invalid: a structure the model cannot take (a single atom, an unknown element, two atoms
    on one spot, ...) gets NaN predictions, and is named on stderr, instead of ending the run;
    the npz then holds valid [M] (bool) too.
    Returns the npz arrays."""
    from jmp_ext.data.convert import detect_format, entry_to_atoms, frame_log_file, integer_identifier, read_frame_log
    from jmp_ext.data.format import DataError
    from jmp_ext.files import write_bytes_atomic
    from jmp_ext.train.tasks import open_dataset

    suffix = Path(out).suffix.lower()
    if suffix not in PREDICTION_FORMATS:
        raise TrainError(f"--out {out}: predictions are written as {', '.join(PREDICTION_FORMATS)} (the name's "
                         "suffix chooses)")
    model, config = load_trained(checkpoint, device, dtype)
    t = task_index(config.tasks, task, "--task")
    max_atoms = config.data.max_atoms
    # Streamed, batch by batch: an input of millions of structures is never held as Atoms (an
    # extxyz output reads the input again, once the predictions are made, to write it back).
    kind = detect_format(Path(source)) if Path(source).is_file() else None
    if kind in _CONVERT_FIRST:
        raise _convert_first(source, f"input {source}", kind, "predict")
    if Path(source).is_dir():
        ds = open_dataset(source, "input", in_memory=False)

        def read_input():  # -> (entry, None) per structure
            return ((ds[i], None) for i in range(len(ds)))
    else:
        def read_input():  # -> (None, Atoms) per structure
            return ((None, atoms) for atoms in iter_structures(source))
    log = frame_log_file(Path(source)) if Path(source).is_file() else None
    log = read_frame_log(log, Path(source)) if log is not None else None
    keep = ("pos", "atomic_numbers", "cell", "pbc", "tags", "fixed")
    outputs: dict[str, list[np.ndarray]] = {}  # the evaluated structures' predictions, in order
    natoms, valid, fingerprints = [], [], []  # every input structure's
    identifiers = {"sid": [], "fid": []}  # every input structure's that has them (OC20's system and frame)
    fixed: list[np.ndarray] = []  # the fixed-atom masks of the structures read
    pending, pending_index = [], []
    skipped: list[tuple[int, str]] = []  # (input index, problem), listed in the input's order
    elements = torch.zeros(MAX_Z + 1, dtype=torch.bool)  # of the evaluated structures, warned about once
    periodic = False
    stress_names = {target.name for target in config.tasks[t].targets if target.kind == "stress"}

    def skip(index: int, problem: str) -> None:
        valid[index] = False
        skipped.append((index, problem))

    def run_batch() -> None:
        nonlocal periodic
        while pending:
            try:
                batch = structures_batch(model, pending, t, warn=False)
                # (out of memory: said with the batch and what to lower; a structure error, below)
                with entries_named(batch, None), torch.no_grad():
                    preds = model(batch)
                break
            except BatchStructureError as e:
                if not skip_invalid:
                    raise TrainError(f"input structure(s) {[pending_index[s] for s in e.structures]} (0-based, in "
                                     f"the input's order): {e.problem}; --skip-invalid gives such structures NaN "
                                     "predictions instead") from e
                for s in sorted(e.structures, reverse=True):  # (left out: the others go on)
                    skip(pending_index.pop(s), e.problem)
                    del pending[s]
        else:
            return
        elements[batch["atomic_numbers"].cpu()] = True
        periodic = periodic or bool(batch["pbc"].any())
        # A structure without pbc has no stress (its box's would be meaningless): NaN, as the
        # calculator refuses it.
        open_rows = ~batch["pbc"].any(dim=1)[:, None, None]
        for name in stress_names & preds.keys():
            preds[name] = torch.where(open_rows, torch.nan, preds[name])
        for name, value in preds.items():
            outputs.setdefault(name, []).append(value.detach().double().cpu().numpy())
        pending.clear()
        pending_index.clear()

    for index, (entry, atoms) in enumerate(read_input()):
        valid.append(True)
        natoms.append(len(entry["atomic_numbers"]) if entry is not None else len(atoms))
        if suffix != ".npz":  # (the extxyz output reads the input again: the same structures?)
            fingerprints.append(structure_fingerprint(entry, atoms))
        if entry is not None:
            ids = {key: int(entry[key]) for key in identifiers if key in entry}
        elif log is not None:
            if index >= len(log.frames):  # (found now, not after the model has run on every structure)
                raise TrainError(f"{log.path} lists {len(log.frames)} frames, fewer than {source} holds: its sid "
                                 "and fid would be another frame's")
            ids = dict(zip(identifiers, log.frames[index][:2]))
        else:
            ids = {key: integer_identifier(atoms.info.get(key)) for key in identifiers}
            ids = {key: value for key, value in ids.items() if value is not None}
        for key, value in ids.items():
            identifiers[key].append(value)
        try:
            entry = entry if entry is not None else atoms_to_entry(atoms)
        except DataError as e:  # (an unknown element, a NaN position: "atoms: ..." would not say where)
            if not skip_invalid:
                raise TrainError(f"input {source}: frame {index}: {e}") from e
            skip(index, str(e))
        else:
            # (the run's data.max_atoms, a cap set for memory, holds here too: a batch ends before it)
            if max_atoms and sum(len(p["atomic_numbers"]) for p in pending) + natoms[-1] > max_atoms:
                run_batch()
            pending.append({key: entry[key] for key in keep})
            pending_index.append(index)
            fixed.append(np.asarray(entry["fixed"], dtype=bool))
        if len(pending) == batch_size:
            run_batch()
    run_batch()
    count = len(valid)
    if count == 0:
        raise TrainError(f"input {source} holds no structure")
    if log is not None and len(log.frames) != count:
        raise TrainError(f"{log.path} lists {len(log.frames)} frames, {source} holds {count}: its sid and fid would "
                         "be another frame's")
    if not any(valid):
        raise TrainError(f"no structure of {source} could be evaluated: {'%d: %s' % min(skipped)}")
    warn_about_inputs(model, t, elements.nonzero()[:, 0], periodic)
    if skipped:
        print(f"skipped {len(skipped)} structure(s) (NaN predictions):", file=sys.stderr)
        lines = [f"{index}: {problem}" for index, problem in sorted(skipped)]
        for line in lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else []):
            print(f"  {line}", file=sys.stderr)
    per_atom = {"energies", *(target.name for target in config.tasks[t].targets if target.kind == "forces")}
    arrays = {"natoms": np.array(natoms, dtype=np.int64)}
    valid_atoms = np.repeat(valid, natoms)
    for name, values in outputs.items():  # (NaN rows for the structures left out)
        evaluated = np.concatenate(values)
        rows = valid_atoms if name in per_atom else np.array(valid)
        arrays[name] = np.full((len(rows), *evaluated.shape[1:]), np.nan)
        arrays[name][rows] = evaluated
    for key, values in identifiers.items():
        if len(values) == count:
            arrays[key] = np.array(values, dtype=np.int64)
    if len(fixed) == count and any(mask.any() for mask in fixed):  # (OC20 scores the free atoms' forces)
        arrays["fixed"] = np.concatenate(fixed)
    if skip_invalid:
        arrays["valid"] = np.array(valid)
    if suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes_atomic(Path(out), buf.getvalue())
    else:
        images = (atoms if atoms is not None else entry_to_atoms(entry) for entry, atoms in read_input())
        write_predictions_extxyz(Path(out), images, arrays, per_atom, source, fingerprints)
    written = sorted(arrays) if suffix == ".npz" else sorted(f"predicted_{name}" for name in outputs)
    print(f"wrote predictions for {count} structures to {out}: {', '.join(written)}")
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


def structure_fingerprint(entry: dict | None, atoms: Atoms | None) -> int:
    """CRC32 of a structure's atomic numbers and positions (an entry's, or else the Atoms'), in
    int64 and float64 whatever they are stored in."""
    import zlib

    numbers, positions = (entry["atomic_numbers"], entry["pos"]) if entry is not None else (atoms.numbers,
                                                                                            atoms.positions)
    return zlib.crc32(np.asarray(positions, dtype=np.float64).tobytes(),
                      zlib.crc32(np.asarray(numbers, dtype=np.int64).tobytes()))


def write_predictions_extxyz(out: Path, images, arrays: dict[str, np.ndarray], per_atom: set[str],
                             source: str, fingerprints: list[int]) -> None:
    """Writes `images` (Atoms, one at a time: predict's input read again; changed in place) to
    `out` as extxyz, atomically, with predict's arrays attached as predicted_{name}: those named
    in `per_atom` (forces, energies), one row per atom, as columns, the others per structure in
    info. An image's calculator results (the input file's labels) are kept. A `source` that
    no longer holds the structures it held when predicted (their structure_fingerprint, in
    `fingerprints`) is an error."""
    import ase.io

    from jmp_ext.files import write_text_atomic

    natoms = arrays["natoms"]
    starts = np.concatenate([[0], np.cumsum(natoms)])
    changed = TrainError(f"input {source} changed while predict ran: run it again")

    def write(text) -> None:
        count = 0
        for m, atoms in enumerate(images):
            if m == len(natoms) or structure_fingerprint(None, atoms) != fingerprints[m]:
                raise changed
            for name, value in arrays.items():
                if name in ("sid", "fid"):  # (not predictions: the input's own, or its frame log's)
                    atoms.info.setdefault(name, int(value[m]))
                if name in ("natoms", "sid", "fid", "valid", "fixed"):
                    continue
                if m == 0 and f"predicted_{name}" in {**atoms.info, **atoms.arrays}:
                    warn_user(f"the input already has predicted_{name}: the output replaces it")
                if name in per_atom:
                    atoms.arrays[f"predicted_{name}"] = value[starts[m]:starts[m + 1]]
                else:
                    atoms.info[f"predicted_{name}"] = value[m]
            ase.io.write(text, atoms, format="extxyz")
            count += 1
        if count != len(natoms):
            raise changed

    write_text_atomic(out, write)
