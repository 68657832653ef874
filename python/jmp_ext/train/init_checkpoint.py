"""model.init_checkpoint: a new run's embedding and backbone (fine-tuning, or pretraining that
starts from one) from a pretrained checkpoint (a run's best.pt / last.pt, or a released JMP
one), checked against this run's network and graphs."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from jmp_ext.models.checkpoint import (is_force_branch_key, is_training_checkpoint, load_jmp_checkpoint,
                                      read_state_dict, safe_load)
from jmp_ext.train.config import ConfigError, TrainConfig, from_dict
from jmp_ext.train.tasks import TrainError, graph_configs


def init_from_checkpoint(net: nn.Module, config: TrainConfig) -> None:
    """Loads the embedding + backbone weights of config.model.init_checkpoint (ours, or a released
    JMP one) into `net`; the heads stay new, and a force branch the network does not use is
    dropped. One of our checkpoints also says what it was trained with: a backbone that does not
    fit is named, and a warning says when this run's graphs differ from the checkpoint's."""
    path = config.model.init_checkpoint
    if Path(path).is_dir():
        raise TrainError(f"model.init_checkpoint: {path} is a directory; give the checkpoint file (a run's "
                         "best.pt or last.pt, or a JMP .ckpt)")
    if not Path(path).is_file():
        raise TrainError(f"model.init_checkpoint: {path} does not exist")
    try:
        checkpoint = safe_load(path)
    except ValueError as e:
        raise TrainError(f"model.init_checkpoint: {e}") from e
    try:
        weights = read_state_dict(checkpoint, use_ema=config.model.init_ema)
    except ValueError as e:
        raise TrainError(f"model.init_checkpoint: {path}: {e}") from e
    trained = None
    if is_training_checkpoint(checkpoint):
        try:
            trained = from_dict(TrainConfig, checkpoint["config"])
        except ConfigError:  # (a config this version no longer reads: nothing to compare with)
            pass
    try:
        load_jmp_checkpoint(weights, net, use_ema=False)  # (weights are already the EMA ones if asked)
    except ValueError as e:
        fits = _backbone_preset_of(weights)
        hint = (f"its weights have the shapes of model.backbone={fits} (with no backbone_overrides)"
                if fits and trained is None and (fits != config.model.backbone or config.model.backbone_overrides) else
                "check model.backbone / model.backbone_overrides against the checkpoint's architecture"
                if trained is None else f"the checkpoint was trained with model.backbone={trained.model.backbone}"
                + (f" and model.backbone_overrides={trained.model.backbone_overrides}"
                   if trained.model.backbone_overrides else ""))
        raise TrainError(f"model.init_checkpoint {path} does not fit the configured network ({e}); {hint}") from e
    if trained is not None:
        _warn_if_graphs_differ(path, graph_configs(trained), graph_configs(config))


def _backbone_preset_of(weights: dict) -> str | None:
    """The BackboneConfig preset whose backbone has exactly the keys and shapes of `weights`'
    backbone.* (the direct-force branch aside), or None. Built on the meta device: no memory."""
    from jmp_ext.models import BackboneConfig, GemNetOCBackbone

    def shapes(state: dict) -> dict:
        return {k: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.") and not is_force_branch_key(k)}

    theirs = shapes(weights)
    for name in ("tiny", "jmp_s", "jmp_l"):
        with torch.device("meta"):
            backbone = GemNetOCBackbone(getattr(BackboneConfig, name)())
        ours = shapes({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
        if ours == theirs:
            return name
    return None


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
        warnings.warn(f"model.init_checkpoint {path} was trained on graphs with {' / '.join(sorted(known))}; "
                      f"this run builds {' / '.join(new)}. Unless that is intended, set graph.cutoff and "
                      "graph.max_neighbors (and graph.preset) to the checkpoint's", stacklevel=3)
