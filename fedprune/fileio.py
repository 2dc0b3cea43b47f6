"""Crash-safe file writes, for everything the aggregator and the agents keep on disk."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    Write a temporary file in the same folder, fsync it, rename it over ``path`` (atomic on
    POSIX), then fsync the folder so the rename itself survives a power cut. ``mode`` (less the
    umask) is the file's permissions from its creation on: 0o600 for secrets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a crash: create afresh, so ``mode`` applies
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Make renames and deletions in ``directory`` durable (they live in the folder's entry)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_move(src: str | Path, dst: str | Path) -> None:
    """Move a complete file onto ``dst`` (same file system) so that readers of ``dst`` see the
    old file or the new one, and the result survives a power cut: fsync the data, rename, fsync
    the folder."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def atomic_write_json(path: str | Path, obj: object) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented UTF-8 JSON."""
    import json

    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
