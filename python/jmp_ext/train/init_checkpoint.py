"""model.init_checkpoint: a new run's embedding and backbone (fine-tuning, or pretraining that
starts from one) from a pretrained checkpoint (a run's best.pt / last.pt, or a released JMP
one), checked against this run's network and graphs; with model.init_heads, its tasks' heads
and normalisation too."""

from __future__ import annotations

from pathlib import Path

from jmp_ext.models.checkpoint import is_training_checkpoint, load_weights, read_state_dict, run_weights, safe_load
from jmp_ext.train.config import ConfigError, TaskConfig, TrainConfig, TrainError, from_dict
from jmp_ext.train.tasks import TaskModel, graph_configs
from jmp_ext.warn import warn_user


def init_from_checkpoint(model: TaskModel, config: TrainConfig) -> list[str]:
    """Loads the embedding + backbone weights of config.model.init_checkpoint (ours, or a released
    JMP one) into `model.net`, and its heads with model.init_heads (see _load_heads); a force
    branch the network does not use is dropped. One of our checkpoints also says what it was
    trained with: a backbone that does not fit is named, and a warning says when this run's
    graphs differ from the checkpoint's. Returns the names of the tasks whose heads it loaded."""
    path = config.model.init_checkpoint
    if Path(path).is_dir():
        raise TrainError(f"model.init_checkpoint: {path} is a directory; give the checkpoint file (a run's "
                         "best.pt or last.pt, or a JMP .ckpt)")
    if not Path(path).is_file():
        released = Path(path).name in ("jmp-s.pt", "jmp-l.pt")  # (JMP's, as the README and presets name them)
        raise TrainError(f"model.init_checkpoint: {path} does not exist" + (
            f"; JMP's release is at https://jmp-iclr-datasets.s3.amazonaws.com/{Path(path).name}" if released else ""))
    try:
        checkpoint = safe_load(path)
    except ValueError as e:
        raise TrainError(f"model.init_checkpoint: {e}") from e
    try:
        weights = read_state_dict(checkpoint, use_ema=config.model.init_ema, order=list(model.net.state_dict()))
    except ValueError as e:
        raise TrainError(f"model.init_checkpoint: {path}: {e}") from e
    trained = None
    if is_training_checkpoint(checkpoint):
        try:
            trained = from_dict(TrainConfig, checkpoint["config"])
        except ConfigError:  # (a config this version no longer reads: nothing to compare with)
            pass
    try:
        load_weights(weights, model.net)
    except ValueError as e:
        # (the error names a backbone preset the weights fit; a run's checkpoint says what it had)
        hint = ("check model.backbone / model.backbone_overrides against the checkpoint's architecture"
                if trained is None else f"the checkpoint was trained with model.backbone={trained.model.backbone}"
                + (f" and model.backbone_overrides={trained.model.backbone_overrides}"
                   if trained.model.backbone_overrides else ""))
        raise TrainError(f"model.init_checkpoint {path} does not fit the configured network ({e}); {hint}") from e
    if trained is not None:
        _warn_if_graphs_differ(path, graph_configs(trained), graph_configs(config))
        if not config.model.init_ema and "ema" not in checkpoint and trained.loop.ema_decay > 0:
            warn_user(f"model.init_ema=false, but {path} (a best.pt) holds only its run's validated weights, which are "
                      "the EMA weights (loop.ema_decay > 0): those are loaded; the raw weights are in the run's "
                      "last.pt")
    if not config.model.init_heads:
        return []
    return _load_heads(model, config, trained, run_weights(checkpoint, config.model.init_ema) if trained else None)


# What a head and its normalisation are built from, and the unit it predicts in; the loss (coef,
# class_weights) may change.
_HEAD_FIELDS = ("name", "kind", "reduction", "num_classes", "normalize", "linref", "references", "unit")


def _load_heads(model: TaskModel, config: TrainConfig, trained: TrainConfig | None, weights: dict | None) -> list[str]:
    """model.init_heads: each task of this run that the checkpoint's run trained under the same
    name takes that task's heads (net.output.*: pretraining's out_energy.t / out_forces.t, or
    fine-tuning's heads and force MLP) and its rows of the normalisation buffers (norm_*), so it
    predicts as the checkpoint did; the elements it was trained on join the run's
    (train_elements). Refused for a checkpoint without its run's config (a released JMP file:
    its heads' normalisation is not in it), of the other mode, or whose task of that name has
    other targets or forces; a run none of whose tasks it trained is refused too (a misspelt
    name would otherwise start every head new)."""
    path = config.model.init_checkpoint
    if trained is None:
        raise TrainError(f"model.init_heads: {path} is not a jmp_ext run's checkpoint, which records the "
                         "normalisation its heads predict in; only its embedding and backbone can be loaded "
                         "(model.init_heads=false)")
    if trained.mode != config.mode:
        raise TrainError(f"model.init_heads: {path} is a {trained.mode} checkpoint and this run a {config.mode}: "
                         "their heads differ (pretraining: an energy and a direct-force head per task; "
                         "fine-tuning: one per target); set model.init_heads=false")
    index = {task.name: j for j, task in enumerate(trained.tasks)}
    if not index.keys() & {task.name for task in config.tasks}:
        raise TrainError(f"model.init_heads: {path} trained the tasks {sorted(index)}, none of this run's "
                         f"{[task.name for task in config.tasks]}; name a task as the checkpoint's to keep its heads")
    state = model.state_dict()
    new, loaded = {}, []
    for i, task in enumerate(config.tasks):
        j = index.get(task.name)
        if j is None:
            continue
        loaded.append(task.name)
        old = trained.tasks[j]
        # (units None: a checkpoint from before units were recorded, which eval does not check either)
        fields = [f for f in _HEAD_FIELDS if f != "unit" or all(t.unit is not None for t in old.targets)]
        differ = _head_differences(old, task, fields)
        if differ:
            raise TrainError(f"model.init_heads: tasks.{i} ({task.name}) has other targets or forces than {path}'s "
                             f"task of that name ({'; '.join(differ)}): keep the checkpoint's, or set "
                             "model.init_heads=false to start the heads new")
        for key, value in state.items():
            per_task = key.startswith("norm_")  # [T, ...]: row i is this task's
            if not (per_task or key.startswith("net.output.")):
                continue
            parts = key.split(".")
            if not per_task and config.mode == "pretrain":  # net.output.out_{energy,forces}.{task}.*
                if parts[3] != str(i):
                    continue
                parts[3] = str(j)
            saved = weights.get(".".join(parts))
            if saved is None or saved.shape[int(per_task):] != value.shape[int(per_task):]:  # (a row's, per task)
                raise TrainError(f"model.init_heads: {path} has no {'.'.join(parts)} of this run's shape (another "
                                 "version of jmp_ext?); set model.init_heads=false")
            if per_task:
                new.setdefault(key, value.clone())[i] = saved[j]
            else:
                new[key] = saved
        if "train_elements" in state and "train_elements" in weights:  # (its heads know the checkpoint's too)
            new.setdefault("train_elements", state["train_elements"].clone())[i] |= weights["train_elements"][j]
    model.load_state_dict({**state, **new})
    return loaded


def _head_differences(old: TaskConfig, new: TaskConfig, fields: list[str]) -> list[str]:
    """What makes `new`'s heads other than `old`'s: 'targets.K.FIELD: theirs -> this run's'."""
    if [t.name for t in old.targets] != [t.name for t in new.targets]:
        return [f"targets {[t.name for t in old.targets]} -> {[t.name for t in new.targets]}"]
    differ = [f"targets.{k}.{f}: {getattr(a, f)!r} -> {getattr(b, f)!r}" for k, (a, b) in
              enumerate(zip(old.targets, new.targets)) for f in fields if getattr(a, f) != getattr(b, f)]
    return differ + ([f"forces: {old.forces} -> {new.forces}"] if old.forces != new.forces else [])


def _warn_if_graphs_differ(path: str, trained: list, ours: list) -> None:
    """The pretrained weights (and the scale factors fitted with them) expect the neighbourhoods
    of their graphs: a fine-tune at other cutoffs or k, or without periodic boundaries, starts far
    from them, silently. (A smaller k for large structures, MatBench's and QMOF's rule as in JMP's
    recipe, is no such change.)"""
    def settings(g) -> str:
        return f"cutoff {g.cutoff_main:g} Å, max_neighbors {g.max_neighbors}" + ("" if g.pbc else ", non-periodic")

    known = {settings(g) for g in trained}
    new = sorted({settings(g) for g in ours} - known)
    if new:
        warn_user(f"model.init_checkpoint {path} was trained on graphs with {' / '.join(sorted(known))}; "
                  f"this run builds {' / '.join(new)}. Unless that is intended, set graph.cutoff and "
                  "graph.max_neighbors (and graph.preset) to the checkpoint's")
