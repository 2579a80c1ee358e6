"""Run directories, progress.json and `misq status`."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from misq.errors import MisqError
from misq.runs.rundir import Progress, RunDir
from misq.runs.status import follow_status, format_status, read_status


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _progress_json(run: RunDir) -> dict:
    return json.loads(run.progress_path.read_text())


def _write_progress(run: RunDir, **fields) -> None:
    base = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": "2026-11-21T17:00:00Z",
            "stage": "compress", "layer": 3, "layers_total": 32, "sublayer": "mlp.down_proj", "elapsed_s": 120.0,
            "eta_s": 600.0, "peak_accelerator_bytes": 3 * 2**30}  # fmt: skip
    base.update(fields)
    run.progress_path.write_text(json.dumps(base))


def test_rundir_paths_and_writes(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.path.is_dir()
    assert run.config_path.name == "config.json" and run.log_path.name == "compress.log"
    run.write_config({"sparsity": 0.5})
    run.write_results({"kind": "compressed", "ppl": {"wikitext2": 7.0}})
    assert json.loads(run.config_path.read_text()) == {"sparsity": 0.5}
    assert json.loads(run.results_path.read_text())["ppl"] == {"wikitext2": 7.0}


def test_attach_log_writes_compress_log_and_detaches(tmp_path):
    run = RunDir(tmp_path)
    misq_logger = logging.getLogger("misq")
    level_before = misq_logger.level
    handler = run.attach_log()
    try:
        logging.getLogger("misq.some.module").info("layer 3 solved")
        logging.getLogger("misq.some.module").debug("too chatty for INFO")
    finally:
        run.detach_log()
    assert handler not in misq_logger.handlers and misq_logger.level == level_before
    logging.getLogger("misq.some.module").info("after detach")
    text = run.log_path.read_text()
    assert "layer 3 solved" in text and "too chatty" not in text and "after detach" not in text


def test_progress_fields_throttle_and_finish(tmp_path):
    clock = FakeClock()
    run = RunDir(tmp_path)
    p = Progress(run, total_layers=5, clock=clock)
    assert p.update("calibration", samples=128)
    data = _progress_json(run)
    assert data["status"] == "running" and data["stage"] == "calibration" and data["samples"] == 128
    assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
    assert data["layers_total"] == 5 and data["started"].endswith("Z") and data["updated_unix"] == clock.t
    assert data["peak_accelerator_bytes"] is None  # CPU-only torch in the test environment

    clock.t += 0.1
    assert p.update("compress", layer=1, sublayer="self_attn.q_proj")  # stage change: written at once
    clock.t += 0.1
    assert not p.update("compress", layer=1, sublayer="self_attn.k_proj")  # throttled
    assert _progress_json(run)["sublayer"] == "self_attn.q_proj"
    clock.t += 0.5
    assert p.update("compress", layer=1, sublayer="mlp.up_proj")
    assert _progress_json(run)["sublayer"] == "mlp.up_proj"

    p.finish()
    data = _progress_json(run)
    assert data["status"] == "finished" and data["stage"] == "done" and data["eta_s"] is None


def test_progress_eta_from_mean_layer_time(tmp_path):
    clock = FakeClock(1000.0)
    p = Progress(tmp_path, total_layers=5, clock=clock)
    p.update("compress", layer=1)
    assert _progress_json(RunDir(tmp_path))["eta_s"] is None  # no finished layer yet
    for layer in (2, 3):
        clock.t += 10.0
        p.update("compress", layer=layer)
    # Two layers took 10 s each; layers 3, 4 and 5 remain.
    assert _progress_json(RunDir(tmp_path))["eta_s"] == pytest.approx(30.0)
    clock.t += 4.0
    assert p.eta_s() == pytest.approx(26.0)
    assert _progress_json(RunDir(tmp_path))["elapsed_s"] == pytest.approx(20.0)


def test_progress_context_manager_records_failure(tmp_path):
    with pytest.raises(RuntimeError), Progress(tmp_path, total_layers=2) as p:
        p.update("compress", layer=1)
        raise RuntimeError("CUDA out of memory")
    data = _progress_json(RunDir(tmp_path))
    assert data["status"] == "failed" and "CUDA out of memory" in data["error"] and data["stage"] == "compress"
    status = read_status(tmp_path)
    assert status["state"] == "failed"
    assert "error: RuntimeError: CUDA out of memory" in format_status(status)


def test_ctrl_c_is_recorded_as_interrupted_not_failed(tmp_path):
    with pytest.raises(KeyboardInterrupt), Progress(tmp_path, total_layers=4) as p:
        p.update("compress", layer=3)
        raise KeyboardInterrupt
    status = read_status(tmp_path)
    assert status["state"] == "interrupted" and status["layer"] == 3
    text = format_status(status)
    assert "INTERRUPTED" in text and "--resume" in text and "FAILED" not in text


def test_status_finished_run_with_log(tmp_path):
    run = RunDir(tmp_path)
    run.log_path.write_text("".join(f"line {i}\n" for i in range(30)))
    p = Progress(run, total_layers=4)
    p.update("compress", layer=4)
    p.finish()
    run.write_results({"kind": "compressed", "ppl": {}})
    status = read_status(run)
    assert status["state"] == "finished" and status["results"] == str(run.results_path)
    text = format_status(status, log_lines=5)
    assert "FINISHED" in text and "line 29" in text and "line 25" in text and "line 24" not in text
    assert "ETA" not in text


def test_status_running_run(tmp_path):
    run = RunDir(tmp_path)
    now = 1_800_000_000.0
    _write_progress(run, updated_unix=now - 5, updated="2027-01-15T08:00:00Z")
    status = read_status(run, now=now)
    assert status["state"] == "running" and status["stale_reason"] is None and status["age_s"] == 5.0
    text = format_status(status)
    assert "RUNNING" in text and "layer 3/32 (mlp.down_proj)" in text
    assert "ETA: 10m 00s" in text and "elapsed: 2m 00s" in text and "3.00 GiB" in text


def test_status_stale_when_not_updated(tmp_path):
    run = RunDir(tmp_path)
    now = 1_800_000_000.0
    _write_progress(run, updated_unix=now - 3600)
    status = read_status(run, stale_after_s=300, now=now)
    assert status["state"] == "stale" and "no progress update for 1h 00m" in status["stale_reason"]
    assert "STALE" in format_status(status)


def test_status_stale_when_process_died(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run = RunDir(tmp_path)
    now = 1_800_000_000.0
    _write_progress(run, pid=proc.pid, updated_unix=now - 1)
    status = read_status(run, now=now)
    assert status["state"] == "stale" and str(proc.pid) in status["stale_reason"]
    # A pid on another host cannot be checked from here: trust the fresh timestamp.
    _write_progress(run, pid=proc.pid, host="some-other-node", updated_unix=now - 1)
    assert read_status(run, now=now)["state"] == "running"


def test_status_errors(tmp_path):
    with pytest.raises(MisqError, match="no misq run in .*does not exist"):
        read_status(tmp_path / "nowhere")
    with pytest.raises(MisqError, match="no misq run in .*progress.json not found"):
        read_status(tmp_path)
    (tmp_path / "progress.json").write_text("{ half a file")
    with pytest.raises(MisqError, match="not valid JSON"):
        read_status(tmp_path)


def test_follow_status_until_finished(tmp_path):
    clock = FakeClock()
    run = RunDir(tmp_path)
    p = Progress(run, total_layers=3, clock=clock)
    p.update("compress", layer=1)
    sleeps = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.t += seconds
        p.update("compress", layer=len(sleeps) + 1)
        if len(sleeps) == 2:
            p.finish()

    out = io.StringIO()
    status = follow_status(run, interval_s=2.0, out=out, sleep=fake_sleep, clock=clock)
    assert status["state"] == "finished" and sleeps == [2.0, 2.0]
    assert out.getvalue().count("run ") == 3 and "FINISHED" in out.getvalue()


def test_follow_status_max_iterations_and_stale(tmp_path):
    run = RunDir(tmp_path)
    now = 1_800_000_000.0
    _write_progress(run, updated_unix=now)
    out = io.StringIO()
    status = follow_status(run, out=out, max_iterations=3, sleep=lambda s: None, clock=lambda: now)
    assert status["state"] == "running" and out.getvalue().count("RUNNING") == 3
    status = follow_status(run, out=io.StringIO(), sleep=lambda s: None, clock=lambda: now + 1000)
    assert status["state"] == "stale"


def test_atomic_writes_leave_old_file_when_replace_fails(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.write_results({"ppl": {"wikitext2": 1.0}})
    p = Progress(run, total_layers=2)
    p.update("compress", layer=1)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        run.write_results({"ppl": {"wikitext2": 2.0}})
    with pytest.raises(OSError):
        p.finish()
    monkeypatch.undo()
    assert json.loads(run.results_path.read_text()) == {"ppl": {"wikitext2": 1.0}}
    assert _progress_json(run)["status"] == "running"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["progress.json", "results.json"]  # no temp files left


def test_eta_ignores_replayed_layers_and_uses_layer_done(tmp_path):
    clock = FakeClock(0.0)
    p = Progress(tmp_path, total_layers=10, clock=clock)
    for layer in (1, 2, 3):  # resumed run: replaying finished layers takes no time
        clock.t += 0.01
        p.update("replay", layer=layer)
    clock.t += 1.0
    p.update("compress", layer=4, sublayer="self_attn")
    clock.t += 20.0
    p.update("compress", layer=4, layer_done=True)
    # One compressed layer took 20 s; layers 5..10 remain.
    assert p.eta_s() == pytest.approx(120.0)
    assert "layer_done" not in _progress_json(RunDir(tmp_path))
