"""Checkpoints: atomic writes and safe loads.

A training checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`:
  model (state_dict), ema (state_dict or None), optimizer, schedule, sampler, rng, step, config
  (the resolved TrainConfig as a dict), normalizers, metrics (last validation), best (metric value).
Writes go to a temporary file in the same directory, are fsynced, then renamed over the target:
a run killed at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
