"""A trained model in use: load a run's checkpoint (load_trained), predict structures with one
task's heads (predict_structures; the ASE calculator and `python -m jmp_ext.train predict` call
it) and compute metrics on datasets (evaluate; validation and test during training, and
`python -m jmp_ext.train eval`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from jmp_ext.data.format import MAX_Z
from jmp_ext.graphs import BatchStructureError
from jmp_ext.models.checkpoint import checked_weights, is_training_checkpoint, run_weights, safe_load
from jmp_ext.train import distributed, tasks
from jmp_ext.train.batches import check_finite_labels, collate_batch, load_batches, name_entries, to_device
from jmp_ext.train.checkpoint import load_checkpoint
from jmp_ext.train.config import TrainConfig, from_dict
from jmp_ext.train.metrics import Metrics
from jmp_ext.train.tasks import TaskModel, TrainError, build_model, param_dtype


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[TaskModel, TrainConfig]:
    """A trained TaskModel (eval mode) and its config from best.pt or last.pt (EMA weights when the
    run had an EMA). The checkpoint is read with weights_only=True."""
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
    buffers = {k: v for k, v in weights.items() if not k.startswith("net.")}  # (TaskModel's own)

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
    return model.eval(), config


def task_index(config: TrainConfig, task: str | None, option: str) -> int:
    """Index of the task (head) to predict with; task None: the only one. option: how the user
    names it (`--task`, `task=`), for the error."""
    names = [t.name for t in config.tasks]
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


def warn_about_inputs(model: TaskModel, task: int, elements: torch.Tensor, periodic: bool, stacklevel: int = 2) -> None:
    """Warns when structures with these `elements` (atomic numbers, int64 CPU) and `periodic`
    (whether any has periodic boundary conditions) are outside what task index `task` was
    trained on: periodic structures on non-periodic graphs (their pbc is ignored), or elements
    its training data did not have (model.train_elements)."""
    name = model.tasks[task].name
    if periodic and not model.graph_configs[task].pbc:
        warnings.warn(f"task {name!r} was trained on non-periodic graphs: these structures' periodic boundary "
                      "conditions are ignored (each is seen as an isolated cluster)", stacklevel=stacklevel)
    seen = getattr(model, "train_elements", None)
    if seen is not None:
        unknown = elements[~seen[task].cpu()[elements]].tolist()
        if unknown:
            warnings.warn(f"element(s) {unknown} are not in the training data of task {name!r}: the predictions "
                          "for them extrapolate", stacklevel=stacklevel)


def predict_structures(model: TaskModel, structures: list[dict], task: int,
                       derivatives: bool = True) -> dict[str, torch.Tensor]:
    """A trained model's predictions (load_trained) for `structures`, entries with the structure
    fields (pos, atomic_numbers, cell, pbc, tags, fixed; as a dataset or atoms_to_entry gives
    them), with the heads of task index `task`: {target name: tensor} as in training (energy [M]
    eV, forces [sum natoms, 3] eV/Å, stress [M, 3, 3] eV/Å^3, ...), on the model's device.
    derivatives=False: without gradient forces and stress."""
    parameter = next(model.net.parameters())
    batch = collate_batch(structures, parameter.dtype, task)
    warn_about_inputs(model, task, batch["atomic_numbers"].unique(), bool(batch["pbc"].any()), stacklevel=3)
    batch = to_device(batch, parameter.device)
    with torch.no_grad():  # (gradient forces re-enable autograd inside the network)
        return model(batch, derivatives)


@torch.no_grad()
def evaluate(model: TaskModel, datasets: list, batch_size: int, dtype: torch.dtype, device: torch.device,
             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Metrics of `model` on datasets[t] (the split of task t, or None), all-reduced over ranks.
    Batches are consecutive entries; rank r takes batches r, r + W, ... (no duplicates). Rank 0
    warns, once per task, about its share's structures as predict_structures does."""
    model.eval()
    metrics = Metrics()
    batches = [(t, list(range(s, min(s + batch_size, len(ds))))) for t, ds in enumerate(datasets) if ds is not None
               for s in range(0, len(ds), batch_size)]
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
            try:
                tasks.update_metrics(metrics, model, model(batch), batch)
            except BatchStructureError as e:
                raise name_entries(e, batch, datasets[t]) from e
    metrics.all_reduce()  # (before the warnings: one raised under -W error must not leave the others waiting)
    if rank == 0:
        for t in range(len(datasets)):
            if elements[t].any():
                # (stacklevel: past no_grad's wrapper, to evaluate's caller)
                warn_about_inputs(model, t, elements[t].nonzero()[:, 0], bool(periodic[t]), stacklevel=4)
    return metrics.compute()
