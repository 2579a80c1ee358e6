"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Write to a temporary file in the same directory, fsync, then ``os.replace`` (atomic on POSIX
and Windows when source and target are on one filesystem).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    try:
        _write(path, data)
    except OSError as err:
        from misq.ownership import WRITE_ERRNOS, write_error

        if err.errno in WRITE_ERRNOS:  # a full disk, a read-only place, a name too long: one line, not a traceback
            raise write_error(err, path) from None
        raise


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_all(files: dict[Path, bytes]) -> None:
    """Write several files so that all of them are new or, on any failure, all are as they were.

    Each is written to a temporary sibling first (a full disk shows here, before any target is
    touched); then the old files are moved aside, the new ones renamed in, and the old ones
    dropped. A failed rename puts the old files back.
    """
    staged: list[tuple[Path, Path]] = []
    placed: list[tuple[Path, Path | None]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            tmp = path.with_name(f".{path.name}.new.tmp")
            _write(tmp, data)
            staged.append((tmp, path))
        for tmp, path in staged:
            backup = path.with_name(f".{path.name}.old.tmp") if path.exists() else None
            if backup is not None:
                os.replace(path, backup)
            placed.append((path, backup))
            os.replace(tmp, path)
    except BaseException as err:
        for path, backup in reversed(placed):
            try:
                if backup is not None:
                    os.replace(backup, path)
                elif path.exists():
                    path.unlink()
            except OSError:
                pass
        for tmp, _ in staged:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        if isinstance(err, OSError) and err.errno is not None:
            from misq.ownership import WRITE_ERRNOS, write_error

            if err.errno in WRITE_ERRNOS:
                raise write_error(err, next(iter(files), None)) from None
        raise
    for _path, backup in placed:
        if backup is not None:
            try:
                backup.unlink()
            except FileNotFoundError:
                pass


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) already written to ``path`` to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths sneak into results; make them plain JSON.
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
