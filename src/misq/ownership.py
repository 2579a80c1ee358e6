"""Which folders misq may write into, and one writer per folder.

misq never takes over a folder it did not make. Every output folder it creates carries a marker,
``.misq-run`` (JSON: ``kind``, ``misq_version``, ``created``), and misq writes only into

- a folder that does not exist yet, or is empty, or
- a folder whose marker has the same kind (its own earlier output of the same sort),

and refuses anything else up front, before any work, with one line (``--overwrite`` takes over a
folder anyway, for the rare case that is meant). An output is never one of the command's inputs.

A run folder also gets a lock (:class:`FolderLock`): ``fcntl.flock`` on ``.misq-lock`` inside it,
which the OS releases when the process ends however it ends, so a second run on the same folder
fails at once naming the holder, and a run killed with ``kill -9`` never blocks ``--resume``.

A leaf module: it imports nothing of misq but :mod:`misq.errors` and :mod:`misq.atomic`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from misq.atomic import atomic_write_json
from misq.errors import MisqError

MARKER = ".misq-run"
LOCK = ".misq-lock"

#: Kinds of folder misq writes.
COMPRESS_RUN = "compress-run"
REPORT = "report"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would (temporary
    folders and files are created 0700/0600)."""
    mask = umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as err:  # ENAMETOOLONG, ELOOP ...
        raise MisqError(f"cannot use {str(path)!r} ({err.strerror or err}): give a shorter or valid path") from None


def marker_kind(folder: str | os.PathLike) -> str | None:
    """The kind in ``folder``'s marker; None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def check_not_input(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], flag: str) -> None:
    """``out`` may not be (or lie inside the same folder as) any named input."""
    for what, path in inputs.items():
        if path and same_path(out, path):
            raise MisqError(f"{flag} {str(out)!r} is {what}: misq never writes into its inputs; choose another folder")


def check_output_folder(path: str | os.PathLike, kind: str, flag: str, *, overwrite: bool = False,
                        owned: Any = None, existing_note: str = "") -> Path:
    """Refuse (before any work) an output folder misq may not write into; writes nothing.

    ``owned(path) -> bool`` may accept folders of older misq versions that predate the marker.
    """
    p = Path(path).expanduser()
    if not _exists(p):
        return p
    if not p.is_dir():
        raise MisqError(f"{flag} {str(p)!r} is a file: give a folder path")
    try:
        entries = [e for e in os.listdir(p) if e != LOCK]
    except OSError as err:
        raise MisqError(f"{flag} {str(p)!r} cannot be read ({err.strerror or err}): choose a folder you can use") from None
    if not entries or overwrite:
        return p
    found = marker_kind(p)
    if found == kind or (found is None and owned is not None and owned(p)):
        return p
    what = f"a misq {found} folder" if found else "not a folder misq made"
    raise MisqError(f"{flag} {str(p)!r} exists and is {what}{existing_note}: choose a new or empty folder "
                    f"(or pass --overwrite to let misq write into it anyway)")


def claim_folder(path: str | os.PathLike, kind: str) -> Path:
    """Create ``path`` (if needed) and mark it as misq's folder of ``kind``."""
    from misq import __version__

    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        if marker_kind(p) != kind:
            atomic_write_json(p / MARKER, {"kind": kind, "misq_version": __version__,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as err:
        raise write_error(err, p) from None
    return p


_ADVICE = {
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some space (disk quota) or choose a folder on another disk",
    errno.EROFS: "the filesystem is read-only: choose a folder you can write to",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.ENAMETOOLONG: "give a shorter path",
}
WRITE_ERRNOS = frozenset(_ADVICE)


def write_error(err: OSError, path: str | os.PathLike | None = None) -> MisqError:
    """One line for a failed write: the path, why, and what to do."""
    where = err.filename if err.filename is not None else path
    advice = _ADVICE.get(err.errno or -1, "check the folder and try again")
    return MisqError(f"cannot write {str(where)!r} ({err.strerror or err}): {advice}; nothing partial was kept")


class FolderLock:
    """An exclusive ``flock`` on ``folder/.misq-lock`` held while a run writes the folder.

    The holder's pid, host and start time are written into the lock file; a second process that
    cannot take the lock reads them for its error. The OS drops the lock when the holder dies.
    """

    def __init__(self, folder: str | os.PathLike, flag: str = "--out"):
        self.path = Path(folder) / LOCK
        self.flag = flag
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise write_error(err, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MisqError(f"{self.flag} {str(self.path.parent)!r} is in use by another misq run ({self.holder()}): "
                            "wait for it to finish (misq status shows it) or choose another folder") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {data['pid']} on {data['host']}, started {data['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
