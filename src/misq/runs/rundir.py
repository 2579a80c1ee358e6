"""A run directory and the progress of the run inside it.

``misq compress --out DIR`` keeps everything about one run in one folder::

    DIR/config.json     what was asked for (written once, at the start)
    DIR/compress.log    the "misq" logger's records
    DIR/progress.json   where the run is now (rewritten atomically while it runs)
    DIR/results.json    the final numbers

:class:`Progress` rewrites ``progress.json`` so that another process (``misq status DIR``) can
say how far a long compression has got, how long it still needs, and whether it has died:
a run that stopped updating the file, or whose process is gone, is reported as *stale*
(reading it is :mod:`misq.runs.status`).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from misq.atomic import atomic_write_json
from misq.errors import MisqError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOG_FILE = "compress.log"
PROGRESS_FILE = "progress.json"
RESULTS_FILE = "results.json"

#: States that end a run; ``follow_status`` stops on these and on "stale".
FINAL_STATES = ("finished", "failed", "interrupted", "stale")


def iso_utc(t: float) -> str:
    """Unix time -> ``2026-11-21T17:00:00Z``."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float | None) -> str:
    """``42s``, ``12m 05s``, ``2h 03m``; ``—`` when unknown."""
    if seconds is None:
        return "—"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def format_bytes(n: float | None) -> str:
    """Binary units: ``1.23 GiB``; ``—`` when unknown."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail early (before loading a model) when an output location cannot be written.

    ``what`` names it in the error ("output folder", "save folder", "output file"); a name
    ending in "folder" must not be an existing file. Returns the expanded path.
    """
    path = Path(path).expanduser()
    try:
        path.exists()
    except OSError as err:  # ENAMETOOLONG and the like
        raise MisqError(f"{what} {str(path)!r} cannot be used ({err.strerror or err}): give a shorter or valid path") from None
    if path.exists() and not path.is_dir() and what.endswith("folder"):
        raise MisqError(f"{what} {str(path)!r} is a file: give a folder path")
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    # Write a file rather than ask os.access: root passes os.access everywhere, and read-only
    # mounts or full disks only show when something is written.
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".misq-write-test-"):
            pass
    except OSError as err:
        raise MisqError(f"{what} {str(path)!r} is not writable ({err.strerror or err}): choose a folder you can write to") from None
    return path


class RunDir:
    """The folder of one run and the paths of the files inside it."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self._log_handler: logging.Handler | None = None
        self._saved_level = logging.NOTSET

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def progress_path(self) -> Path:
        return self.path / PROGRESS_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    def write_config(self, config: dict[str, Any]) -> Path:
        """Write ``config.json`` atomically and return its path."""
        atomic_write_json(self.config_path, config)
        return self.config_path

    def write_results(self, results: dict[str, Any]) -> Path:
        """Write ``results.json`` atomically and return its path."""
        atomic_write_json(self.results_path, results)
        return self.results_path

    def attach_log(self, level: int = logging.INFO) -> logging.Handler:
        """Send the "misq" logger's records at ``level`` and above to ``compress.log`` (appending).

        The "misq" logger's own level is lowered to ``level`` if needed (else the records never
        reach the file) and restored by :meth:`detach_log`; console verbosity belongs to the
        console handler's level.
        """
        self.detach_log()
        handler = logging.FileHandler(self.log_path, mode="a", encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("misq")
        self._saved_level = root.level
        if root.getEffectiveLevel() > level:
            root.setLevel(level)
        root.addHandler(handler)
        self._log_handler = handler
        return handler

    def detach_log(self, handler: logging.Handler | None = None) -> None:
        """Remove (and close) the handler added by :meth:`attach_log`; a no-op when none."""
        handler = handler or self._log_handler
        if handler is None:
            return
        root = logging.getLogger("misq")
        root.removeHandler(handler)
        handler.close()
        if handler is self._log_handler:
            self._log_handler = None
            root.setLevel(self._saved_level)


def _peak_accelerator_bytes() -> int | None:
    """Peak CUDA memory of this process, or None without CUDA (torch imported only here)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # a broken driver must not kill a long run over a progress field
        log.debug("could not read CUDA peak memory", exc_info=True)
    return None


class Progress:
    """Rewrites ``progress.json`` as a run advances.

    ``update`` may be called as often as convenient: writes are throttled to one per
    ``min_interval_s`` except when the stage changes, and ``finish`` always writes. Used as a
    context manager it records "interrupted" on Ctrl-C, "failed" (with the error) when the
    block raises anything else, and "finished" otherwise.
    """

    def __init__(
        self,
        run_dir: RunDir | str | os.PathLike,
        total_layers: int,
        *,
        min_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.total_layers = int(total_layers)
        self.min_interval_s = min_interval_s
        self._clock = clock
        self.started = clock()
        self._last_write: float | None = None
        self._stage: str | None = None
        self._layer: int | None = None
        self._sublayer: str | None = None
        self._extra: dict[str, Any] = {}
        # Layer timing for the ETA, restarted with each stage (so that fast "replay" layers of
        # a resumed run do not pass for compressed ones): the first timed layer, when it began,
        # how many layers have finished since, and when the last one finished.
        self._first_layer: int | None = None
        self._t0 = 0.0
        self._done = 0
        self._last_done = 0.0
        self.finished_status: str | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.finished_status is None:
            if exc is None:
                self.finish("finished")
            elif isinstance(exc, KeyboardInterrupt):
                # Ctrl-C keeps the resume state: the run can continue, it did not fail.
                self.finish("interrupted", error="interrupted (Ctrl-C); continue with the same command plus --resume")
            else:
                self.finish("failed", error=f"{exc_type.__name__}: {exc}")
        return False

    def update(self, stage: str, layer: int | None = None, sublayer: str | None = None, **extra: Any) -> bool:
        """Record the current stage (and 1-based layer); returns whether the file was rewritten.

        ``layer_done=True`` says that ``layer`` has just finished (otherwise a layer counts as
        finished when the next one starts); other keyword arguments are written as they are.
        """
        now = self._clock()
        stage_changed = stage != self._stage
        if stage_changed:
            self._first_layer = None
        self._track_layer(layer, bool(extra.pop("layer_done", False)), now)
        self._stage, self._layer, self._sublayer, self._extra = stage, layer, sublayer, extra
        due = self._last_write is None or now - self._last_write >= self.min_interval_s
        if not (stage_changed or due):
            return False
        self._write(now, status="running")
        return True

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        """Mark the run "finished", "failed" or "interrupted" (with a one-line error); always written."""
        if status not in FINAL_STATES or status == "stale":
            raise ValueError(f"finish status must be 'finished', 'failed' or 'interrupted', not {status!r}")
        now = self._clock()
        self.finished_status = status
        if status == "finished":
            self._stage, self._sublayer = "done", None
        self._write(now, status=status, error=error, finished=iso_utc(now))

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left in the layer loop, from the mean time of the layers finished so far."""
        if self._layer is None or self._first_layer is None or self._done <= 0:
            return None
        now = self._clock() if now is None else now
        per_layer = (self._last_done - self._t0) / self._done
        left = self.total_layers - (self._first_layer - 1) - self._done
        return max(0.0, per_layer * left - (now - self._last_done))

    def _track_layer(self, layer: int | None, layer_done: bool, now: float) -> None:
        if layer is None:
            return
        if self._first_layer is None or layer < self._first_layer:
            # First layer of this stage, or the loop started over: time from here.
            self._first_layer, self._t0, self._done, self._last_done = layer, now, 0, now
        done = layer - self._first_layer + (1 if layer_done else 0)
        if done > self._done:
            self._done, self._last_done = done, now

    def _write(self, now: float, *, status: str, **final: Any) -> None:
        payload: dict[str, Any] = {
            "status": status,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": iso_utc(self.started),
            "started_unix": self.started,
            "updated": iso_utc(now),
            "updated_unix": now,
            "stage": self._stage,
            "layer": self._layer,
            "layers_total": self.total_layers,
            "sublayer": self._sublayer,
            "elapsed_s": round(now - self.started, 3),
            "eta_s": None if status != "running" else _round(self.eta_s(now)),
            "peak_accelerator_bytes": _peak_accelerator_bytes(),
        }
        payload.update(final)
        # Extras never overwrite the fields that status readers rely on.
        payload.update({k: v for k, v in self._extra.items() if k not in payload})
        atomic_write_json(self.run_dir.progress_path, payload)
        self._last_write = now


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


__all__ = [
    "Progress",
    "RunDir",
    "check_writable",
    "format_bytes",
    "format_duration",
    "iso_utc",
]
