"""Atomic file writes, shared by the datasets, the checkpoints and the logs.

A write goes to a temporary file in the target's directory, is fsynced, then renamed over the
target, and the directory entry is fsynced too: a process killed at any moment (or a full disk)
leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(f)` writes to a binary file object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(), not mkstemp: mkstemp's files are 0600, so a colleague in the group could not read a
    # checkpoint or a dataset; open() gives the mode of any new file (umask, default ACLs).
    # "x": a name taken by another writer is an error, never a file to clobber or delete.
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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Create or replace `path` with `data`."""
    write_atomic(path, lambda f: f.write(data))
