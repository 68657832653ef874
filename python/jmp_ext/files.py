"""Atomic file writes, shared by the datasets, the checkpoints and the run's files (metrics.csv is
written so at the start of a run, then appended to).

A write goes to a temporary file in the target's directory, is fsynced, then renamed over the
target, and the directory entry is fsynced too: a process killed at any moment (or a full disk)
leaves either the old file or the new one, never a torn one. A directory (a dataset) cannot be
renamed over another: exchange_paths swaps the two in one step where the filesystem can.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(f)` writes to a binary file object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(), not mkstemp: mkstemp's files are 0600, so a colleague in the group could not read a
    # checkpoint or a dataset; open() gives the mode of any new file (umask, default ACLs).
    # "x": a name taken by another writer is an error, never a file to clobber or delete.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        f = open(tmp, "xb")
    except OSError as e:  # (a read-only directory: the target is the file the user knows)
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        with naming(path), f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # (the rename itself)


@contextmanager
def naming(path: str | Path):
    """Raises an OSError of the block that names no file (a failed write or fsync: a full disk)
    as one naming `path`, the file it was writing; also under torch.save, whose zip writer
    raises its own RuntimeError ("unexpected pos ...") over it."""
    try:
        yield
    except BaseException as e:
        cause = e.__context__ if isinstance(e, RuntimeError) else e
        if isinstance(cause, OSError) and cause.errno is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise


def fsync_dir(directory: str | Path) -> None:
    """Persist the entries of `directory` (a rename into it). Filesystems that cannot (some
    network and Windows-hosted ones answer EINVAL or ENOTSUP) are left as they are: the rename
    has happened, only its durability across a power cut is theirs."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(e.errno, e.strerror, str(directory)) from e
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | Path, write: Callable[[TextIO], None], newline: str | None = None) -> None:
    """Create or replace `path` with what `write(f)` writes to a UTF-8 text file object (newline
    as open()'s: "" for csv)."""
    def write_binary(binary: BinaryIO) -> None:
        text = io.TextIOWrapper(binary, encoding="utf-8", newline=newline)
        write(text)
        text.detach()  # (flushes; write_atomic closes the file)

    write_atomic(path, write_binary)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Create or replace `path` with `data`."""
    write_atomic(path, lambda f: f.write(data))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # (linux/fcntl.h, linux/fs.h)


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap the files or directories at `a` and `b` in one atomic step (Linux's renameat2 with
    RENAME_EXCHANGE): a process killed at any moment leaves each name with one of the two,
    never neither. False, with nothing done, where that fails: not Linux, a C library older than
    glibc 2.28, a filesystem without exchange, a container that filters the call, or a path
    that is not there (then two renames must do, with a moment in between where one name is
    empty, and raise any real error themselves)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    return renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                               _RENAME_EXCHANGE) == 0
