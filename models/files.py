"""Writing files so that a crash or a concurrent writer never leaves a half-written one.

One `atomic_write` for every file a reader may open while it is being replaced (registry tables,
checkpoints, summary.json, dataset checksums), and one `file_lock` for every directory two
processes may change at once (a registry collection, a checkpoint folder, a dataset's first
install). Temporary names are unique per writer, so two writers never replace each other's
partial file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MB blocks (dataset files are 47 MB)."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to `path`, unique to this writer (process, thread, call)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry itself is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes | str) -> None:
    """Readers see the old content or the new one, never a mix; the new one survives a crash."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        fsync_write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(directory: Path, name: str = ".lock") -> Iterator[Path]:
    """An exclusive lock on `directory` (made if missing), held across processes for the block.

    flock locks belong to the open file: a crashed holder releases it when its process ends."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield directory
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
