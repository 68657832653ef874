"""A run's directory: the files a run writes there, and the lock that keeps a second run out."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import weakref
from pathlib import Path

from jmp_ext.train.config import TrainError
from jmp_ext.warn import warn_user

RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.csv", "summary.json", "test_metrics.json")
# The lock files this process holds open (lock_run_dir); weak: a dropped Trainer's lock goes
# with its file object, as before.
_HELD = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): point the lock files' descriptors at /dev/null.
    A flock belongs to the open file, which a forked copy of the descriptor keeps alive: after
    a kill -9 of the training process its workers held the lock for seconds, and a scheduler's
    immediate requeue was refused. (dup2 rather than close: the child's file objects still own
    those descriptor numbers.)"""
    for file in list(_HELD):
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, file.fileno())
        os.close(devnull)


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_run_dir(run_dir: Path):
    """An exclusive lock on run_dir/.lock, held while the returned file is open (None, with a
    warning, where the filesystem has no locks): a second run there (a resume beside a run
    whose torchrun agent was killed but whose ranks were not) would write the same last.pt and
    metrics.csv. The OS drops the lock when its process dies."""
    path = run_dir / ".lock"
    # Never through a symbolic link (the PID written below would truncate the file it points
    # to, outside run_dir), and never blocking on a FIFO: a regular file only.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise TrainError(f"{path} is a symbolic link: a run writes its lock there; remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TrainError(f"{path} is not a regular file: a run writes its lock there; remove it")
    file = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        if holder.startswith(f"PID {os.getpid()} on {socket.gethostname()}"):
            holder = "a Trainer of this same process, not yet trained or released (Trainer.release_run_dir)"
        raise TrainError(f"run_dir {run_dir} is in use by another training run ({holder}); wait for it to "
                         "finish, stop it, or choose another run_dir") from None
    except OSError as e:  # (a filesystem without flock: Lustre mounted noflock, some FUSE mounts)
        file.close()
        warn_user(f"run_dir {run_dir} cannot be locked ({e}): make sure no other run uses it")
        return None
    file.truncate(0)
    file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    _HELD.add(file)
    return file


def unlock_run_dir(file) -> None:
    """Releases a lock_run_dir lock (None: none was taken)."""
    if file is not None:
        _HELD.discard(file)
        fcntl.flock(file, fcntl.LOCK_UN)  # (released now, whatever copies of the descriptor remain)
        file.close()
