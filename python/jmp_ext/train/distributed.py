"""torchrun / DDP plumbing: process group from the environment, rank-0 checks, reductions.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them everything
here is a no-op for a single process. NCCL on GPUs, gloo on the CPU.

An error one rank meets alone (a file only it reads or writes, a bad batch in its share) must not
leave the others waiting in their next collective: `together()` / `raise_together()` make every
rank raise, with the failed rank's message. Errors they do not cover (a rank killed, an error
inside DDP's backward) end in the process group's timeout at the latest.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from jmp_ext.train.config import TrainError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup(device: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Initialises the process group when launched by torchrun and picks this rank's device.
    timeout: how long a collective waits for the other ranks before it fails (None: torch's
    default, 10 minutes for NCCL and 30 for gloo)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda: CUDA is not available on this machine; use device=cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout)
    return DistInfo(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Only rank 0 writes files and prints."""
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is untouched). NCCL reduces on this rank's GPU."""
    if not is_distributed():
        return t
    device = t.device
    work = t.to("cuda", copy=True) if dist.get_backend() == "nccl" else t.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(device)


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def raise_together(error: Exception | None) -> None:
    """A collective: every rank passes the exception it met (or None), and when any rank met one,
    every rank raises: a failed rank its own exception, the others a TrainError with the message
    of the first failed rank. A no-op (but raising `error`) without a process group."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise TrainError(f"rank {r}{others} failed: {message}")


@contextlib.contextmanager
def together():
    """`with together(): ...` runs a block that has no collective inside, and raises on every rank
    if it raised on any (see raise_together); the block's own exception keeps its traceback."""
    error = None
    try:
        yield
    except Exception as e:
        error = e
    raise_together(error)
