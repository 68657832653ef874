"""Checkpoints: atomic writes and safe loads.

A training checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`. The trainer (loop.py) writes two:
  last.pt, what resume=true reads: model (state_dict, the normalizers included as its norm_*
    buffers), ema ({parameter name: EMA value} or None), optimizer, schedule, scaler (fp16's
    gradient scaler or None), loop (step; epoch and batch_in_epoch, the sampler position; best,
    bad_validations, nan_streak, validated_step), rng (every rank's RNG states), config (the
    resolved TrainConfig as a dict), metrics (last validation).
  best.pt, for inference and fine-tuning: model (the EMA weights when there is an EMA), config,
    step, metrics (of the validation that made it best).
Writes go to a temporary file in the same directory, are fsynced, then renamed over the target:
a run killed at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save(state) to `path` atomically."""
    _atomic(Path(path), lambda f: torch.save(state, f))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(), not mkstemp: mkstemp's files are 0600, so a colleague in the group could not read a
    # checkpoint; open() gives the mode of any new file (umask, default ACLs). "x": a name taken
    # by another writer is an error, never a file to clobber or delete.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    f = open(tmp, "xb")
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself (the directory entry).
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint without executing code from it (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device); the trainer draws randomness only from these."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
