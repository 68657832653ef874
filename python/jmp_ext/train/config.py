"""Typed training configuration: dataclasses filled from YAML plus dotted command-line overrides.

`load_config(path, overrides)` reads a YAML file (optionally starting from a named preset, see
jmp_ext.train.presets), applies `key.path=value` overrides (list items by index: `tasks.0.train=X`)
and validates the result against the dataclasses below before anything runs: an unknown key, a
value of the wrong type or out of range, or malformed YAML raises ConfigError naming the key (or the
file or override). `save_config` writes the resolved config (atomically) beside the checkpoints;
loading that file gives the same config back.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the offending key."""


class TrainError(ValueError):
    """A problem with the inputs of a run (datasets, targets, checkpoints), with a clear message."""


_RANGES = {">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0, ">= 1": lambda v: v >= 1,
           "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1, "in (0, 1)": lambda v: 0 < v < 1}


def _check(obj: Any, section: str, rule: str, *names: str) -> None:
    """Raises a ConfigError naming `section.name` (`name` at the top level) unless each field
    `names` of obj satisfies rule, a key of _RANGES that the message repeats."""
    for name in names:
        value = getattr(obj, name)
        if not _RANGES[rule](value):
            raise ConfigError(f"{_join(section, name)} must be {rule}, got {value}")


# The dataset entries of a batch's structures (batches.CollatedEntries adds them, to name entries in errors).
ENTRY_KEY = "_entry"
# Keys a collated batch holds beside the dataset's fields (collate's natoms and batch,
# MultiDataset's dataset, batches.collate_batch's task and CollatedEntries' entries): a label under one
# would be overwritten.
RESERVED_NAMES = ("natoms", "batch", "dataset", "task", ENTRY_KEY)
# Predictions beside the targets' (TaskModel's per-atom energies, the networks' terms of them).
PREDICTED_NAMES = ("energies", "energy_atoms")


@dataclass(kw_only=True)
class TargetConfig:
    """One supervised target of a task."""

    name: str
    """Key of the label in the batch: energy, forces, stress, or a property name."""
    kind: Literal["energy", "forces", "stress", "scalar", "classification"]
    """energy: sum-reduced extensive scalar that gradient forces/stress differentiate; forces:
    direct head or -dE/dpos (see TaskConfig.forces); stress: (1/V) dE/dstrain (eV/Å^3, ASE's
    sign); scalar: a graph-level property; classification: a class index."""
    coef: float = 1.0
    """Loss coefficient (JMP pretraining: energy 1, forces 73/80/15/14 for OC20/OC22/ANI-1x/T1x)."""
    reduction: Literal["sum", "mean", "max", "spatial_extent"] = "sum"
    """How a scalar head pools per-atom outputs (JMP: sum for QM9, mean for MatBench/QMOF;
    spatial_extent: sum_i s_i |r_i - COM|^2, JMP's head for QM9's R², with normalize: false)."""
    num_classes: int = 0
    """Number of classes (classification only)."""
    class_weights: list[float] | None = None
    """Cross-entropy class weights (JMP's mp_is_metal: [1, 1.342])."""
    normalize: bool = True
    """Train on (y - mean) / std with the dataset statistics, or on (y - sum of per-element
    references) / std for energy and linref targets (no mean: they stay extensive); forces are
    divided by the force RMS with direct forces, gradient forces and stress by the energy std."""
    linref: bool = False
    """scalar: subtract per-element reference values (least-squares fit on the training split,
    like energy's) before normalising; for extensive properties (JMP's QM9 U_0, U, H, G, ZPVE,
    c_v). energy has them whenever normalize is true."""
    references: dict[str, float] | None = None
    """Per-element reference values to use instead of the least-squares fit, by element symbol,
    in the label's unit: isolated-atom energies (MACE's E0s) or JMP's QM9 atom energies, e.g.
    {H: -13.6, C: -1029.5, O: -2041.8}. For energy, or a scalar with linref: true; every element
    of the training split needs one. As in MACE, one shift per atom, fitted on the training
    split, is added to every reference (the binding energy that isolated-atom references leave
    is far from zero); the std is that of the label minus the shifted references there."""
    unit: str | None = None
    """Unit of the labels, as their dataset's schema records it: 'eV', 'eV/Å', 'eV/Å^3' for
    energy, forces and stress; for a property 'eV' when convert converted it (--property
    NAME:UNIT), '' as stored. None: the train split's, filled in when the data is opened (the
    run's config.yaml and checkpoints record it). Every split, and a dataset evaluated later,
    must have the same: a property converted in one and stored as is in another would be
    compared in two units."""

    def __post_init__(self) -> None:
        from jmp_ext.models.heads import head_name_problem

        if not self.name:
            raise ConfigError("target name is empty")
        problem = head_name_problem(self.name)
        if problem:
            raise ConfigError(f"target {self.name!r}: {problem}")
        if self.name in RESERVED_NAMES:
            raise ConfigError(f"target {self.name!r}: the batch uses that name itself ({', '.join(RESERVED_NAMES)}); "
                              f"store the label under another name (python -m jmp_ext.data convert --property NEW=KEY)")
        if self.name in PREDICTED_NAMES:
            raise ConfigError(f"target {self.name!r}: the model's predictions use that name itself (per-atom "
                              f"energies); store the label under another name (python -m jmp_ext.data convert "
                              f"--property NEW=KEY)")
        if self.kind == "energy" and self.name != "energy":
            raise ConfigError(f"target {self.name!r}: kind energy is the dataset's 'energy' field (its linear "
                              "references are fitted on it); use kind scalar with reduction sum for another "
                              "extensive property")
        if self.kind in ("forces", "stress") and self.name != self.kind:
            raise ConfigError(f"target {self.name!r}: kind {self.kind} is the dataset's {self.kind!r} field (convert "
                              f"stores it under that name, whatever the source's key): name the target {self.kind}")
        if self.kind == "energy" and self.reduction != "sum":
            raise ConfigError(f"target energy: an energy is a sum over atoms (its forces and stress are its "
                              f"derivatives), not a {self.reduction}; for an intensive property (per-atom "
                              f"energy, band gap) use kind scalar with reduction {self.reduction}")
        if self.reduction == "spatial_extent" and (self.kind != "scalar" or self.normalize or self.linref):
            raise ConfigError(f"target {self.name!r}: reduction spatial_extent is JMP's R² head, for a kind scalar "
                              f"target with normalize: false and linref: false (it predicts sum_i s_i |r_i - COM|^2, "
                              f"which a mean, std or per-element references would not keep in that form)")
        if self.kind == "classification" and self.num_classes < 2:
            raise ConfigError(f"target {self.name!r}: classification needs num_classes >= 2")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ConfigError(f"target {self.name!r}: class_weights needs {self.num_classes} entries")
        if self.coef < 0:
            raise ConfigError(f"target {self.name!r}: coef must be >= 0, got {self.coef}")
        if self.linref and self.kind != "scalar":
            raise ConfigError(f"target {self.name!r}: linref is for scalar targets (energy always has "
                              f"per-element references), not {self.kind}")
        if self.linref and not (self.normalize and self.reduction == "sum"):
            raise ConfigError(f"target {self.name!r}: linref needs normalize: true and reduction: sum (the "
                              "references are a sum over atoms, for an extensive property)")
        if self.references is not None:
            from ase.data import chemical_symbols

            if not (self.normalize and (self.kind == "energy" or self.linref)):
                raise ConfigError(f"target {self.name!r}: references replace the fitted per-element references of "
                                  "an energy or a scalar with linref: true, with normalize: true")
            unknown = [k for k in self.references if k not in chemical_symbols[1:]]
            if unknown:
                nobelium = " (YAML reads a bare No as false: write 'No')" if False in unknown else ""
                raise ConfigError(f"target {self.name!r}: references: {', '.join(map(repr, unknown))} is not an "
                                  f"element symbol (H, He, ..., as ASE writes them){nobelium}")


@dataclass(kw_only=True)
class GraphSettings:
    """How a task's four graphs are built: a jmp_ext.graphs.GraphConfig preset, optionally with
    another cutoff or k. The periodic presets (oc20, oc22, matbench, qmof) use each structure's
    pbc flags; the molecule presets (ani1x, transition1x, qm9, rmd17, md22, spice) treat every
    structure as non-periodic."""

    preset: str = "oc20"
    """jmp_ext.graphs.GraphConfig preset: oc20, oc22, ani1x, transition1x, qm9, rmd17, md22, spice,
    matbench, qmof."""
    cutoff: float = 0.0
    """Å; replaces the preset's cutoffs (all four graphs) when > 0."""
    max_neighbors: int = 0
    """Replaces the preset's base k (main graph; the others follow JMP's proportions) when > 0."""

    def __post_init__(self) -> None:
        # Messages say graph.* also for a task's graph (tasks.N.graph): the class does not know its key.
        from jmp_ext.graphs import GraphConfig

        try:
            GraphConfig.preset(self.preset)
        except ValueError as e:
            raise ConfigError(f"graph.preset: {e}") from None
        _check(self, "graph", ">= 0", "cutoff", "max_neighbors")


@dataclass(kw_only=True)
class TaskConfig:
    """One dataset and its heads. Pretraining has several tasks; fine-tuning has one."""

    name: str
    """Task (head) name, e.g. oc20 or catalysis; checkpoint keys use it."""
    train: str = ""
    """LmdbDataset directory of the training split (a preset leaves it empty: training needs it,
    --print-config does not)."""
    val: str = ""
    """Validation split ('' = none; then no early stopping or best checkpoint)."""
    test: str = ""
    """Test split, evaluated with the best weights at the end of fine-tuning ('' = none)."""
    targets: list[TargetConfig] = field(default_factory=list)
    """What the task's heads predict and its loss compares (pretraining: energy and forces)."""
    forces: Literal["direct", "gradient"] = "direct"
    """Force head: direct (edge scalars times unit vectors, JMP pretraining) or F = -dE/dpos."""
    structure_wise_force_loss: bool | None = None
    """L2MAE force loss summed per structure / natoms, then averaged (SWL). None: JMP's, true
    when pretraining, false when fine-tuning. One setting for the run: every task must give the
    same."""
    graph: GraphSettings | None = None
    """This task's graphs (None: the run's `graph`; a cutoff or k this one leaves at 0 comes from
    the run's `graph`). A pretraining batch mixes tasks; each structure gets its own task's graphs
    (JMP: 12 Å for OC20/OC22, 8 Å for ANI-1x/T1x)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"task name {self.name!r} must be non-empty and without '/' (metric keys are "
                              "task/metric, checkpoint keys use it too)")
        if not self.targets:
            raise ConfigError(f"task {self.name!r}: no targets")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"task {self.name!r}: duplicate target names {names}")

    @property
    def gradient_forces(self) -> bool:
        """Gradient forces are in use: forces: gradient and a forces or stress target, so the
        energy is differentiated (F = -dE/dpos, stress from dE/dstrain), forces are scaled by the
        energy std and the network cannot be torch.compiled (a new run refuses forces: gradient
        without such a target). The one rule for TrainConfig, build_network and TaskModel."""
        return self.forces == "gradient" and any(t.kind in ("forces", "stress") for t in self.targets)


@dataclass(kw_only=True)
class ModelConfig:
    """The network: backbone preset and changes, fine-tuning initialisation and freezing, dropout."""

    backbone: Literal["tiny", "jmp_s", "jmp_l"] = "tiny"
    """BackboneConfig preset; `backbone_overrides` changes single fields."""
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    """BackboneConfig fields to change, e.g. {num_blocks: 3} (validated by BackboneConfig)."""
    init_checkpoint: str = ""
    """A checkpoint (ours or JMP's) whose embedding + backbone initialise the model: fine-tuning,
    or a new pretraining run that starts from one (resume=true continues a run instead). The heads
    start new unless init_heads."""
    init_ema: bool = True
    """Take the EMA weights of init_checkpoint when it has them (JMP's default)."""
    init_heads: bool = False
    """Also start each task that init_checkpoint (one of our runs, of the same mode) trained
    under the same name from that task's heads and normalisation (per-element references, mean,
    std), so that it first predicts as the checkpoint did: continued pretraining, or a fine-tune
    continued on more data. Its targets must be the checkpoint task's; other tasks start new."""
    freeze_embedding: bool = False
    """Fine-tuning: keep the atom embedding at init_checkpoint's values."""
    freeze_blocks: list[int] = field(default_factory=list)
    """Indices i of blocks_i (int_blocks.i + out_blocks.i+1; out_blocks.0 goes with block 0) to freeze."""
    edge_dropout: float = 0.0
    """Probability of dropping a2a edges while training (JMP pretraining: 0.1)."""
    dropout: float = 0.0
    """Fine-tuning: dropout on the per-atom features before each head (JMP's mp_is_metal: 0.5).
    The backbone has none, as in JMP (model.backbone_overrides.dropout would add it)."""

    def __post_init__(self) -> None:
        _check(self, "model", "in [0, 1)", "edge_dropout", "dropout")
        # The backbone's edge_dropout only sets the 1/(1-p) boost of its energy sums, while
        # model.edge_dropout drops the edges: one value must set both.
        if "edge_dropout" in self.backbone_overrides:
            raise ConfigError("model.backbone_overrides.edge_dropout: set model.edge_dropout instead (it both "
                              "drops the edges and rescales the backbone's sums)")
        if self.init_heads and not self.init_checkpoint:
            raise ConfigError("model.init_heads needs model.init_checkpoint (the checkpoint whose heads to start from)")
        if any(i < 0 for i in self.freeze_blocks):
            raise ConfigError(f"model.freeze_blocks entries must be >= 0, got {self.freeze_blocks}")


@dataclass(kw_only=True)
class DataConfig:
    """Batching and loading of the training and validation splits."""

    max_atoms: int = 0
    """Cap on atoms per global batch (0 = no cap); batches are balanced by atoms across ranks. It
    caps validation and test batches too (each rank's: max_atoms / ranks, as its training share)
    and eval and predict batches (a structure larger than it: a batch of its own)."""
    batch_size: int = 8
    """Structures per global batch, split across ranks (a cap when max_atoms is also set). JMP's
    batch sizes (and the presets', which copy them) are per GPU: on W GPUs, W x batch_size
    trains as JMP did (below W, ranks train stand-ins for the structures a batch lacks)."""
    temperature: float = 2.0
    """Temperature sampling over tasks, p_i ∝ N_i^(1/T) (JMP: 2; validation uses T=1)."""
    val_batch_size: int = 16
    """Structures per batch for validation and test (consecutive entries, at most max_atoms atoms;
    ranks share the batches)."""
    in_memory: bool = False
    """Load each LMDB into memory at start (small datasets). Forked DataLoader workers share it
    (Linux up to Python 3.13); under forkserver or spawn (3.14's and macOS's default) each worker
    holds a copy."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process), started once and
    kept from epoch to epoch."""

    def __post_init__(self) -> None:
        _check(self, "data", ">= 1", "batch_size", "val_batch_size")
        _check(self, "data", "> 0", "temperature")
        _check(self, "data", ">= 0", "max_atoms", "num_workers")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with layer-wise learning-rate decay (LLRD) and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate, reached after the warmup (JMP: 3e-4 pretraining, 8e-5 fine-tuning in its sweep)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2) (JMP: 0.9, 0.95)."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay (JMP: 0.1)."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm (JMP pretraining: 1.0; 0 = off)."""
    grad_clip_value: float = 0.0
    """Clip each gradient element to [-v, v] (JMP fine-tuning: 1.0; 0 = off)."""
    llrd_embedding: float = 1.0
    """Layer-wise LR multiplier of the atom embedding (JMP fine-tuning: 0.3)."""
    llrd_blocks: list[float] = field(default_factory=list)
    """Multiplier of each blocks_i ([] = all 1.0). JMP-L: 0.55 0.40 0.30 0.40 0.55 0.625;
    JMP-S: 0.30 0.40 0.55 0.625. Bases, final MLPs and heads stay at the full lr."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _check(self, "optim", "> 0", "lr")
        _check(self, "optim", ">= 0", "weight_decay", "grad_clip_norm", "grad_clip_value")
        if any(m <= 0 for m in [self.llrd_embedding, *self.llrd_blocks]):
            raise ConfigError("optim.llrd_* multipliers must be > 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Linear warmup -> cosine decay -> (optionally) reduce-on-plateau, per optimizer step."""

    unit: Literal["steps", "epochs"] = "steps"
    """Unit of warmup and cosine (an epoch: the sampler's global batches that give every rank a
    structure)."""
    warmup: float = 0.0
    """Length of the linear warmup from warmup_start_factor * lr to lr, in `unit`s."""
    warmup_start_factor: float = 0.2
    """lr factor at step 0 (JMP: 0.2 pretraining, 0.1 fine-tuning)."""
    cosine: float = 0.0
    """Length of the cosine decay after warmup (0 = until the end of the run)."""
    min_lr_factor: float = 0.1
    """Cosine ends at min_lr_factor * lr (per LLRD group: divided by the multiplier, clamped to
    [0.01, 0.99], as JMP does)."""
    plateau_patience: int = 0
    """After the cosine, multiply the lr by plateau_factor when the validation metric has not
    improved for this many validations (0 = off; JMP fine-tuning: 3, rMD17: 10)."""
    plateau_factor: float = 0.8
    """lr multiplier of each reduce-on-plateau step (JMP: 0.8)."""

    def __post_init__(self) -> None:
        _check(self, "schedule", ">= 0", "warmup", "cosine", "plateau_patience")
        _check(self, "schedule", "in (0, 1]", "warmup_start_factor", "min_lr_factor")
        _check(self, "schedule", "in (0, 1)", "plateau_factor")


@dataclass(kw_only=True)
class LoopConfig:
    """Length of the run, validation, checkpoints, logging, precision and compilation."""

    max_steps: int = 1000
    """Optimizer steps (the run stops earlier on max_epochs, early stopping or min_lr; 0 = no cap)."""
    max_epochs: float = 0.0
    """Epochs (the sampler's global batches that give every rank a structure; 0 = no cap). One of
    max_steps / max_epochs must be set."""
    val_every: int = 200
    """Validate every this many steps (0 = once per epoch) and at the end."""
    log_every: int = 10
    """Write the training loss, its terms, each task's loss and the gradient norm (their means over
    these steps) and the lr to metrics.csv and TensorBoard every this many steps, and the means of
    the steps after the last such log (without an lr) when the run ends."""
    ckpt_every: int = 200
    """Write last.pt every this many steps (and at the end)."""
    ema_decay: float = 0.0
    """EMA of the weights, updated every step (JMP pretraining: 0.99; 0 = off). Validation and
    the saved weights used for fine-tuning are the EMA ones."""
    early_stop_patience: int = 0
    """Stop after this many validations without improvement (0 = off; JMP: 50)."""
    min_lr: float = 0.0
    """Stop when reduce-on-plateau drives the lr below this (JMP: 1e-8)."""
    max_nan_steps: int = 10
    """Non-finite losses are skipped with a warning; after this many in a row the run stops."""
    precision: Literal["fp32", "fp64", "bf16", "fp16"] = "fp32"
    """bf16/fp16: autocast of the training steps on GPU (fp16 with a gradient scaler, and JMP's
    force scaler for gradient forces); validation, test, eval and predict run in float32, which
    is what best.pt and early stopping see. fp64: everything in float64."""
    fit_scale_factors: int = 4
    """Batches used to fit the backbone's ScaleFactors before training (0 = skip; always skipped
    with model.init_checkpoint and on resume). A factor whose reference does not vary (e.g.
    single-element data) stays 1, with a warning."""
    progress: bool = True
    """tqdm progress bar (rank 0)."""
    compile: bool = False
    """torch.compile the network (dynamic shapes; graphs are still built eagerly). About 1.1-1.3x
    faster CPU steps once compiled (bench/README.md), after about a minute of compilation. Direct forces only:
    compiled graphs cannot be differentiated twice, which gradient forces need."""

    def __post_init__(self) -> None:
        _check(self, "loop", ">= 0", "max_steps", "max_epochs", "val_every", "early_stop_patience", "min_lr",
               "fit_scale_factors")
        if self.max_steps == 0 and self.max_epochs == 0:
            raise ConfigError("loop: set max_steps or max_epochs")
        _check(self, "loop", "in [0, 1)", "ema_decay")
        _check(self, "loop", ">= 1", "log_every", "ckpt_every", "max_nan_steps")


@dataclass(kw_only=True)
class TrainConfig:
    """A whole run: its tasks (datasets and targets) and the sections above. Built from a YAML
    file, a preset and key=value overrides by build_config; saved as run_dir/config.yaml."""

    mode: Literal["pretrain", "finetune"] | None = None
    """pretrain or finetune; required (the config, a mode= override, the preset or the sub-command
    sets it): a default would silently pretrain a fine-tuning config, or refuse to resume it."""
    run_dir: str = "runs/run"
    """Checkpoints (last.pt, best.pt), config.yaml, metrics.csv, TensorBoard logs go here."""
    seed: int = 0
    """Seeds the initial weights, the sampler's order and edge dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu), cpu or cuda."""
    threads: int = 0
    """torch intra-op threads per process (0 = torch's default). 1 is fastest for small models on
    a shared or busy CPU and for several CPU ranks on one machine."""
    resume: bool = False
    """Continue from run_dir/last.pt when it exists (model, EMA, optimizer, schedule, sampler, RNG, step)."""
    overwrite: bool = False
    """Start over in a run_dir that holds another run's checkpoints, deleting that run's files once
    the new run is built (a config error keeps them).
    Without it (or resume), such a run_dir is an error: a new run never silently replaces an old one."""
    tasks: list[TaskConfig] = field(default_factory=list)
    graph: GraphSettings = field(default_factory=GraphSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        _check(self, "", ">= 0", "threads", "seed")
        if not self.run_dir:  # (it would write the run's files into the current directory)
            raise ConfigError("run_dir is empty: give the run's own directory (run_dir=runs/NAME)")
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed: a config file, preset=NAME or tasks=[...] "
                              "gives them (the demo with overrides: python -m jmp_ext.train demo key=value ...)")
        if self.mode is None:
            raise ConfigError("mode: not set: write mode: finetune (or pretrain) in the config, or run "
                              "python -m jmp_ext.train finetune CONFIG.yaml (or pretrain)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: duplicate task names {names}")
        for task in self.tasks:  # (a task list of one's own kept JMP's pretraining loss only if it said so)
            if task.structure_wise_force_loss is None:
                task.structure_wise_force_loss = self.mode == "pretrain"
        if len({t.structure_wise_force_loss for t in self.tasks}) > 1:
            raise ConfigError("tasks: structure_wise_force_loss must be the same for every task (the force loss "
                              "of a mixed batch is averaged one way)")
        if self.mode == "finetune" and len(self.tasks) != 1:
            raise ConfigError(f"tasks: fine-tuning takes exactly one task, got {len(self.tasks)}")
        if self.loop.compile and any(t.gradient_forces for t in self.tasks):
            raise ConfigError("loop.compile needs direct forces: torch.compile cannot differentiate the "
                              "network twice, which gradient forces (task forces=gradient) need")


def expand_path(path: str, key: str) -> str:
    """`path` with its environment variables ($NAME, ${NAME}) and a leading ~ expanded; an unset
    variable is a ConfigError naming `key` (a path through a literal "$SCRATCH" never exists)."""
    unset = [m.group(0) for m in re.finditer(r"\$(\w+|\{([^}]*)\})", path)
             if (m.group(2) if m.group(2) is not None else m.group(1)) not in os.environ]
    if unset:
        raise ConfigError(f"{key}: {path!r} names the environment variable {unset[0]}, which is not set")
    return os.path.expanduser(os.path.expandvars(path))


# ---------------------------------------------------------------- dict <-> dataclass


def from_dict(cls: type, values: Any, key: str = "") -> Any:
    """Builds dataclass `cls` from plain dicts/lists (or what _load_yaml read), checking every key and type."""
    return _convert(cls, values, key)


def _convert(tp: Any, value: Any, key: str) -> Any:
    where = key or "<config>"
    origin = typing.get_origin(tp)
    if isinstance(value, _Scalar) and tp is not str and origin not in (typing.Union, types.UnionType):
        value = value.value  # only a str field takes the text (see _Loader)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields), key=str)
        if unknown:
            raise ConfigError(f"{_join(key, unknown[0])}: unknown key (known: {', '.join(fields)})")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], _join(key, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{_join(key, name)}: required key is missing")
        return tp(**kwargs)  # __post_init__ checks raise ConfigErrors that name their keys
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {k: _convert(item, v, _join(key, str(k))) for k, v in value.items()}
    if tp is Any:
        return _plain(value)
    if tp is float:
        # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string; accept what float() reads exactly.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            # (YAML reads {H:-13.6} as the key 'H:-13.6' with no value: a flow mapping needs ': ')
            hint = (" (in YAML a mapping needs a space after the colon: {H: -13.6})"
                    if value is None and ":" in key else "")
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}{hint}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got str {value!r}") from None
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):  # nan or inf (.nan, .inf, 'nan') would only fail mid-run
            raise ConfigError(f"{where}: expected a finite number, got {number}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is str and isinstance(value, _Scalar):
        return value.text
    if tp is str and not isinstance(value, bool) and isinstance(value, (int, float, datetime.date)):
        return str(value)  # a mapping read by plain yaml.safe_load (not _load_yaml): 2024 for a name
    if tp in (str, bool):
        if not isinstance(value, tp):
            hint = f" (for none, give an empty value: {where}=)" if tp is str and value is None else ""
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}{hint}")
        return value
    raise TypeError(f"config type {tp} of {where} is not supported")  # a bug in this file


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _plain(value: Any) -> Any:
    """A deep copy of value with every _Scalar replaced by its value (for fields typed Any)."""
    if isinstance(value, _Scalar):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def to_dict(config: Any) -> dict:
    """A config dataclass as nested dicts and lists of plain values (YAML- and weights_only-safe)."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------- YAML


class _Scalar(NamedTuple):
    """A YAML number or date and the text it was written as (see _Loader)."""

    text: str
    value: Any

    def __repr__(self) -> str:  # in messages, as the user wrote it
        return self.text


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps the text of numbers and dates: YAML 1.1 reads `010` as 8, `1.10` as
    1.1, `12:30` as 750 and `2024-01-05` as a date, which would silently change a name or path
    (run_dir: 010). Numbers and dates load as _Scalar(text, value); _convert gives a str field the
    text, any other field the value. Integers with leading zeros are decimal, as YAML 1.2 and the
    user read them (017 is 17, not octal 15; 08 is 8, not a string). Mapping keys are names and
    keep their text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, int] = {}
        for key, _ in node.value:  # (YAML keeps the last silently: `mode: pretrain` ... `mode: finetune`)
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise ConfigError(f"key {key.value!r} given twice in one mapping (lines {seen[key.value]} and "
                                      f"{key.start_mark.line + 1})")
                seen[key.value] = key.start_mark.line + 1
        mapping = super().construct_mapping(node, deep=deep)
        return {k.text if isinstance(k, _Scalar) else k: v for k, v in mapping.items()}


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    digits = node.value.replace("_", "")
    return int(digits) if re.fullmatch(r"[-+]?[0-9]+", digits) else loader.construct_yaml_int(node)


def _keep_text(construct: Any) -> Any:
    return lambda loader, node: _Scalar(node.value, construct(loader, node))


_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))
_Loader.add_constructor("tag:yaml.org,2002:int", _keep_text(_decimal_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _keep_text(yaml.SafeLoader.construct_yaml_float))
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _keep_text(yaml.SafeLoader.construct_yaml_timestamp))


# Values a config may expand to: YAML aliases share a node, which the config then copies, so ten
# nested aliases of ten (~400 bytes: a "billion laughs") would expand to 10^10 values.
_MAX_CONFIG_VALUES = 1_000_000


def _load_yaml(source: Any, where: str) -> Any:
    """YAML text or an open file -> Python values (with _Scalars); malformed YAML, or aliases that
    expand to more than _MAX_CONFIG_VALUES values or refer to themselves, is a ConfigError."""
    try:
        value = yaml.load(source, Loader=_Loader)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{where}: invalid YAML: {str(e)[:500]}") from None
    except ConfigError as e:  # (_Loader's own: a key given twice)
        raise ConfigError(f"{where}: {e}") from None
    sizes: dict[int, int] = {}  # expanded size of every list and mapping, counted once each

    def expanded(node: Any, parents: frozenset) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in parents:
            raise ConfigError(f"{where}: a YAML alias refers to the node that holds it")
        if id(node) not in sizes:
            children = node.values() if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(expanded(child, parents | {id(node)}) for child in children)
        if sizes[id(node)] > _MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: its YAML aliases expand to more than {_MAX_CONFIG_VALUES} values")
        return sizes[id(node)]

    try:
        expanded(value, frozenset())
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    return value


# ---------------------------------------------------------------- overrides and files


def apply_override(raw: dict, override: str) -> None:
    """Applies one `a.b.0.c=value` override in place; the value is parsed as YAML (1e-4, true, [1, 2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.path=value (python -m jmp_ext.train "
                          "takes the sub-commands demo, pretrain, finetune, eval, predict and config files "
                          "ending in .yaml)")
    path, text = override.split("=", 1)
    path = path.strip()
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key in {path!r}")
    value = _load_yaml(text, f"override {override!r}") if text.strip() else ""
    node: Any = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])  # node's key (node is raw itself only for i = 0)
        key: str | int = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{path}: {where} has {len(node)} item(s), {part!r} is not an index of it; "
                                  f"to change its length, set the whole list: {where}=[...]")
            key = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{path}: {where} is a {type(_plain(node)).__name__}, it has no key {part!r}")
        if i == len(parts) - 1:
            node[key] = value
            return
        if isinstance(node, dict) and node.get(key) is None:
            known = _fields_at(parts[:i])
            if known is not None and part not in known:  # (else the advice below leads to this error)
                raise ConfigError(f"{_join(where, part)}: unknown key (known: {', '.join(known)})")
            if parts[i + 1].isdigit():  # an item of a list the config does not write
                raise ConfigError(f"{path}: {_join(where, part)} is not set in the config (it keeps its "
                                  f"default), so it has no item {parts[i + 1]}; set the whole list: "
                                  f"{_join(where, part)}=[...]")
            node[key] = {}
        node = node[key]


def _fields_at(parts: list[str]) -> list[str] | None:
    """The field names of the config dataclass at a key path (list items by index), or None
    where the path leads to no dataclass (a mapping such as backbone_overrides, or no field)."""
    def without_none(tp: Any) -> Any:  # (Optional[X]: X)
        while typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return tp

    tp: Any = TrainConfig
    for part in parts:
        tp = without_none(tp)
        if typing.get_origin(tp) is list and part.isdigit():
            (tp,) = typing.get_args(tp)
        elif dataclasses.is_dataclass(tp) and part in typing.get_type_hints(tp):
            tp = typing.get_type_hints(tp)[part]
        else:
            return None
    tp = without_none(tp)
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else None


def deep_merge(base: dict, update: dict) -> dict:
    """update over base; mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_config(raw: dict, overrides: list[str] = (), mode: str | None = None) -> TrainConfig:
    """raw (a parsed YAML mapping, may name a `preset`) + overrides -> validated TrainConfig.
    mode: the command line's sub-command (pretrain / finetune); a config (its preset, file or
    overrides) that states the other mode is an error rather than silently overruled."""
    from jmp_ext.train.presets import PRESETS

    raw = copy.deepcopy(raw)
    # The preset is the base the file and the other overrides change, so it is resolved first.
    rest = []
    for o in overrides:
        if o.split("=", 1)[0].strip() == "preset":
            apply_override(raw, o)
        else:
            rest.append(o)
    preset = raw.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        raw = deep_merge(PRESETS[preset](), raw)
    for o in rest:
        apply_override(raw, o)
    if mode is not None:
        stated = _plain(raw.get("mode", mode))
        if stated != mode:
            raise ConfigError(f"mode: the sub-command {mode} contradicts mode {stated} of the config (its file, "
                              "preset or a mode= override): drop one of them")
        raw["mode"] = mode
    config = from_dict(TrainConfig, raw)
    # A YAML file is read by no shell: `train: $SCRATCH/oc20/train` and `~/data` are expanded
    # here, as a command line's would be (not in a stored config, from_dict's: its paths were
    # expanded when it was written, and it is read for other reasons than its paths).
    config.run_dir = expand_path(config.run_dir, "run_dir")
    config.model.init_checkpoint = expand_path(config.model.init_checkpoint, "model.init_checkpoint")
    for i, task in enumerate(config.tasks):
        for split in ("train", "val", "test"):
            setattr(task, split, expand_path(getattr(task, split), f"tasks.{i}.{split}"))
    for task in config.tasks:
        # (a user's energy-only model trained with it, and its calculator had no forces; refused for
        # new runs only: the checkpoints of such runs still load)
        if task.forces == "gradient" and not task.gradient_forces:
            raise ConfigError(f"task {task.name!r}: forces: gradient differentiates the energy for a forces or "
                              "stress target, and this task has none, so its model would predict no forces; add a "
                              "forces target (the data needs force labels), or leave forces at direct")
        # (options these targets ignore; earlier runs' stored configs may hold them, and load)
        for target in task.targets:
            if target.kind in ("forces", "stress") and target.reduction != "sum":
                raise ConfigError(f"target {target.name!r}: reduction pools a head's per-atom outputs (energy, scalar "
                                  f"and classification targets); {target.kind} have none to set")
            if not target.normalize and (target.kind == "stress" or target.kind == "forces" and task.gradient_forces):
                what = "gradient forces are" if target.kind == "forces" else "a stress is"
                raise ConfigError(f"target {target.name!r}: {what} the energy's derivative, scaled by the energy's "
                                  "std; normalize: false does not apply")
    return config


def load_config(path: str | Path | None, overrides: list[str] = (), mode: str | None = None) -> TrainConfig:
    """The validated TrainConfig of a YAML file (None: none) with `key=value` overrides applied
    (see build_config); a ConfigError names what is wrong."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a YAML config (not UTF-8 text); a checkpoint is evaluated with "
                              f"`python -m jmp_ext.train eval CHECKPOINT DATA`") from None
        raw = _load_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping")
    return build_config(raw, overrides, mode)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML, atomically; load_config(path) gives it back."""
    from jmp_ext.files import write_bytes_atomic

    text = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)  # (eV/Å, not "eV/\xC5")
    write_bytes_atomic(Path(path), text.encode())
