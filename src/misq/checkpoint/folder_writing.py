"""Writing an output folder the way misq writes every one: atomically, into a staged sibling.

A packed checkpoint, a dense export and a GPTQ export are each built in a hidden sibling folder
(:func:`staged_folder`), fsynced and swapped in for the target only when complete, so a crash or a
full disk never leaves a half-written folder; a target that is not misq's own output is refused
before any work (:func:`check_target_folder`). :class:`ShardWriter` writes the weights into
safetensors shards named as transformers names them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from misq.atomic import fsync_path
from misq.errors import MisqError
from misq.models.safetensors_files import INDEX_NAME, WEIGHTS_NAME
from misq.ownership import apply_umask, write_error


class ShardWriter:
    """Writes tensors to shards of at most ``max_bytes`` (a larger tensor gets one of its own) as
    they come, then names the shards as transformers does: one ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. :meth:`add` each
    tensor, then :meth:`finish` once; ``folder`` is normally the one :func:`staged_folder` yields."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, t: Tensor) -> None:
        """Queue ``t`` under ``name``; the pending shard is written first when ``t`` would overflow it."""
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self.shards) + 1:05d}.safetensors"  # renamed once the count is known
        save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write what is pending (an empty model still gets one file), name the shards, write the index."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / WEIGHTS_NAME)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, 1):
            fname = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")



def check_target_folder(target: Path, replaceable: Callable[[Path], bool]) -> None:
    """Refuse an output folder ``target`` that is a file, an unusable path, or a non-empty folder
    for which ``replaceable`` (e.g. :func:`is_packed_checkpoint`, :func:`is_misq_export`) is False."""
    try:
        target.exists()
    except OSError as err:
        raise MisqError(f"cannot use {str(target)!r} ({err.strerror or err}): give a shorter or valid path") from None
    if target.is_file():
        raise MisqError(f"{target} is a file: give a folder path for the checkpoint")
    if target.is_dir() and any(target.iterdir()) and not replaceable(target):
        raise MisqError(f"{target} exists and is not a misq output: choose a new or empty folder (misq only replaces its own)")


@contextmanager
def staged_folder(target: Path, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success fsync it and swap it in for ``target``
    (checked again with ``replaceable``); on any error remove it and raise one clear error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as err:
        raise write_error(err, target) from None
    try:
        try:
            yield tmp
            apply_umask(tmp)  # mkdtemp made it 0700: give the folder and its files the modes of a plain mkdir/open
            for p in tmp.rglob("*"):
                if p.is_file():
                    fsync_path(p)
            fsync_path(tmp)
        except OSError as err:
            raise write_error(err, target) from None
        except SafetensorError as err:  # safetensors' own wrapper of a failed write (a full disk ...)
            raise MisqError(f"cannot write {str(target)!r} ({err}): free some space or choose another folder; "
                            "nothing partial was kept") from None
        check_target_folder(target, replaceable)  # again: it may have changed while we wrote
        old = None
        if target.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "x")  # moved aside, then dropped once the new one is in place
        os.rename(tmp, target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
