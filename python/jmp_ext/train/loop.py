"""The training loop, written out: build -> (resume) -> fit scale factors -> steps -> validate ->
checkpoint -> test. `Trainer(config).train()` runs a whole pretraining or fine-tuning job.

One step: the sampler's global batch -> this rank's atom-balanced share -> graphs + network ->
loss summed over the share and divided by the global structure/atom counts (so any number of
ranks computes the one-process mean) -> non-finite check across ranks -> backward (DDP averages
gradients) -> clipping -> AdamW -> EMA -> lr of the next step.

Under torchrun every decision (skip a step, stop, save) is taken from all-reduced values, so
identically on every rank, and an exception one rank meets alone (a file, a batch) makes every
rank raise with its message (distributed.together) instead of leaving the others in a collective.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import reprlib
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from ase.data import atomic_numbers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jmp_ext.cpu import keep_freed_memory
from jmp_ext.data.dataset import MultiDataset
from jmp_ext.data.samplers import AtomBalancedBatchSampler, TemperatureSampler
from jmp_ext.files import write_bytes_atomic
from jmp_ext.models.checkpoint import checked_weights
from jmp_ext.train import distributed, tasks
from jmp_ext.train.batches import TrainingLoader, entries_named, entries_of, load_batches, name_entries, to_device
from jmp_ext.train.checkpoint import load_checkpoint, resume_state_problem, rng_state, save_checkpoint, set_rng_state
from jmp_ext.train.config import ConfigError, TrainConfig, TrainError, from_dict, save_config, to_dict
from jmp_ext.train.ema import EMA
from jmp_ext.train.inference import evaluate, key_mismatch
from jmp_ext.train.init_checkpoint import init_from_checkpoint
from jmp_ext.train.logger import RunLogger
from jmp_ext.train.optim import LRSchedule, build_optimizer
from jmp_ext.train.run_dir import RUN_FILES, lock_run_dir, unlock_run_dir
from jmp_ext.train.sampling import is_stand_in, split_across_ranks
from jmp_ext.warn import warn_user

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# Ctrl-C, and the SIGTERM of a scheduler's time limit (SLURM), `timeout` or `docker stop`: the
# first one ends the run after the current step with last.pt saved (Trainer._stop_signals_set_a_flag).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def every_rank_sees(path: Path) -> bool:
    """Whether `path` is a file, the same answer on every rank (a collective): a file some ranks
    see and others do not is a TrainError, since they would go on with different states."""
    seen = distributed.all_gather_object(path.is_file())
    if len(set(seen)) > 1:
        raise TrainError(f"ranks {[r for r, saw in enumerate(seen) if saw]} of {len(seen)} see {path}, the "
                         "others do not: run_dir must be on a filesystem every rank sees")
    return seen[0]


def resume_position(batches: list[list[int]], trained: int, saved_world_size: int) -> int:
    """batch_in_epoch of a run resuming from a last.pt of an older jmp_ext, whose run on
    `saved_world_size` ranks had trained `trained` batches of the epoch's global `batches`: it
    left out the batches of fewer structures than ranks and did not count them, and every
    batch now counts (Trainer._epoch_batches). Resume after the last batch it trained."""
    if saved_world_size == 1:
        return trained
    kept = [k for k, b in enumerate(batches) if len(b) >= saved_world_size]
    return kept[min(trained, len(kept)) - 1] + 1 if trained > 0 and kept else 0


def keep_grad_layout(model: nn.Module) -> None:
    """Gives gradients the strides of their parameters where they differ only on dimensions of
    size 1 (a view: the memory layout is the same), before DDP copies them into its buckets.

    AccumulateGrad keeps such a gradient as it is (it ignores the strides of size-1 dimensions),
    DDP's reducer compares strides strictly and warns "Grad strides do not match bucket view
    strides". With gradient forces the energy head's last weight [1, F] gets one: the sum of the
    gradients of the energy loss and of the force loss (through the double backward), each
    [1, F] with strides (F, 1), comes out with strides (1, 1)."""
    for p in model.parameters():
        if p.requires_grad and 1 in p.shape:
            p.register_hook(functools.partial(_with_strides, stride=p.stride()))


def _with_strides(grad: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    if grad.layout != torch.strided or grad.stride() == stride:
        return grad
    if all(a == b for a, b, n in zip(grad.stride(), stride, grad.shape) if n != 1):
        return grad.as_strided(grad.shape, stride, grad.storage_offset())
    return grad


def freeze(net: nn.Module, embedding: bool, blocks: list[int]) -> None:
    """Freezes the embedding and blocks_i (int_blocks.i and out_blocks.i+1; out_blocks.0 with block 0)."""
    if embedding:
        net.embedding.requires_grad_(False)
    n = net.backbone.config.num_blocks
    for i in blocks:
        if not 0 <= i < n:
            raise TrainError(f"model.freeze_blocks: block {i} does not exist (the backbone has {n})")
        net.backbone.int_blocks[i].requires_grad_(False)
        net.backbone.out_blocks[i + 1].requires_grad_(False)
        if i == 0:
            net.backbone.out_blocks[0].requires_grad_(False)


def _as_read_now(saved: dict, now: dict) -> dict:
    """A last.pt's config as this version reads it: a field added since it was written takes its
    default, as in its config.yaml loaded now, and a target without a unit (a run from before
    units were recorded) takes this run's; a recorded one must match, as the rest of the tasks.
    A ConfigError where this version cannot read it."""
    saved = to_dict(from_dict(TrainConfig, saved))
    for old_task, task in zip(saved["tasks"], now["tasks"]):
        for old, new in zip(old_task["targets"], task["targets"]):
            if old["unit"] is None:
                old["unit"] = new["unit"]
    return saved


def _first_difference(old, new, key: str) -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first value in which two plain configs differ;
    None where none does."""
    if isinstance(old, dict) and isinstance(new, dict):
        names = [*old, *(name for name in new if name not in old)]
        found = (_first_difference(old.get(n), new.get(n), f"{key}.{n}") for n in names)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = (_first_difference(a, b, f"{key}.{i}") for i, (a, b) in enumerate(zip(old, new)))
    else:
        return None if old == new else (key, old, new)
    return next(filter(None, found), None)


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time in ns) of `path`, None where there is no file: a file
    rewritten atomically (files.write_atomic) gets a new inode."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Trainer:
    def __init__(self, config: TrainConfig):
        # (a copy: opening the data fills in the targets' units, which must not stay in the
        # caller's config for a run on other data)
        self.config = c = copy.deepcopy(config)
        if c.threads > 0:
            torch.set_num_threads(c.threads)
        self.dist = distributed.setup(c.device)
        self.device = self.dist.device
        if self.device.type == "cpu":
            keep_freed_memory()  # (about 2x faster steps: see jmp_ext.cpu)
        self.main = self.dist.rank == 0
        self.run_dir = Path(c.run_dir)
        resumed = c.resume and every_rank_sees(self.run_dir / "last.pt")
        if c.resume and not resumed and self.main:  # (a mistyped run_dir would otherwise start over without a word)
            warn_user(f"resume=true, but there is no {self.run_dir / 'last.pt'}: starting a new run")
        # Everything up to DDP is this rank's own work: a rank that fails here (a dataset or
        # checkpoint it cannot read) makes every rank fail with its message, none waits for it.
        with distributed.together():
            # (not "File exists" or "Not a directory" after loading the data; rank 0 writes there)
            existing = next(p for p in (self.run_dir, *self.run_dir.parents) if p.exists())
            if self.main and not existing.is_dir():
                where = "" if existing == self.run_dir else f" ({existing} is one)"
                raise TrainError(f"run_dir {self.run_dir} is a file, not a directory{where}: choose another run_dir")
            if self.main and (self.run_dir / ".lock").is_file():  # (in use: say so before loading anything)
                unlock_run_dir(lock_run_dir(self.run_dir))
            if self.main:
                self._check_run_files()
            if not resumed:
                self._check_run_dir()
            # (the lock comes once everything is built: a run may start or end there meanwhile)
            self._last_pt_found = _file_identity(self.run_dir / "last.pt") if self.main else None
            self.dtype = tasks.param_dtype(c.loop.precision)
            self.autocast = AUTOCAST.get(c.loop.precision) if self.device.type == "cuda" else None
            if c.loop.precision in AUTOCAST and self.device.type != "cuda":
                warn_user(f"loop.precision={c.loop.precision} autocasts on GPUs only: this run trains in fp32 on the "
                          f"CPU (its config.yaml keeps {c.loop.precision}, which a resume on a GPU uses)")

            self.data = tasks.load_task_data(c)
            torch.manual_seed(c.seed)  # the same initial weights on every rank
            # (given references cost a pass over the training split: a resumed run has them in last.pt)
            stats = [d.stats if resumed else tasks.with_given_references(i, d) for i, d in enumerate(self.data)]
            buffers = {**tasks.normalizers(c.tasks, stats), **tasks.training_elements(stats)}
            self.model = tasks.build_model(c, buffers).to(self.device)
            self.model.net.to(self.dtype)
            # The tasks whose heads init_checkpoint gave (model.init_heads). A resumed run takes its
            # weights from last.pt: the init checkpoint need not exist any more.
            self.initialised_heads = (init_from_checkpoint(self.model, c) if c.model.init_checkpoint and not resumed
                                      else [])
            freeze(self.model.net, c.model.freeze_embedding, c.model.freeze_blocks)
            self.model_parameters = list(self.model.parameters())  # (loading weights copies into them)
            self.optimizer = build_optimizer(self.model.net, c.optim, tasks.num_blocks(self.model.net))
            self.ema = EMA(self.model, c.loop.ema_decay) if c.loop.ema_decay > 0 else None
            self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast is torch.float16 else None
            # Gradient forces' scale of the energy under fp16 (FinetuneModel.force_scaler): it adapts over
            # thousands of steps, so a resumed run continues from it, as from the GradScaler's.
            self.force_scaler = getattr(self.model.net, "force_scaler", None)

            # Global batches, the same for any number of ranks; each rank trains on its share.
            self.train_set = MultiDataset([d.train for d in self.data])
            order = TemperatureSampler(self.train_set.sizes, temperature=c.data.temperature, seed=c.seed)
            starved = [f"{task.name} ({n} structures)" for task, n, k in zip(c.tasks, order.sizes, order.counts) if k == 0]
            if starved:  # (T < 1 shrinks the small datasets' shares, to none at all)
                raise TrainError(f"data.temperature={c.data.temperature:g} draws no structure of {', '.join(starved)} "
                                 f"in an epoch of {len(order)}: its heads would never train; raise data.temperature "
                                 "(JMP: 2; 1 draws each dataset in proportion to its size)")
            self.sampler = AtomBalancedBatchSampler(self.train_set.natoms, max_atoms=c.data.max_atoms or None,
                                                    max_structures=c.data.batch_size, sampler=order, seed=c.seed)
            self.steps_per_epoch = len(self.sampler.batches(0))
            caps = {"max_steps": c.loop.max_steps} if c.loop.max_steps > 0 else {}
            if c.loop.max_epochs > 0:
                caps["max_epochs"] = math.ceil(c.loop.max_epochs * self.steps_per_epoch)
            self.limit = min(caps, key=caps.get)  # the cap that ends the run
            self.total_steps = caps[self.limit]
            to_steps = self.steps_per_epoch if c.schedule.unit == "epochs" else 1
            warmup = round(c.schedule.warmup * to_steps)
            cosine = round(c.schedule.cosine * to_steps) if c.schedule.cosine > 0 else self.total_steps - warmup
            self.schedule = LRSchedule(self.optimizer, c.schedule, c.optim.lr, warmup, cosine)

            self.step = self.epoch = self.batch_in_epoch = 0
            self.best = math.inf
            self.bad_validations = 0
            self.validated_step = -1  # the step of the last validation
            self.nan_streak = 0
            self._window, self._window_steps = None, 0  # the training figures since the last log
            self._window_kinds: list[str] = []  # the kind of each loss term in the window's rows
            self.last_metrics: dict[str, float] = {}
            self.stop_signal = self.stop_requested = False  # a stop signal on this rank / on any rank
            if resumed:
                try:
                    self._load_resume_state(self.run_dir / "last.pt")
                except KeyError as e:  # (a last.pt of another jmp_ext version, or edited)
                    raise self._foreign_last_pt(f"has no {e.args[0]!r}") from e
            else:  # each rank its own stream (edge dropout)
                torch.manual_seed(c.seed + 1000 * self.dist.rank + 1)
        self.resumed, self.resumed_at_step = resumed, self.step

        self.run_lock = None  # rank 0's lock on run_dir, from before it writes there to the end of train()
        self.log: RunLogger | None = None  # metrics.csv, TensorBoard's writer (a thread) and the progress bar
        self.loader = TrainingLoader(self.train_set, self.dtype, c.data.num_workers)
        self.batch_iterator = None  # train(): the current epoch's, from self.loader
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.dist.world_size > 1 else self.model)
        if self.dist.world_size > 1:
            keep_grad_layout(self.model)
        with distributed.together():  # (the others would otherwise start training without rank 0)
            if self.main:
                # Only now, with the data, network and schedule built on every rank: a config
                # error must not cost the old run that overwrite=true would replace.
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.run_lock = lock_run_dir(self.run_dir)
            try:
                if self.main:
                    if _file_identity(self.run_dir / "last.pt") != self._last_pt_found:
                        raise TrainError(f"run_dir {self.run_dir} changed while this run was starting: another run "
                                         "wrote its last.pt meanwhile, and this one would overwrite it (or resume "
                                         "from an older one); start it again (resume=true continues that run)")
                    if not resumed and c.overwrite:
                        self._delete_old_run()
                    # Temp files of a run killed while writing (files.write_atomic), up to a
                    # checkpoint's size each: only this run writes here.
                    for name in RUN_FILES:
                        for stale in self.run_dir.glob(f".{name}.*.tmp"):
                            if stale.is_file():
                                stale.unlink()
                    save_config(c, self.run_dir / "config.yaml")
                self.log = RunLogger(self.run_dir, self.main, self.step, self.total_steps, c.loop.progress)
            except BaseException:  # (the lock goes with the Trainer that failed to be built)
                self.release_run_dir()
                raise
        self._log_startup()

    def _log_startup(self) -> None:
        """What the run starts from and how it samples, in the log; warnings about the setup."""
        c, resumed = self.config, self.resumed
        w, batches = self.dist.world_size, self.sampler.batches(0)
        small = sum(len(b) < w for b in batches)
        # (each gives a rank a stand-in, its step's work wasted; an epoch's last batch may be small)
        if self.main and small > max(1, len(batches) // 10):
            warn_user(f"{small} of the {len(batches)} global batches of epoch 0 have fewer structures than the {w} "
                      f"ranks, which then train a stand-in that counts for nothing: raise data.batch_size (global, "
                      f"now {c.data.batch_size}) or data.max_atoms (now {c.data.max_atoms}), or use fewer ranks")
        if resumed:
            self.log.write(f"resumed {self.run_dir / 'last.pt'} at step {self.step} of {self.total_steps} (epoch "
                           f"{self.epoch + 1}, {self.batch_in_epoch} of its {self.steps_per_epoch} batches done)")
        if c.model.init_checkpoint and not resumed:
            kept = self.initialised_heads
            new = [t.name for t in c.tasks if t.name not in kept]
            heads = (f"its heads for {', '.join(kept)}" + (f" and new heads for {', '.join(new)}" if new else "")
                     if kept else "new heads")
            weights = "its EMA weights" if c.model.init_ema else "its raw weights"
            self.log.write(f"initialised the embedding and backbone from {c.model.init_checkpoint} ({weights} where it "
                           f"has them), with {heads}")
        elif c.mode == "finetune" and not resumed:  # (a preset's init_checkpoint is empty until given)
            self.log.write("model.init_checkpoint is empty: fine-tuning a randomly initialised network, without "
                           "pre-training (give a released JMP checkpoint or a pre-training run's last.pt)")
        if len(c.tasks) > 1 and not resumed:
            sampler = self.sampler.sampler
            self.log.write(f"temperature sampling (data.temperature={c.data.temperature:g}), per epoch of "
                           f"{self.steps_per_epoch} steps: " + "; ".join(
                               f"{task.name} {n} structures, p {p:.3f}, {k} drawn"
                               for task, n, p, k in zip(c.tasks, sampler.sizes, sampler.probabilities, sampler.counts)))
        for i, task in enumerate(c.tasks if not resumed else ()):
            for k, target in enumerate(task.targets):
                if target.references is None:
                    continue
                # The shift tasks.with_given_references added: the buffer minus a given reference.
                symbol, value = next(iter(target.references.items()))
                buffer = "norm_linref" if target.kind == "energy" else f"norm_{target.name}_linref"
                shift = float(getattr(self.model, buffer)[i, atomic_numbers[symbol]]) - value
                std, unit = float(self.model.scale(target.name)[i]), f" {target.unit}" if target.unit else ""
                self.log.write(f"tasks.{i}.targets.{k} ({target.name}): the given references plus {shift:+.6g}{unit} "
                               f"per atom (fitted on the training split), residual std {std:.6g}{unit}")
            force_rms = self.data[i].stats.get("force_rms")
            for k, target in enumerate(task.targets):
                # (README, differences from JMP: the weight of gradient forces is JMP's times σ_F/σ_E)
                if target.kind == "forces" and task.gradient_forces and force_rms:
                    energy_std = float(self.model.scale("energy")[i])
                    self.log.write(f"tasks.{i}.targets.{k} ({target.name}): gradient forces, weighted coef / energy "
                                   f"std = {target.coef:g} / {energy_std:.4g} eV; for JMP's weight of this coef, "
                                   f"coef / force RMS ({force_rms:.4g} eV/Å), set coef "
                                   f"{target.coef * energy_std / force_rms:.4g}")
        for i, (task, graph) in enumerate(zip(c.tasks, self.model.graph_configs)):
            for split in ("val", "test"):
                shared = self.main and getattr(task, split) and tasks.shared_entries(self.data[i].train,
                                                                                    getattr(self.data[i], split))
                if shared:
                    warn_user(f"tasks.{i}.{split} {shared}: its metrics, and best.pt chosen by them, measure how well "
                              "the training data are fitted, not new data")
            if not graph.pbc and self.main and bool(self.data[i].train[0]["pbc"].any()):
                warn_user(f"tasks.{i} ({task.name}): its graphs are non-periodic (graph preset "
                          f"{(task.graph or c.graph).preset!r}), but its training data is periodic ({task.train} "
                          "entry 0): periodic boundary conditions are ignored and each structure is seen as an "
                          "isolated cluster; for periodic data choose a periodic graph preset")
        if self.limit == "max_epochs" and c.loop.max_steps > 0:  # (a preset's max_epochs caps a max_steps override)
            self.log.write(f"loop.max_epochs={c.loop.max_epochs:g} ({self.steps_per_epoch} steps each) ends the run at "
                           f"step {self.total_steps}, before loop.max_steps={c.loop.max_steps}; loop.max_epochs=0 "
                           "trains by steps alone")

    # ------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Trains to the end (max_steps / max_epochs, early stopping, a stop signal), then tests;
        returns the summary. run_dir's lock is released however it ends."""
        try:
            return self._train()
        finally:
            self.batch_iterator = None
            self.loader.close()
            self.release_run_dir()

    def release_run_dir(self) -> None:
        """Closes the run's log (metrics.csv, TensorBoard's writer thread) and drops rank 0's lock
        on run_dir: train() does, however it ends; a Trainer that is not trained can."""
        try:
            if self.log is not None:
                self.log.close()
        finally:  # (a failed close, such as a full disk's, must not leave run_dir locked)
            unlock_run_dir(self.run_lock)
            self.run_lock = None

    def _train(self) -> dict:
        c = self.config
        if not self.resumed and c.loop.fit_scale_factors > 0 and not c.model.init_checkpoint:
            with distributed.together():
                self.fit_scale_factors(c.loop.fit_scale_factors)
        if c.loop.compile:
            # After the fit: its passes (one per scale factor, in fitting mode) would each be
            # compiled and never run again. In place: parameter names and state_dict keys stay.
            self.model.net.compile(dynamic=True)
        stop_reason = self.limit
        self.log.start_clock()
        self.batch_iterator = self._epoch_batches()
        # The first Ctrl-C or SIGTERM ends the run after the current step with last.pt saved
        # (every rank learns of it through the step's all-reduce); a second one interrupts at once.
        with self._stop_signals_set_a_flag():
            while self.step < self.total_steps:
                try:
                    batch = to_device(next(self.batch_iterator), self.device)
                except StopIteration:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self.batch_iterator = self._epoch_batches()
                    if c.loop.val_every == 0:
                        stop = self.validate_and_check()
                        if stop:
                            stop_reason = stop
                            break
                    continue
                except Exception as e:  # (an unreadable entry): train_step makes every rank raise
                    batch = e
                global_batch = self.sampler.batches(self.epoch)[self.batch_in_epoch]
                self.train_step(batch, is_stand_in(global_batch, self.dist.rank))
                if self.stop_requested:  # (the step did not run: its batch is the resumed run's first)
                    self.save_last()
                    raise KeyboardInterrupt(f"stopped after step {self.step}, saved in {self.run_dir / 'last.pt'}")
                self.batch_in_epoch += 1
                self.step += 1
                self.schedule.set_step(self.step)
                if c.loop.val_every and self.step % c.loop.val_every == 0 and self.step < self.total_steps:
                    stop = self.validate_and_check()
                    if stop:
                        stop_reason = stop
                        break
                if self.step % c.loop.ckpt_every == 0:
                    self.save_last()
        if self._window_steps:  # (the steps since the last log: loop.log_every need not divide the run)
            self.log.log(self.step, "train", self._window_means())
        if stop_reason == self.limit and self.validated_step != self.step:  # (also on resuming a finished run)
            if self.step % c.loop.ckpt_every:  # (a stop signal or a kill in the validation keeps the steps)
                self.save_last()
            self.validate_and_check()
        self.save_last()
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "stop": stop_reason,
                   "val": self.last_metrics, "best": self.best, **self.log.throughput()}
        if self.resumed:  # (the time and throughput are this process's, from that step on)
            summary["resumed_at_step"] = self.resumed_at_step
        if c.mode == "finetune" and any(d.test is not None for d in self.data):
            summary["test"] = self.test()
        self.log.close()
        if self.main:
            write_bytes_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1).encode())
        return summary

    def train_step(self, batch: dict | Exception, stand_in: bool = False) -> None:
        """One optimizer step on this rank's share `batch`, or the exception loading it raised.
        An exception of one rank (loading, forward, loss) makes every rank raise: its flag rides
        on the step's two all-reduces, which every step does anyway. stand_in: the batch only
        stands in for a share this rank does not have (Trainer._epoch_batches): its loss counts
        zero and its structures none."""
        c = self.config
        if not self.model.training:  # (after a validation; train() walks ~1000 modules, 2 ms a step)
            self.model.train()
        failed = isinstance(batch, Exception)
        local = torch.tensor([0, 0, 1, self.stop_signal] if failed else [0, 0, 0, self.stop_signal] if stand_in else
                             [batch["natoms"].numel(), batch["pos"].shape[0], 0, self.stop_signal], dtype=torch.float64)
        structures, atoms, failures, interrupts = distributed.all_reduce_sum(local).tolist()
        if failures > 0:
            distributed.raise_together(batch if failed else None)
        self.stop_requested = interrupts > 0  # (every rank alike: stop before this step, after the last)
        if self.stop_requested:
            return
        # "sum": cross-entropy summed over the batch, as JMP's (data.batch_size is global here:
        # the sum over every rank's share, as one process's).
        denominators = {"structures": structures, "atoms": atoms, "sum": 1}
        error, finite = None, False
        try:
            with self._autocast():
                preds = self.ddp(batch)
            terms = tasks.loss_terms(self.model, preds, batch)
            weight = 0.0 if stand_in else self.dist.world_size  # (DDP averages the gradients over the ranks)
            parts = {name: s / denominators[kind] * weight for name, (s, kind) in terms.items()}
            loss = sum(parts.values())
            finite = torch.isfinite(loss).item()
        except Exception as e:
            error = name_entries(e, batch, self.train_set)
        failed = error is not None
        non_finite, failures = distributed.all_reduce_sum(
            torch.tensor([float(not finite and not failed), float(failed)])).tolist()
        if failures > 0:
            distributed.raise_together(error)
        if non_finite > 0:
            self._skip_step("loss", batch, stand_in)
            return
        with entries_named(batch, self.train_set):  # (out of memory: said with the batch and what to lower)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        # The norm of the unclipped gradients: logged, and a non-finite one skips the step. Taken
        # before clipping by value (the fine-tuning presets), which would turn inf into a finite
        # value and let the step through.
        params = [p for p in self.model_parameters if p.grad is not None]
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        if torch.isfinite(grad_norm):
            if c.optim.grad_clip_value > 0:
                nn.utils.clip_grad_value_(params, c.optim.grad_clip_value)
            if c.optim.grad_clip_norm > 0:  # (the norm of the value-clipped gradients when both are set)
                total = grad_norm if c.optim.grad_clip_value <= 0 else nn.utils.get_total_norm([p.grad for p in params])
                nn.utils.clip_grads_with_norm_(params, c.optim.grad_clip_norm, total)
        else:  # DDP synchronised the gradients: every rank agrees
            if self.scaler is not None:
                # fp16: unscale_ recorded the overflow, so update() halves the scale. It must run
                # before the next unscale_, which refuses an optimizer it has not been reset for.
                overflowed_at = self.scaler.get_scale()
                self.scaler.update()
                if overflowed_at > 1:  # the scale was too large: the scaler's business, not a bad step
                    self.optimizer.zero_grad(set_to_none=True)
                    # (said, though routine: the step counts, its batch is not learnt from)
                    self.log.write(f"step {self.step + 1}: fp16 gradients overflowed at loss scale {overflowed_at:g}, "
                                   f"step skipped; scale now {self.scaler.get_scale():g}")
                    return
            self._skip_step("gradient norm", batch, stand_in)
            return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.nan_streak = 0
        lr = self.schedule.lr
        self.log.step(int(structures), int(atoms), loss=loss.item(), lr=lr)
        self._add_to_window(parts, grad_norm, preds, batch, stand_in)
        if (self.step + 1) % c.loop.log_every == 0:
            self.log.log(self.step + 1, "train", {"lr": lr, **self._window_means()})

    @torch.no_grad()
    def _add_to_window(self, parts: dict, grad_norm: torch.Tensor, preds: dict, batch: dict, stand_in: bool) -> None:
        """Adds this step's figures to the logging window: the logged training values are means
        over the steps since the last log (one batch is noisy, and a pretraining batch may lack a
        task). Kept on the device, read at the log step only. Per task (pretraining): its terms
        over its own structures / atoms, summed with those counts, [T, terms + 2]."""
        values = torch.stack([*(p.detach().double() for p in parts.values()), grad_norm.detach().double()])
        rows = None
        if len(self.config.tasks) > 1:
            rows = []
            for t in range(len(self.config.tasks)):
                only = (batch["task"] == t) & (not stand_in)
                terms = tasks.loss_terms(self.model, preds, batch, only)
                rows.append(torch.stack([*(s.detach().double() for s, _ in terms.values()),
                                         only.sum().double(), only[batch["batch"]].sum().double()]))
            rows = torch.stack(rows)
            self._window_kinds = [kind for _, kind in terms.values()]
        self._window_names = list(parts)
        if self._window is None:
            self._window = [values, rows]
        else:
            self._window[0] += values
            if rows is not None:
                self._window[1] += rows
        self._window_steps += 1

    def _window_means(self) -> dict[str, float]:
        """The logging window's means over every rank (a collective), and a new window: loss, its
        terms loss_{target}, grad_norm, and per task {task}/loss (a task that no batch of the
        window sampled has none)."""
        values, rows = self._window
        steps, world = self._window_steps, self.dist.world_size
        self._window, self._window_steps = None, 0
        # Each rank's terms are its share's sums over the global counts times the number of
        # ranks, and the gradient norm is every rank's: the sum over ranks is W times the value.
        *terms, grad_norm = (distributed.all_reduce_sum(values) / (world * steps)).tolist()
        out = {"loss": sum(terms), "grad_norm": grad_norm,
               **{f"loss_{name}": term for name, term in zip(self._window_names, terms)}}
        if rows is not None:
            for task, row in zip(self.config.tasks, distributed.all_reduce_sum(rows).tolist()):
                counts = {"structures": row[-2], "atoms": row[-1], "sum": steps}
                if row[-2] > 0:
                    out[f"{task.name}/loss"] = sum(s / counts[kind] for s, kind in zip(row, self._window_kinds))
        return out

    def _skip_step(self, what: str, batch: dict, stand_in: bool) -> None:
        """A step whose loss or gradients are not finite leaves the weights as they are; the log
        names the batch's entries (this rank's share), and max_nan_steps of them in a row stop
        the run with last.pt saved: the weights of before them, to resume with a lower lr."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        self.nan_streak += 1
        # Every rank's share (every rank is here: the flag was all-reduced), for rank 0's log.
        mine = [] if stand_in else entries_of(batch, self.train_set, range(batch["natoms"].numel()))
        by_path = {}
        for path, i in [e for share in distributed.all_gather_object(mine) for e in share]:
            by_path.setdefault(path, []).append(i)
        shown = "; ".join(f"{path} entr{'y' if len(ids) == 1 else 'ies'} {', '.join(map(str, ids[:8]))}"
                          + (f" and {len(ids) - 8} more" if len(ids) > 8 else "") for path, ids in by_path.items())
        self.log.write(f"step {self.step + 1}: non-finite {what} on a batch of {shown or 'no entries'}, step "
                       f"skipped ({self.nan_streak}/{c.loop.max_nan_steps} in a row)")
        if self.nan_streak >= c.loop.max_nan_steps:
            streak, self.nan_streak = self.nan_streak, 0  # (a resume starts a fresh count)
            self.save_last()
            fp32 = ", or train in fp32 (loop.precision)" if self.autocast is not None else ""
            raise TrainError(f"the {what} was not finite for {streak} steps in a row (loop.max_nan_steps); "
                             f"{self.run_dir / 'last.pt'} holds the weights of before them, and resume=true retries "
                             f"from this step's batch: lower optim.lr, check the labels of the entries the log "
                             f"names{fp32}; weights that give a non-finite loss on every batch have diverged "
                             "(best.pt, or a new run, is the way back)")

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _epoch_batches(self):
        """Iterator over this rank's batches of the current epoch, from batch_in_epoch on (resume).
        A rank left without a structure by a global batch of fewer structures than ranks gets the
        batch's smallest structure as a stand-in, whose loss counts zero (train_step's stand_in):
        DDP needs every rank's backward, and the step stays one process's."""
        w, natoms = self.dist.world_size, self.train_set.natoms
        batches = self.sampler.batches(self.epoch)[self.batch_in_epoch:]
        local = [[min(b, key=natoms.__getitem__)] if is_stand_in(b, self.dist.rank) else
                 split_across_ranks(b, natoms, self.dist.rank, w) for b in batches]
        return self.loader.epoch(local)

    # ------------------------------------------------------------ scale factors

    def fit_scale_factors(self, num_batches: int) -> None:
        """Fits the backbone's ScaleFactors on the first training structures of every task, in a
        fixed order independent of the sampler and the number of ranks (every rank fits the same)."""
        from jmp_ext.models import fit_scale_factors

        c = self.config
        # (a pass per factor and batch: tens of seconds for JMP-size runs on a CPU)
        self.log.write(f"fitting the scale factors on {num_batches} batches (loop.fit_scale_factors) ...")
        per_task = max(c.data.batch_size // len(self.data), 1)
        offsets = np.cumsum([0, *self.train_set.sizes[:-1]])
        batches = [[int(o + (k * per_task + j) % n) for o, n in zip(offsets, self.train_set.sizes) for j in range(per_task)]
                   for k in range(num_batches)]
        loaded = [to_device(b, self.device) for b in load_batches(self.train_set, batches, self.dtype)]
        # Each factor is fitted with its own passes over the batches: build their graphs once.
        self.model.eval()
        inputs = []
        for b in loaded:
            with entries_named(b, self.train_set):  # (the first structures of every task: often met here)
                inputs.append((b, self.model.graphs(b)))
        with torch.no_grad():
            fitted = fit_scale_factors(self.model.net, inputs)
        self.log.write(f"fitted {len(fitted)} scale factors on {num_batches} batches")

    # ------------------------------------------------------------ validation, test

    @property
    def val_max_atoms(self) -> int | None:
        """Atoms per validation or test batch: data.max_atoms caps a global training batch, of
        which each rank trains a share, and each rank validates whole batches."""
        return -(-self.config.data.max_atoms // self.dist.world_size) if self.config.data.max_atoms else None

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current weights (the EMA ones when there is an EMA) on every task's split."""
        ctx = self.ema.swap() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            return evaluate(self.model, [getattr(d, split) for d in self.data], self.config.data.val_batch_size,
                            self.dtype, self.device, self.dist.rank, self.dist.world_size, self.val_max_atoms)

    def validate_and_check(self) -> str | None:
        """Validates (if there are val splits), updates plateau / best / early stopping.
        Returns why the run should stop ("early stopping", "min lr"), or None."""
        c = self.config
        if not any(d.val is not None for d in self.data):
            return None
        with self.log.paused():
            metrics = self.evaluate("val")
        if not metrics:
            return None
        self.last_metrics, self.validated_step = metrics, self.step
        value = tasks.primary_metric(c, metrics)
        self.log.log(self.step, "val", {**metrics, "primary": value})
        self.schedule.on_validation(self.step, value)
        self.schedule.set_step(self.step)
        improved = value < self.best
        sign = tasks.primary_label(c, metrics)[1]
        if improved:
            self.best, self.bad_validations = value, 0
            with self.log.paused():
                self.save_best(metrics)
        else:
            self.bad_validations += 1
        # (after the save: a failed one said "saved best.pt" first)
        self.log.write(f"step {self.step} validation: {tasks.describe_primary(c, metrics, value)}"
                       + (" (the best yet: saved best.pt)" if improved else f" (the best was {sign * self.best:.4g})"))
        if c.loop.early_stop_patience and self.bad_validations >= c.loop.early_stop_patience:
            self.log.write(f"early stopping: no improvement in {self.bad_validations} validations")
            return "early stopping"
        if c.loop.min_lr and self.schedule.lr < c.loop.min_lr:
            self.log.write(f"stopping: lr {self.schedule.lr:.3g} < loop.min_lr {c.loop.min_lr:.3g}")
            return "min lr"
        return None

    def test(self) -> dict[str, float]:
        """Test metrics with the best checkpoint's weights (the final ones without validation)."""
        best = self.run_dir / "best.pt"
        # A collective, so after rank 0 wrote best.pt; every rank must then see it, or the ranks
        # would evaluate different weights.
        if every_rank_sees(best):
            with distributed.together():
                self.model.load_state_dict(load_checkpoint(best, self.device)["model"])
            metrics = evaluate(self.model, [d.test for d in self.data], self.config.data.val_batch_size,
                               self.dtype, self.device, self.dist.rank, self.dist.world_size, self.val_max_atoms)
        else:
            metrics = self.evaluate("test")
        self.log.log(self.step, "test", metrics)
        if self.main:
            write_bytes_atomic(self.run_dir / "test_metrics.json", json.dumps(metrics, indent=1).encode())
        return metrics

    # ------------------------------------------------------------ checkpoints

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights to use for inference and fine-tuning: EMA parameters when there is an EMA."""
        state = self.model.state_dict()
        if self.ema is not None:
            state.update(self.ema.state_dict())
        return state

    def save_best(self, metrics: dict) -> None:
        with distributed.together():  # (rank 0 failing to write must not leave the others waiting)
            if self.main:
                save_checkpoint(self.run_dir / "best.pt", {"model": self.weights(), "config": to_dict(self.config),
                                                           "step": self.step, "metrics": metrics})

    def save_last(self) -> None:
        with self.log.paused():
            rngs = distributed.all_gather_object(rng_state())
            window = self._window_ranks()
            with distributed.together():
                if self.main:
                    self._write_last(rngs, window)

    def _window_ranks(self) -> dict | None:
        """Every rank's logging window (gathered: a collective), for last.pt: a run resumed
        between two logs then logs the means of an uninterrupted one, bit for bit on as many
        ranks (each rank continues its own sums, which the log step adds in the same order)."""
        mine = None if self._window is None else [None if t is None else t.cpu().clone() for t in self._window]
        ranks = distributed.all_gather_object(mine)
        return None if ranks[0] is None else {"ranks": ranks, "steps": self._window_steps}

    def _write_last(self, rngs: list, window: dict | None) -> None:
        save_checkpoint(self.run_dir / "last.pt", {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "force_scaler": self.force_scaler.state_dict() if self.force_scaler is not None else None,
            "loop": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "counts_every_batch": True, "best": self.best, "bad_validations": self.bad_validations,
                     "nan_streak": self.nan_streak,
                     "validated_step": self.validated_step, "window": window},
            "rng": rngs,
            "config": to_dict(self.config),
            "metrics": self.last_metrics,
        })

    @contextlib.contextmanager
    def _stop_signals_set_a_flag(self):
        """While the block runs, the first SIGINT (Ctrl-C) or SIGTERM sets self.stop_signal
        instead of interrupting; the previous handlers are then back, so a second one interrupts
        at once. Only the main thread can install them."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

        def restore():
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        def handler(signum, frame):
            self.stop_signal = True
            restore()

        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)
        try:
            yield
        finally:
            restore()

    def _check_run_dir(self) -> None:
        """A new run refuses a run_dir with another run's checkpoints unless `overwrite` (or `resume`,
        which keeps a best.pt whose last.pt is gone)."""
        c = self.config
        checkpoints = [p.name for p in (self.run_dir / "last.pt", self.run_dir / "best.pt") if p.is_file()]
        if checkpoints and not (c.overwrite or c.resume):
            raise TrainError(f"run_dir {self.run_dir} already holds a run ({', '.join(checkpoints)}): "
                             "resume=true continues it, overwrite=true starts over (deleting it), "
                             "or choose another run_dir")
        # A run's own files are replaced by the next run there; without the .lock every run leaves,
        # they are someone else's (notes, another tool's metrics.csv), and kept.
        others = [name for name in RUN_FILES if (self.run_dir / name).is_file()]
        if others and not (self.run_dir / ".lock").exists() and not c.overwrite:
            raise TrainError(f"run_dir {self.run_dir} holds {', '.join(others)}, which no jmp_ext run wrote there "
                             "(it has no .lock): choose another run_dir, or overwrite=true to replace them")

    def _check_run_files(self) -> None:
        """Nothing stands where the run writes its files (a new or a resumed run): found when a file
        is written, that was after the training for best.pt and summary.json."""
        blocked = [name for name in RUN_FILES if (self.run_dir / name).is_dir()]
        if os.path.lexists(self.run_dir / "tb") and not (self.run_dir / "tb").is_dir():  # (a dangling link too)
            blocked.append("tb")
        if blocked:
            raise TrainError(f"run_dir {self.run_dir}: the run writes its files ({', '.join(blocked)}) where something "
                             "else is (a directory where a file goes, or a file or broken link where tb/ goes): move "
                             "it, or choose another run_dir")

    def _delete_old_run(self) -> None:
        """overwrite=true: the old run's files go, so that no stale best.pt, summary or TensorBoard
        event outlives it."""
        for name in RUN_FILES:
            (self.run_dir / name).unlink(missing_ok=True)
        tb = self.run_dir / "tb"
        if tb.is_symlink():  # (the link goes, not what it points to)
            tb.unlink()
        shutil.rmtree(tb, ignore_errors=True)

    def _foreign_last_pt(self, problem: str) -> TrainError:
        return TrainError(f"resume: {self.run_dir / 'last.pt'} {problem}: it was written by another version of "
                          "jmp_ext (or edited); start a new run_dir, or fine-tune from it with model.init_checkpoint")

    def _load_resume_state(self, path: Path) -> None:
        # On the CPU: the RNG states must stay CPU ByteTensors, and AdamW keeps its step counts
        # where they are loaded (on a GPU, every step would read them back). load_state_dict
        # copies the rest to the device.
        state = load_checkpoint(path, "cpu")
        problem = resume_state_problem(state)
        if problem is not None:
            raise self._foreign_last_pt(problem)
        now = to_dict(self.config)
        try:
            saved = _as_read_now(state["config"], now)
        except ConfigError as e:
            raise self._foreign_last_pt(f"holds a config this version cannot read ({e})") from None
        # What fixes the network and the order of the batches must not change; how they are
        # loaded (data.num_workers, data.in_memory, data.val_batch_size) may.
        same = ["mode", "tasks", "graph", "model", "seed", "data.max_atoms", "data.batch_size", "data.temperature"]
        for key in same:
            section, _, field_name = key.partition(".")
            old, new = saved[section], now[section]
            if field_name:
                old, new = old[field_name], new[field_name]
            if (differs := _first_difference(old, new, key)) is not None:
                name, old, new = differs
                # (not "resume=false": with the overwrite: true of a demo's config.yaml that deletes the run)
                raise TrainError(f"cannot resume {path}: its config differs in {name!r} ({reprlib.repr(new)} now, "
                                 f"{reprlib.repr(old)} in last.pt), which a resumed run must keep (give the run's "
                                 f"own config, {self.run_dir / 'config.yaml'}; to train anew from its weights, start "
                                 "another run_dir with model.init_checkpoint)")
        try:  # (a file of NaN weights resumed into skipped steps only)
            for weights in (state["model"], state["ema"] or {}):
                checked_weights(weights, path)
        except ValueError as e:
            raise TrainError(f"resume: {e}") from e
        weights = dict(state["model"])
        # train_elements comes from the statistics, which may have been recomputed (or predate
        # it) since the run started: this run's own value stands.
        weights.pop("train_elements", None)
        if hasattr(self.model, "train_elements"):
            weights["train_elements"] = self.model.train_elements
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as e:
            raise TrainError(f"resume: {path} does not fit this run's network; was it written by another "
                             f"version of jmp_ext? ({key_mismatch(e)})") from e
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        # The moments and step counts are the run's; its hyperparameters (betas, weight decay,
        # llrd multipliers) are this config's, as lr (the schedule's) and gradient clipping are.
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyperparameters in zip(self.optimizer.param_groups, configured):
            group.update(hyperparameters)
        changed = [f"{section}.{key} {saved[section].get(key)!r} -> {value!r}" for section in ("optim", "schedule")
                   for key, value in now[section].items() if saved.get(section, {}).get(key, value) != value]
        if changed and self.main:
            warn_user(f"resume: the config changes {', '.join(changed)}; the run continues with the new "
                      "values (its optimizer moments and schedule position kept)")
        self.schedule.load_state_dict(state["schedule"])
        was = state["schedule"]["cosine_steps"]
        if max(was, 0) != max(self.schedule.cosine_steps, 0) and self.main:  # (<= 0: no cosine, either way)
            def length(steps: int) -> str:  # (none when the run ends within the warmup)
                return f"{steps} steps" if steps > 0 else "none"

            step = state["loop"]["step"]
            # (within the warmup the lr does not depend on the cosine yet)
            effect = (f"so the lr jumps at step {step}" if step >= self.schedule.warmup_steps else
                      f"from the end of the warmup (step {self.schedule.warmup_steps})")
            warn_user(f"resume: the cosine after the warmup is now {length(self.schedule.cosine_steps)} instead of "
                      f"{length(was)} (schedule.cosine=0 runs it to the end of the run, which the new "
                      f"loop.max_steps / loop.max_epochs moved), {effect}; set schedule.cosine to keep the "
                      "old one")
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.force_scaler is not None and state["force_scaler"] is not None:
            self.force_scaler.load_state_dict(state["force_scaler"])
        loop = state["loop"]
        self.step, self.epoch = loop["step"], loop["epoch"]
        # (an older jmp_ext's count, without the key; the saved number of ranks: one RNG state per rank)
        self.batch_in_epoch = (loop["batch_in_epoch"] if loop.get("counts_every_batch") else resume_position(
            self.sampler.batches(self.epoch), loop["batch_in_epoch"], len(state["rng"])))
        self.best, self.bad_validations, self.nan_streak = loop["best"], loop["bad_validations"], loop["nan_streak"]
        self.validated_step = loop["validated_step"]
        if loop["window"] is not None:
            ranks = loop["window"]["ranks"]
            if len(ranks) == self.dist.world_size:
                values, rows = ranks[self.dist.rank]
            else:  # the saved ranks' sums on rank 0, zeros on the others
                # (values: terms scaled by the number of ranks, which changed)
                values = sum(r[0] for r in ranks) * (self.dist.world_size / len(ranks))
                rows = None if ranks[0][1] is None else sum(r[1] for r in ranks)
                if self.dist.rank != 0:
                    values, rows = torch.zeros_like(values), None if rows is None else torch.zeros_like(rows)
            self._window = [values.to(self.device), None if rows is None else rows.to(self.device)]
            self._window_steps = loop["window"]["steps"]
        self.last_metrics = state["metrics"]
        rngs = state["rng"]
        if len(rngs) != self.dist.world_size:
            warn_user(f"resuming with {self.dist.world_size} ranks from a run with {len(rngs)}: "
                      "random streams (edge dropout) differ from the original run")
        if self.dist.rank < len(rngs):
            set_rng_state(rngs[self.dist.rank])
        else:  # a rank the saved run did not have: a stream of its own, not a copy of another rank's
            torch.manual_seed(self.config.seed + 1000 * self.dist.rank + 1 + self.step)
        self.schedule.set_step(self.step)


