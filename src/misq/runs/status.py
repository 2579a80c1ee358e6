"""``misq status``: read a run directory's progress from another process and say where it is.

A run that stopped updating ``progress.json`` for longer than ``stale_after_s``, or whose process
is gone from this machine, is reported as *stale*, so a killed run is never shown as running.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from misq.errors import MisqError
from misq.runs.rundir import (
    FINAL_STATES,
    LOG_FILE,
    PROGRESS_FILE,
    RunDir,
    format_bytes,
    format_duration,
)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell (e.g. platform quirks): do not call a live run dead
    return True


def _tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a text file, reading only its end (logs grow large)."""
    if n <= 0 or not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024 * max(1, n // 100 + 1)))
        data = f.read()
    return data.decode("utf-8", errors="replace").splitlines()[-n:]


def read_status(
    run_dir: str | os.PathLike | RunDir,
    stale_after_s: float = 300.0,
    *,
    now: float | None = None,
    log_tail: int = 100,
) -> dict[str, Any]:
    """Read ``progress.json`` and classify the run as running, finished, failed, interrupted or stale.

    Returns the progress fields plus ``run_dir``, ``state``, ``stale_reason``, ``age_s``
    (seconds since the last update), ``log_tail`` (last lines of compress.log) and
    ``results`` (path of results.json, or None).
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir, create=False)
    if not rd.path.is_dir():
        raise MisqError(f"no misq run in {rd.path}: the directory does not exist (pass the --out folder given to misq compress)")
    if not rd.progress_path.is_file() and (rd.path / ".misq-run").is_file():
        raise MisqError(f"the misq run in {rd.path} has not written its progress yet (it is starting, or it stopped "
                        "before its first step: see its compress.log, or rerun the command)")
    if not rd.progress_path.is_file():
        raise MisqError(f"no misq run in {rd.path}: {PROGRESS_FILE} not found (pass the --out folder given to misq compress)")
    try:
        progress = json.loads(rd.progress_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MisqError(f"cannot read {rd.progress_path} ({err.strerror or err}): check the folder's permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MisqError(f"no misq run in {rd.path}: {PROGRESS_FILE} is not valid JSON ({err}); delete it and rerun") from None
    if not isinstance(progress, dict):
        raise MisqError(f"no misq run in {rd.path}: {PROGRESS_FILE} is not a misq progress file; delete it and rerun")

    progress = _sanitized(progress)
    now = time.time() if now is None else now
    status = dict(progress)
    updated = progress.get("updated_unix")
    if updated is None and progress.get("updated"):
        updated = _parse_iso(progress["updated"])
    age = None if updated is None else max(0.0, now - float(updated))
    state = progress.get("status") or "running"
    reason = None
    if state == "running":
        if age is not None and age > stale_after_s:
            reason = f"no progress update for {format_duration(age)} (stale after {format_duration(stale_after_s)})"
        elif (progress.get("host") == socket.gethostname() and isinstance(progress.get("pid"), int)
              and not _pid_alive(progress["pid"])):
            reason = f"process {progress['pid']} is no longer running on {progress['host']}"
        if reason:
            state = "stale"
    status.update(
        run_dir=str(rd.path),
        state=state,
        stale_reason=reason,
        age_s=None if age is None else round(age, 1),
        log_tail=_tail_lines(rd.log_path, log_tail),
        results=str(rd.results_path) if rd.results_path.is_file() else None,
    )
    return status


_NUMBERS = ("started_unix", "updated_unix", "elapsed_s", "eta_s", "peak_accelerator_bytes")
_INTS = ("pid", "layer", "layers_total")
_TEXTS = ("status", "host", "started", "updated", "stage", "sublayer", "error", "finished")


def _sanitized(progress: dict[str, Any]) -> dict[str, Any]:
    """``progress`` with every field misq reads of the type it should have; a damaged field
    (a string where a number belongs, NaN, a list ...) is dropped and shown as unknown."""
    out = dict(progress)
    for key in _NUMBERS:
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            out[key] = None
    for key in _INTS:
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            out[key] = None
    for key in _TEXTS:
        v = out.get(key)
        if v is not None and not isinstance(v, str):
            out[key] = None
    if out.get("status") is not None and out["status"] not in ("running", *FINAL_STATES):
        out["status"] = None
    return out


def _parse_iso(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


_KNOWN_FIELDS = {
    "status", "pid", "host", "started", "started_unix", "updated", "updated_unix", "stage", "layer",
    "layers_total", "sublayer", "elapsed_s", "eta_s", "peak_accelerator_bytes", "error", "finished",
    "run_dir", "state", "stale_reason", "age_s", "log_tail", "results",
}  # fmt: skip


def format_status(status: dict[str, Any], log_lines: int = 10) -> str:
    """A human summary of :func:`read_status`'s dict, ending with the last log lines."""
    state = status.get("state", status.get("status", "?"))
    lines = [f"run {status.get('run_dir', '?')}: {str(state).upper()}"]
    if state == "stale":
        lines.append(f"  stale: {status.get('stale_reason')}; the run has probably died (see the log below)")
    if state == "failed" and status.get("error"):
        lines.append(f"  error: {status['error']}")
    if state == "interrupted":
        lines.append("  interrupted: finished layers are kept; rerun the same command with --resume to continue")
    stage = status.get("stage") or "—"
    where = f"  stage: {stage}"
    if status.get("layer") is not None:
        where += f", layer {status['layer']}/{status.get('layers_total', '?')}"
        if status.get("sublayer"):
            where += f" ({status['sublayer']})"
    lines.append(where)
    timing = f"  elapsed: {format_duration(status.get('elapsed_s'))}"
    if state == "running":
        timing += f", ETA: {format_duration(status.get('eta_s'))}"
    lines.append(timing)
    peak = status.get("peak_accelerator_bytes")
    lines.append(f"  peak accelerator memory: {format_bytes(peak) if peak is not None else 'n/a (no GPU)'}")
    age = status.get("age_s")
    lines.append(
        f"  updated: {status.get('updated', '—')}" + (f" ({format_duration(age)} ago)" if age is not None else "")
        + f", pid {status.get('pid', '?')} on {status.get('host', '?')}"
    )
    extra = {k: v for k, v in status.items() if k not in _KNOWN_FIELDS}
    if extra:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    if status.get("results"):
        lines.append(f"  results: {status['results']}")
    tail = (status.get("log_tail") or [])[-log_lines:] if log_lines > 0 else []
    if tail:
        lines.append(f"--- last {len(tail)} lines of {LOG_FILE} ---")
        lines.extend(tail)
    return "\n".join(lines)


def follow_status(
    run_dir: str | os.PathLike | RunDir,
    interval_s: float = 2.0,
    out: TextIO | None = None,
    *,
    stale_after_s: float = 300.0,
    log_lines: int = 10,
    max_iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Write the status to ``out`` (default stdout) every ``interval_s`` until the run ends.

    Stops when the run is finished, failed or stale, or after ``max_iterations`` reports;
    returns the last status dict. ``sleep`` and ``clock`` are injectable for tests.
    """
    out = sys.stdout if out is None else out
    clear = out.isatty() if hasattr(out, "isatty") else False
    i = 0
    while True:
        status = read_status(run_dir, stale_after_s, now=clock(), log_tail=log_lines)
        # On a terminal redraw in place; in a file or pipe keep a readable history.
        out.write(("\x1b[2J\x1b[H" if clear else ("\n" if i else "")) + format_status(status, log_lines) + "\n")
        out.flush()
        i += 1
        if status["state"] in FINAL_STATES or (max_iterations is not None and i >= max_iterations):
            return status
        sleep(interval_s)


__all__ = ["follow_status", "format_status", "read_status"]
