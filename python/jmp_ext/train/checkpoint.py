"""Checkpoints: atomic writes and safe loads.

A training checkpoint is a dict of tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)`. The trainer (loop.py) writes two:
  last.pt, what resume=true reads: model (state_dict, the normalizers included as its norm_*
    buffers), ema ({parameter name: EMA value} or None), optimizer, schedule, scaler (fp16's
    gradient scaler or None), force_scaler (the gradient forces' adaptive scale or None), loop
    (step; epoch and batch_in_epoch, the sampler position, with counts_every_batch True: an older
    jmp_ext's count left small batches out; best, bad_validations, nan_streak,
    validated_step; window, the training figures summed since the last log, or None), rng
    (every rank's RNG states), config (the resolved TrainConfig as a dict), metrics (last
    validation).
  best.pt, for inference and fine-tuning: model (the EMA weights when there is an EMA), config,
    step, metrics (of the validation that made it best).
Both are written with jmp_ext.files.write_atomic: a run killed at any moment leaves either the
old file or the new one, never a torn one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jmp_ext.files import write_atomic


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save(state) to `path` atomically."""
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint without executing code from it (weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory; give the file (best.pt or last.pt of a run)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {e}") from e


# The kind of each field of last.pt that resume reads (the layout in the module docstring).
RESUME_FIELD_KINDS = {"model": dict, "ema": (dict, type(None)), "optimizer": dict, "schedule": dict,
                      "scaler": (dict, type(None)), "force_scaler": (dict, type(None)), "loop": dict, "rng": list,
                      "config": dict, "metrics": dict}


def resume_state_problem(state: Any) -> str | None:
    """What makes a loaded last.pt unfit for resume at the top level (e.g. "has 'ema' of type
    list"), or None. A field it lacks is a KeyError when the trainer reads it."""
    if not isinstance(state, dict):
        return f"is of type {type(state).__name__}, not a dict"
    for field, kind in RESUME_FIELD_KINDS.items():
        if field in state and not isinstance(state[field], kind):
            return f"has {field!r} of type {type(state[field]).__name__}"
    return None


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
