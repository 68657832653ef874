"""From a TrainConfig to what the loop needs: datasets, the network with its normalisers, losses
and metrics of a batch.

TaskModel wraps JMP's network (jmp_ext.models PretrainModel / FinetuneModel): it builds the graphs
of a batch, runs the network and turns its outputs, which live in normalised units, into physical
predictions (eV, eV/Å, eV/Å^3):
    energy = out * std + sum_i linref[Z_i]             (per task; linref fitted on the training split,
                                                        or TargetConfig.references + a shift per atom)
    direct forces = out * force_rms
    gradient forces, stress = out * energy std         (-d/dx of the energy above: consistent, unlike
                                                        JMP's separate force std)
    scalar = out * std + mean, or out * std + sum_i linref[Z_i] with TargetConfig.linref
    (extensive, as energy);  classification logits unchanged.
Pretraining batches mix tasks: `batch["task"]` [B] says which dataset (and so which head column and
which statistics) each structure belongs to. Losses compare physical predictions with the labels
divided by the same scale, which equals JMP's loss on normalised targets.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jmp_ext.data.format import MAX_Z, UNITS, DataError
from jmp_ext.train import losses
from jmp_ext.train.config import TargetConfig, TaskConfig, TrainConfig, TrainError
from jmp_ext.train.metrics import Metrics
from jmp_ext.warn import warn_user


# ---------------------------------------------------------------- data


@dataclass
class TaskData:
    """The splits and statistics of one task."""

    config: TaskConfig
    train: object  # jmp_ext.data.LmdbDataset
    val: object | None
    test: object | None
    stats: dict


def check_device(device: str, flag: str) -> None:
    """CUDA on a machine without it, said as such (torch.load's failure reads as a broken
    checkpoint, distributed.setup's is a traceback). flag: how the user gave it, '--device ',
    'device=' or the calculator's 'device '."""
    if device.partition(":")[0] == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"{flag}{device}: CUDA is not available on this machine; use {flag}cpu")


def open_dataset(path: str, what: str, in_memory: bool):
    from jmp_ext.data import LmdbDataset

    if Path(path).is_file():
        raise TrainError(f"{what}: {path} is a file; training reads jmp_ext datasets (LMDB "
                         f"directories): convert it with `python -m jmp_ext.data convert {shlex.quote(path)} OUT_DIR`")
    if not Path(path).is_dir():
        raise TrainError(f"{what}: dataset directory {path} does not exist")
    try:
        return LmdbDataset(path, in_memory=in_memory)
    except Exception as e:
        raise TrainError(f"{what}: cannot open dataset {path}: {e}") from e


def shared_entries(train, other) -> str | None:
    """How the dataset `other` (a val or test split) holds training entries, as the end of a
    sentence naming it; None when nothing says it does. train, other: LmdbDataset. Known from
    the paths, the datasets' ids and split's provenance (ds.info), not by comparing entries."""
    if other.path.resolve() == train.path.resolve():
        return f"is the training split itself ({other.path})"
    if other.id is not None and other.id == train.id:
        return f"({other.path}) is a copy of the training split ({train.path})"
    split_of, other_split_of = train.info.get("split_of_id"), other.info.get("split_of_id")
    if other_split_of is not None and other_split_of == train.id:
        return (f"({other.path}) was split from the dataset the run trains on ({train.path}): its entries are "
                "training entries too")
    if split_of is not None and split_of == other.id:
        return (f"({other.path}) is the dataset the training split ({train.path}) was split from: it holds every "
                "training entry")
    if split_of is not None and split_of == other_split_of and train.info.get("split_id") != other.info.get("split_id"):
        return (f"({other.path}) and the training split ({train.path}) are parts of two splits of one dataset "
                f"({train.info['split_of']}): they may share entries")
    return None


def load_task_data(config: TrainConfig) -> list[TaskData]:
    """Opens every split, loads the training split's statistics, and checks that each target's
    label exists in every split, in one unit: the train split's fills in TargetConfig.unit when
    the config leaves it None."""
    from jmp_ext.data import load_stats

    out = []
    for i, task in enumerate(config.tasks):
        if not task.train:
            raise TrainError(f"task {task.name!r}: train is empty; give the LMDB directory "
                             f"(tasks.{i}.train=/data/{task.name}/train)")
        splits = {}
        for split in ("train", "val", "test"):
            path = getattr(task, split)
            splits[split] = open_dataset(path, f"tasks.{i}.{split}", config.data.in_memory) if path else None
        for split, ds in splits.items():
            if ds is None:
                continue
            # (OC20 S2EF's energies converted with and without its frame logs' reference energies
            # differ by hundreds of eV; where both splits record which, they must agree)
            referenced = [d.info.get("oc20_frame_logs", {}).get("reference_energy") for d in (splits["train"], ds)]
            if None not in referenced and referenced[0] != referenced[1]:
                raise TrainError(f"tasks.{i} ({task.name}): the {split} dataset {ds.path} has its OC20 frame logs' "
                                 f"reference energies {referenced[1]}, the train dataset {splits['train'].path} "
                                 f"{referenced[0]}: convert both the same way (--subtract-reference)")
            for k, target in enumerate(task.targets):
                if target.name not in ds.schema:
                    how = (f"--{target.kind}-key KEY" if target.kind in ("energy", "forces", "stress")
                           else f"--property {target.name}[=KEY][:UNIT]")
                    raise TrainError(f"tasks.{i} ({task.name}): target {target.name!r} is not in the {split} "
                                     f"dataset {ds.path} (it has: {', '.join(sorted(ds.schema))}); `python -m "
                                     f"jmp_ext.data convert` stores it when told where it is: {how}")
                unit = ds.schema[target.name]["unit"]
                if target.unit is None:
                    target.unit = unit
                elif unit != target.unit:
                    where, advice = (("the train dataset", "convert every split the same way (python -m jmp_ext.data "
                                      f"convert --property {target.name}:UNIT converts to eV)") if split != "train" else
                                     (f"the config (tasks.{i}.targets.{k}.unit)", "leave the unit out, or give the "
                                      "data's"))
                    raise TrainError(f"tasks.{i} ({task.name}): target {target.name!r} is in {describe_unit(unit)} in "
                                     f"the {split} dataset {ds.path}, but in {describe_unit(target.unit)} in {where}: "
                                     f"{advice}")
                shape = ds.schema[target.name]["shape"]
                if target.kind in ("energy", "scalar", "classification") and shape:
                    raise TrainError(f"tasks.{i} ({task.name}): target {target.name!r} has shape {shape} per "
                                     f"structure in {ds.path}, but a {target.kind} head predicts one number "
                                     "per structure; train each component as its own target")
                if target.kind == "classification":  # (now: in a batch, a bad label would stop the run midway)
                    # (whole numbers stored as floats too: a label written 1 in some structures and
                    # 1.0 in others is stored as floats)
                    labels = torch.tensor([float(ds.read(e)[target.name]) for e in range(len(ds))],
                                          dtype=torch.float64)
                    try:
                        class_indices(labels, target.name, target.num_classes)
                    except TrainError as e:
                        raise TrainError(f"tasks.{i} ({task.name}): {split} dataset {ds.path}: {e}") from None
                if target.linref and np.dtype(ds.schema[target.name]["dtype"]).kind != "f":
                    raise TrainError(f"tasks.{i} ({task.name}): target {target.name!r} is "
                                     f"{np.dtype(ds.schema[target.name]['dtype'])} in {ds.path}; per-element "
                                     "references (linref) are fitted on float labels")
        out.append(TaskData(task, splits["train"], splits["val"], splits["test"], load_stats(task.train)))
    check_pretraining_targets(config)  # (before the normalisers, which look targets up by task 0's names)
    return out


def with_given_references(i: int, data: TaskData) -> dict:
    """Task i's training statistics (data.stats, its stats.json) with each target's
    TargetConfig.references, where given, in place of its fitted per-element references: the
    given ones plus one fitted shift per atom (data.stats.residual_stats), and the mean and std
    of y minus those. A pass over the split, which a new run makes (a resumed one has them in
    last.pt); stats.json keeps the fitted ones."""
    from ase.data import atomic_numbers, chemical_symbols

    from jmp_ext.data.stats import residual_stats

    task, stats = data.config, data.stats
    given = [(k, target) for k, target in enumerate(task.targets) if target.references is not None]
    if not given:
        return stats
    stats = {**stats, "targets": dict(stats["targets"]), "linrefs": dict(stats.get("linrefs", {}))}
    for k, target in given:
        missing = [chemical_symbols[z] for z in stats.get("elements", ())
                   if chemical_symbols[z] not in target.references]
        if missing:
            raise TrainError(f"tasks.{i} ({task.name}): tasks.{i}.targets.{k}.references has no reference for "
                             f"{', '.join(missing)}, element(s) of the train split {task.train}")
        references = np.full(MAX_Z + 1, np.nan)
        for symbol, value in target.references.items():
            references[atomic_numbers[symbol]] = value
        try:
            residual = residual_stats(data.train, target.name, references)
        except DataError as e:
            raise TrainError(f"tasks.{i} ({task.name}): tasks.{i}.targets.{k}.references: {e}") from None
        # The fitted shift per atom joins every given reference; an element without one (absent
        # from the split) keeps 0: training never looks it up, predictions warn about it.
        linref = np.where(np.isnan(references), 0.0, references + residual.pop("shift"))
        if target.kind == "energy":
            stats["linref"], stats["targets"][target.name] = linref, residual
        else:
            stats["linrefs"][target.name] = {"linref": linref, **residual}
    return stats


def describe_unit(unit: str) -> str:
    """A schema unit for a message: '' is a property convert stored as it was."""
    return repr(unit) if unit else "'' (as stored, no unit)"


# ---------------------------------------------------------------- model


class TaskModel(nn.Module):
    """Graphs + network + denormalisation. forward(batch) -> physical predictions by target name.

    State: `net.*` (JMP's keys: embedding.*, backbone.*, output.*) and the normaliser buffers
    `norm_{target}_mean/std` [T(, k)], `norm_linref` [T, 119] (energy's per-element references) and
    `norm_{target}_linref` [T, 119] (scalars with linref), T = number of tasks, which stay
    float64 whatever the network's dtype; `train_elements` bool [T, 119] when the statistics list
    the training elements (move the model with .to(device), the net with .to(dtype)).
    Energies and scalars come out float64."""

    def __init__(self, net: nn.Module, task_configs: list[TaskConfig], graph_configs: list, buffers: dict[str, torch.Tensor],
                 pretrain: bool, edge_dropout: float):
        super().__init__()
        self.net = net
        self.tasks = task_configs
        self.graph_configs = graph_configs  # jmp_ext.graphs.GraphConfig per task
        self.pretrain = pretrain
        self.edge_dropout = edge_dropout
        self.targets = {t.name: t for t in task_configs[0].targets}  # pretraining tasks share target names
        self.gradient_forces = any(t.gradient_forces for t in task_configs)  # see TaskConfig.gradient_forces
        for name, value in buffers.items():
            self.register_buffer(name, value.clone())

    def scale(self, name: str) -> torch.Tensor:
        return getattr(self, f"norm_{name}_std")

    def graphs(self, batch: dict) -> dict:
        """The batch's four graphs and interaction indices, each structure's from its task's
        GraphConfig (edge dropout only while training)."""
        from jmp_ext.graphs import build_graphs

        return build_graphs(batch, self.graph_configs,
                            edge_dropout=self.edge_dropout if (self.training and self.edge_dropout) else None)

    def forward(self, batch: dict, derivatives: bool = True, graphs: dict | None = None) -> dict[str, torch.Tensor]:
        """Physical predictions per target, and "energies" [N] eV (each atom's term of the energy,
        which they sum to) when there is an energy; derivatives=False leaves out gradient forces
        and stress (FinetuneModel.forward). batch: jmp_ext.data.collate's dict, pos and cell in
        the net's dtype, with "task" [B] int64, each structure's task index (optional for a
        model of one task). graphs: self.graphs(batch) when the caller built them already (the
        calculator checks them first; the network recomputes their geometry for gradients)."""
        task = batch.get("task")  # [B] int64
        if task is None:  # (a batch of jmp_ext.data.collate, not of the trainer's collate_batch)
            if len(self.tasks) > 1:
                raise ValueError(f"batch has no 'task': [B] int64, the index of each structure's task in "
                                 f"{[t.name for t in self.tasks]}")
            batch = {**batch, "task": torch.zeros_like(batch["natoms"])}
            task = batch["task"]
        if graphs is None:
            graphs = self.graphs(batch)
        # (PretrainModel has direct forces only: no derivatives to leave out)
        out = self.net(batch, graphs) if derivatives or self.pretrain else self.net(batch, graphs, derivatives=False)
        atom_task = task[batch["batch"]]
        dtype = batch["pos"].dtype
        preds = {}
        if self.pretrain:
            # Every head ran on every structure; keep each structure's own task column.
            out = {"energy": out["energy"].gather(1, task[:, None])[:, 0],
                   "forces": out["forces"].gather(2, atom_task[:, None, None].expand(-1, 3, 1))[..., 0],
                   "energy_atoms": out["energy_atoms"].gather(1, atom_task[:, None])[:, 0]}
        # Each atom's term of the energy, with its element's reference (ASE's "energies"); not of
        # a scalar target that happens to be named energy (its mean is no atom's).
        if "energy_atoms" in out and self.targets["energy"].kind == "energy":
            preds["energies"] = (out["energy_atoms"].double() * self.scale("energy")[atom_task]
                                 + self.norm_linref[atom_task, batch["atomic_numbers"]])
        for name, target in self.targets.items():
            if target.kind in ("forces", "stress") and target.kind not in out:  # (derivatives=False)
                continue
            if target.kind == "forces":
                scale = self.scale("energy") if self.gradient_forces else self.scale("forces")
                preds[name] = out["forces"] * scale.to(dtype)[atom_task][:, None]
            elif target.kind == "stress":
                preds[name] = out["stress"] * self.scale("energy").to(dtype)[task][:, None, None]
            elif target.kind == "classification":
                preds[name] = out[name]
            else:
                # In float64: a molecule's total energy (~1e4 eV) has no meV left in float32.
                mean = getattr(self, f"norm_{name}_mean")[task]
                std = self.scale(name)[task]
                y = out[name].double()
                y = y * std + mean if y.dim() == 1 else y * std[:, None] + mean
                linref = self.norm_linref if target.kind == "energy" else getattr(self, f"norm_{name}_linref", None)
                if linref is not None:
                    ref = linref[atom_task, batch["atomic_numbers"]]
                    y = y + torch.zeros_like(y).index_add_(0, batch["batch"], ref)
                preds[name] = y
        return preds


def normalizers(task_configs: list[TaskConfig], stats: list[dict]) -> dict[str, torch.Tensor]:
    """TaskModel's buffers from the training splits' statistics: norm_linref [T, 119] (energy's
    per-element references), norm_{target}_linref [T, 119] for scalar targets with linref, and
    norm_{target}_mean / norm_{target}_std [T] (or [T, k]), float64."""
    norms = {"norm_linref": torch.zeros(len(task_configs), MAX_Z + 1, dtype=torch.float64)}
    for name in [t.name for t in task_configs[0].targets]:
        mean, std = [], []
        for i, (task, st) in enumerate(zip(task_configs, stats)):
            target = next(t for t in task.targets if t.name == name)
            m, s = _target_scale(task, target, st, i)
            mean.append(m)
            std.append(s)
            if target.normalize and target.kind == "energy" and "linref" in st:
                norms["norm_linref"][i] = torch.as_tensor(np.asarray(st["linref"], dtype=np.float64))
            if target.normalize and target.linref:
                linref = norms.setdefault(f"norm_{name}_linref", torch.zeros_like(norms["norm_linref"]))
                linref[i] = torch.as_tensor(np.asarray(st["linrefs"][name]["linref"], dtype=np.float64))
        norms[f"norm_{name}_mean"], norms[f"norm_{name}_std"] = torch.stack(mean), torch.stack(std)
    for key, value in norms.items():  # (statistics of labels so large that they overflow, or an edited file)
        bad = ~torch.isfinite(value)
        if key.endswith("_std"):
            bad |= value < 0
        if bad.any():
            task = int(bad.nonzero()[0, 0])
            raise TrainError(f"tasks.{task} ({task_configs[task].name}): {task_configs[task].train}/stats.json gives a "
                             f"non-finite or negative {key.removeprefix('norm_')} ({value[task].tolist()}): labels so large "
                             "(~1e300, a placeholder for 'missing'?) that their statistics overflow, or an edited "
                             "file; fix the labels, then `python -m jmp_ext.data stats "
                             f"{shlex.quote(task_configs[task].train)} --recompute`")
    return norms


def training_elements(stats: list[dict]) -> dict[str, torch.Tensor]:
    """{"train_elements": bool [T, 119]}: the elements of each task's training split, which
    predict_structures warns outside of; {} for statistics that predate the list."""
    if any("elements" not in st for st in stats):
        return {}
    seen = torch.zeros(len(stats), MAX_Z + 1, dtype=torch.bool)
    for i, st in enumerate(stats):
        seen[i, list(st["elements"])] = True
    return {"train_elements": seen}


def _target_scale(task: TaskConfig, target: TargetConfig, stats: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) the network's output for this target is scaled by (float64)."""
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    if not target.normalize or target.kind == "classification":
        return zero, one
    if target.kind in ("forces", "stress"):
        if target.kind == "forces" and not task.gradient_forces:
            if "force_rms" not in stats:
                raise TrainError(f"tasks.{i} ({task.name}): no force statistics in {task.train}/stats.json")
            # (all-zero forces, relaxed structures only, would divide by zero: scale 1, as a constant
            # target's; a non-finite one is named by normalizers)
            rms = float(stats["force_rms"])
            return zero, torch.tensor(rms if rms != 0 else 1.0, dtype=torch.float64)
        return zero, one  # scaled by the energy std (see TaskModel)
    if target.name not in stats.get("targets", {}):
        raise TrainError(f"tasks.{i} ({task.name}): no statistics for target {target.name!r} in {task.train}/stats.json")
    s = stats["targets"][target.name]
    if np.all(np.asarray(s["std"]) == 0):
        warn_user(f"tasks.{i} ({task.name}): target {target.name!r} is {np.round(s['mean'], 6).tolist()} in every one "
                  f"of the {stats['num_entries']} structures of {task.train}: there is nothing to learn (was the "
                  "data converted with --skip-invalid, which may have kept one kind of structure only?)")
    if target.linref:  # the statistics of y - sum_i linref[Z_i]
        if target.name not in stats.get("linrefs", {}):
            raise TrainError(f"tasks.{i} ({task.name}): {task.train}/stats.json has no per-element references for "
                             f"{target.name!r} (a float scalar label; stats of an older jmp_ext?): recompute them with "
                             f"`python -m jmp_ext.data stats {shlex.quote(task.train)} --recompute`")
        s = stats["linrefs"][target.name]
    # An energy (or a scalar with per-element references) is a sum over atoms plus those
    # references, which carry its offset: a per-structure mean would add the same constant to a
    # molecule and to two far-apart copies of it, so the prediction would not be extensive.
    # (JMP's pretraining normalises with mean 0 as well.)
    extensive = target.kind == "energy" or target.linref
    mean = zero if extensive else torch.as_tensor(np.asarray(s["mean"], dtype=np.float64))
    std = torch.as_tensor(np.asarray(s["std"], dtype=np.float64))
    # A constant target (std 0) would divide by zero; keep its scale at 1. (A negative or
    # non-finite one, from an edited file, stays for normalizers to name.)
    return mean, torch.where(std == 0, torch.ones_like(std), std)


def check_pretraining_targets(config: TrainConfig) -> None:
    """JMP's pretraining heads: every task has an energy and a direct-force target (named energy
    and forces, as TargetConfig requires). Nothing to check when fine-tuning."""
    if config.mode != "pretrain":
        return
    for i, task in enumerate(config.tasks):
        kinds = sorted(t.kind for t in task.targets)
        if kinds != ["energy", "forces"] or task.gradient_forces:
            raise TrainError(f"tasks.{i} ({task.name}): pretraining tasks have exactly an energy and a forces "
                             f"target with direct forces (JMP's heads), got {kinds}, {task.forces}")


def build_network(config: TrainConfig) -> nn.Module:
    """JMP's PretrainModel (per-task energy + direct-force heads) or FinetuneModel (one head per target)."""
    from jmp_ext.models import BackboneConfig
    from jmp_ext.models.heads import HeadConfig
    from jmp_ext.models.network import FinetuneModel, PretrainModel

    m = config.model
    overrides = {"edge_dropout": m.edge_dropout or None, **m.backbone_overrides}
    try:
        backbone = getattr(BackboneConfig, m.backbone)(**overrides)
    except ValueError as e:
        raise TrainError(f"model.backbone_overrides: {e}") from e
    if config.mode == "pretrain":
        check_pretraining_targets(config)
        return PretrainModel(backbone, [t.name for t in config.tasks])
    (task,) = config.tasks
    heads = [HeadConfig(target=t.name, kind="classification" if t.kind == "classification" else "scalar",
                        reduction=t.reduction, num_outputs=max(t.num_classes, 1), dropout=m.dropout)
             for t in task.targets if t.kind in ("energy", "scalar", "classification")]
    kinds = {t.kind for t in task.targets}
    forces = "gradient" if task.gradient_forces else "direct" if "forces" in kinds else None
    if "stress" in kinds and forces != "gradient":
        raise TrainError(f"tasks.0 ({task.name}): a stress target needs forces: gradient (stress is dE/dstrain)")
    if forces == "gradient" and "energy" not in [t.name for t in task.targets if t.kind == "energy"]:
        raise TrainError(f"tasks.0 ({task.name}): gradient forces need a target named 'energy' of kind energy")
    return FinetuneModel(backbone, heads, forces=forces, stress="stress" in kinds)


def graph_configs(config: TrainConfig) -> list:
    """One jmp_ext.graphs.GraphConfig per task: the preset of its own `graph` (else the run's),
    with the cutoff and k its `graph` sets, else those the run's `graph` sets (so graph.cutoff=6
    changes every task of a preset whose tasks have their own graphs)."""
    from jmp_ext.graphs import GraphConfig

    out = []
    for task in config.tasks:
        own = task.graph or config.graph
        graph = GraphConfig.preset(own.preset)
        cutoff = own.cutoff or config.graph.cutoff
        max_neighbors = own.max_neighbors or config.graph.max_neighbors
        if cutoff > 0:
            graph = replace(graph, cutoff_main=cutoff, cutoff_a2ee2a=cutoff, cutoff_qint=cutoff, cutoff_a2a=cutoff)
        if max_neighbors > 0:
            graph = replace(graph, max_neighbors=max_neighbors)
        out.append(graph)
    return out


def build_model(config: TrainConfig, buffers: dict[str, torch.Tensor]) -> TaskModel:
    return TaskModel(build_network(config), config.tasks, graph_configs(config), buffers,
                     pretrain=config.mode == "pretrain", edge_dropout=config.model.edge_dropout)


def param_dtype(precision: str) -> torch.dtype:
    """The network's parameter dtype for loop.precision: float64 for fp64, else float32 (under
    bf16 / fp16 autocast the weights stay float32)."""
    return torch.float64 if precision == "fp64" else torch.float32


def num_blocks(net: nn.Module) -> int:
    return net.backbone.config.num_blocks


# ---------------------------------------------------------------- loss and metrics


def loss_terms(model: TaskModel, preds: dict, batch: dict, only: torch.Tensor | None = None
               ) -> dict[str, tuple[torch.Tensor, str]]:
    """Per target: (sum of the weighted per-item losses, the count it is averaged over:
    "structures" or "atoms", or "sum" for classification, which JMP sums over the batch). The
    loop divides by the global counts so DDP ranks with different batch sizes reproduce the
    single-process mean (and sum) exactly. only: bool [B], the structures to sum over (one task's, for
    its own training loss); None: all."""
    task = batch["task"]
    terms = {}
    for name, target in model.targets.items():
        coef = torch.tensor([t.targets[[x.name for x in t.targets].index(name)].coef for t in model.tasks],
                            dtype=preds[name].dtype, device=task.device)
        # (a structure's loss weight of 0 leaves it out of every sum)
        keep = only.to(coef.dtype) if only is not None else 1.0
        if target.kind == "classification":
            labels = class_indices(batch[name], name, target.num_classes)
            weight = coef[task] * keep
            cw = (torch.tensor(target.class_weights, dtype=preds[name].dtype, device=task.device)
                  if target.class_weights else None)
            terms[name] = (losses.classification_loss(preds[name], labels, weight, cw), "sum")
            continue
        if target.kind == "stress":
            check_stress_labels(batch, name)
        scale_name = "energy" if (target.kind == "stress" or (target.kind == "forces" and model.gradient_forces)) else name
        weight = coef[task] / model.scale(scale_name).to(preds[name].dtype)[task] * keep
        if target.kind == "forces":
            swl = any(t.structure_wise_force_loss for t in model.tasks)
            terms[name] = (losses.force_l2mae(preds[name], batch[name], batch["batch"], batch["natoms"], weight,
                                              structure_wise=swl),
                           "structures" if swl else "atoms")
        else:
            terms[name] = (losses.l1_loss(preds[name], batch[name], weight), "structures")
    return terms


def class_indices(labels: torch.Tensor, name: str, num_classes: int) -> torch.Tensor:
    """`labels` (whole numbers, stored as integers or floats) as int64 class indices. Any other
    than 0..num_classes-1 is a dataset (or num_classes) error: say so, rather than cross-entropy's
    IndexError or a float label truncated to a class."""
    bad = (labels < 0) | (labels >= num_classes)
    if labels.is_floating_point():
        bad |= labels != labels.round()  # (NaN too)
    if bad.any():
        found = labels[bad].tolist()
        values = sorted({int(v) if float(v).is_integer() else v for v in found if v == v})
        if any(v != v for v in found):
            values.append("nan")
        raise TrainError(f"target {name!r}: label(s) {values} are not class indices "
                         f"0..{num_classes - 1} (num_classes={num_classes})")
    return labels.long()


def check_stress_labels(batch: dict, name: str) -> None:
    """A stress label on a structure without a cell (zero volume), where the model's stress is
    undefined (NaN), or without a periodic axis, where it depends on an arbitrary box (predict
    and the calculator give none), is a dataset error: say which, rather than train on it."""
    undefined = (torch.linalg.det(batch["cell"].double()) == 0) | ~batch["pbc"].any(dim=1)
    if undefined.any():
        raise TrainError(f"target {name!r}: structure(s) {undefined.nonzero().flatten()[:10].tolist()} of the "
                         "batch have a stress label but no cell (zero volume) or no periodic axis, where stress "
                         "is undefined")


def update_metrics(metrics: Metrics, model: TaskModel, preds: dict, batch: dict) -> None:
    """Adds a batch's errors to `metrics`, per task, in physical units (for the targets whose
    labels the batch has: `eval` scores a dataset without some)."""
    # (EFwT's pair of targets: the tasks share their target names)
    energy, forces = (next((n for n, t in model.targets.items() if t.kind == kind and n in batch), None)
                      for kind in ("energy", "forces"))
    for t_i, task in enumerate(model.tasks):
        sel = batch["task"] == t_i
        if not sel.any():
            continue
        atoms = sel[batch["batch"]]
        free = atoms & ~batch["fixed"] if "fixed" in batch else atoms  # (the task's atoms that move)
        for name, target in model.targets.items():
            if name not in batch:
                continue
            p, y = preds[name], batch[name]
            if target.kind == "energy":
                metrics.update_energy(task.name, p[sel], y[sel], batch["natoms"][sel], name=name)
            elif target.kind == "forces":
                metrics.update_forces(task.name, p[atoms], y[atoms], free[atoms])
            elif target.kind == "classification":
                metrics.update_classification(task.name, name, p[sel], class_indices(y[sel], name, target.num_classes))
            else:
                if target.kind == "stress":
                    check_stress_labels(batch, name)
                metrics.update_scalar(task.name, name, p[sel], y[sel])
        if energy is not None and forces is not None:
            structure = (torch.cumsum(sel, 0) - 1)[batch["batch"][free]]  # (its index among the task's)
            metrics.update_within_threshold(task.name, preds[energy][sel] - batch[energy][sel],
                                            preds[forces][free] - batch[forces][free], structure)


def _primary_keys(config: TrainConfig) -> list[tuple[str, int]]:
    """(metric, sign) per task: its forces MAE when it trains forces, else its first target's MAE
    (its accuracy, negated, for classification)."""
    keys = []
    for task in config.tasks:
        kinds = {t.kind: t for t in task.targets}
        if "forces" in kinds and kinds["forces"].coef > 0:
            keys.append((f"{task.name}/forces_mae", 1))
        elif task.targets[0].kind == "classification":
            keys.append((f"{task.name}/{task.targets[0].name}_accuracy", -1))
        else:
            keys.append((f"{task.name}/{task.targets[0].name}_mae", 1))
    return keys


def primary_metric(config: TrainConfig, metrics: dict[str, float]) -> float:
    """The validation value (lower is better) for best checkpoints, plateau and early stopping:
    the mean over tasks of their _primary_keys (a task without a val split has no metrics)."""
    return float(np.mean([sign * metrics[key] for key, sign in _primary_keys(config) if key in metrics]))


def primary_label(config: TrainConfig, metrics: dict[str, float]) -> tuple[str, int]:
    """What primary_metric of `metrics` is, for a log line, and the sign that shows it as that
    ('mp/is_metal_accuracy', -1: an accuracy shown as itself, not negated; 'mean of
    a/forces_mae, b/forces_mae', 1), over the tasks with metrics (those with a val split)."""
    keys = [(key, sign) for key, sign in _primary_keys(config) if key in metrics]
    if len(keys) == 1:
        return keys[0]
    return f"mean of {', '.join(key if sign > 0 else f'-{key}' for key, sign in keys)}", 1


def metric_unit(config: TrainConfig, key: str) -> str:
    """The unit of metric `key` ('task/name_mae') of a run: eV for an energy's errors (eV/atom per
    atom), eV/Å for forces', eV/Å^3 for a stress's, a property's as its data has it ('' as
    stored); '' for cosines, shares (efwt, accuracy) and ROC-AUCs."""
    task_name, _, name = key.partition("/")
    task = next((t for t in config.tasks if t.name == task_name), None)
    if task is None or not name.endswith(("_mae", "_rmse")):
        return ""
    base = name.rpartition("_")[0]
    targets = {t.name: t for t in task.targets}
    if base in targets:
        target = targets[base]
        return UNITS[target.kind] if target.kind in ("energy", "forces", "stress") else target.unit or ""
    target = targets.get(base.removesuffix("_per_atom"))
    return "eV/atom" if target is not None and target.kind == "energy" else ""


def describe_primary(config: TrainConfig, metrics: dict[str, float], value: float) -> str:
    """A primary_metric value for a log line: 'md/forces_mae 0.0123' (see primary_label)."""
    label, sign = primary_label(config, metrics)
    return f"{label} {sign * value:.4g}"
