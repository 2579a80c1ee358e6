"""Resume: a real ``misq compress`` killed (SIGKILL) or interrupted (SIGINT) in the middle of a
layer continues with ``--resume`` and ends bit for bit where an uninterrupted run ends.

The interrupted runs are caught mid-layer without any test hook: the test watches the run's
log for a layer's o_proj line, freezes the process with SIGSTOP, and confirms from the resume
state that the layer is unfinished (else it lets it run on to a later layer) before sending
the real signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from results_compare import assert_same_packed, assert_same_results

from misq import cli

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")

LAYERS = 4
RUN_TIMEOUT_S = 240
_LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_process():
    """A failed test must not leave a run behind, least of all a stopped one."""
    yield
    while _LAUNCHED:
        proc = _LAUNCHED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory) -> Path:
    """The tiny LLaMA with enough layers to stop one in the middle of the run."""
    from misq.demo.toy import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("deep") / "model", layers=LAYERS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


def compress_args(model: Path, calib: Path, root: Path, name: str) -> list[str]:
    # No --eval: equal weights give equal perplexities (test_determinism.py compares those).
    return ["compress", str(model), str(calib), "--device", "cpu", "--nsamples", "4", "--seqlen", "32",
            "--grouping", "hessian", "--sparsity", "0.5", "--groupsize", "0", "--no-act-order", "--no-mse", "--n-groups", "4", "--target-avg-bits", "3.5", "--cache-dir", str(root / "cache"),
            "--out", str(root / name / "run"), "--save", str(root / name / "packed")]


def launch(args: list[str], logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("stderr*")))
    # Files, not pipes: tqdm writes a lot to stderr and an unread pipe would block the run.
    with open(logs / f"stdout{n}", "w") as out, open(logs / f"stderr{n}", "w") as err:
        # SIGINT at its default, as in a terminal: a shell that runs the suite in the background
        # (`pytest &`) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen([sys.executable, "-m", "misq.cli", *args], stdout=out, stderr=err,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _LAUNCHED.append(proc)
    return proc


def finish(proc: subprocess.Popen, logs: Path) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"misq compress did not finish in {RUN_TIMEOUT_S} s; stderr in {logs}")


def last_stderr(logs: Path) -> str:
    return max(logs.glob("stderr*")).read_text()


def done_layers(run: Path) -> int:
    return json.loads((run / "resume" / "state.json").read_text())["done_layers"]


def _wait_stopped(pid: int) -> None:
    """Until the kernel reports the process stopped (state T), so that nothing moves any more."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 10
    while stat.exists() and time.monotonic() < deadline:
        if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.005)
    time.sleep(0.2)  # no procfs: give the signal time to land


def stop_mid_layer(proc: subprocess.Popen, run: Path, logs: Path, targets: tuple[int, ...] = (1, 2)) -> int:
    """Freeze the run while decoder layer k (0-based, from ``targets``) is half compressed.

    Half: its attention output projection is solved (logged) and the resume state does not
    list it as done. Returns k; the process is left stopped.
    """
    log = run / "compress.log"
    for k in targets:
        marker = f"model.layers.{k}.self_attn.o_proj: rel. error"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (log.is_file() and marker in log.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before layer {k}: {last_stderr(logs)[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"layer {k} never started")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_stopped(proc.pid)
        if done_layers(run) == k:
            return k
        os.kill(proc.pid, signal.SIGCONT)  # layer k finished before the stop landed: try a later one
    proc.kill()
    pytest.fail(f"could not stop the run in the middle of any of layers {targets}")


@pytest.fixture(scope="module")
def reference(deep_checkpoint, tiny_corpus_file, workdir) -> Path:
    """An uninterrupted run of the same command (run folder and packed checkpoint under it)."""
    logs = workdir / "reference" / "logs"
    proc = launch(compress_args(deep_checkpoint, tiny_corpus_file, workdir, "reference"), logs)
    assert finish(proc, logs) == 0, last_stderr(logs)[-3000:]
    return workdir / "reference"


def assert_resumes_to_reference(args: list[str], root: Path, reference: Path, k: int) -> None:
    logs = root / "logs"
    proc = launch([*args, "--resume"], logs)
    assert finish(proc, logs) == 0, last_stderr(logs)[-3000:]
    run = root / "run"
    assert f"resuming after {k} finished layer(s)" in (run / "compress.log").read_text()
    assert not (run / "resume").exists(), "the resume folder must go once the run has finished"
    assert_same_results(reference / "run" / "results.json", run / "results.json")
    assert_same_packed(reference / "packed", root / "packed")


def test_sigkill_mid_layer_then_resume_is_bit_identical(deep_checkpoint, tiny_corpus_file, workdir, reference):
    args = compress_args(deep_checkpoint, tiny_corpus_file, workdir, "killed")
    root, run = workdir / "killed", workdir / "killed" / "run"
    proc = launch(args, root / "logs")
    k = stop_mid_layer(proc, run, root / "logs")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    # Killed inside layer k: layers 0..k-1 are recorded, layer k is not, nothing is final.
    assert done_layers(run) == k
    assert sorted(p.name for p in (run / "resume").glob("layer_*.safetensors")) == [f"layer_{i:03d}.safetensors" for i in range(k)]
    assert not (run / "results.json").exists() and not (root / "packed").exists()
    assert_resumes_to_reference(args, root, reference, k)


def test_sigint_exits_130_keeps_state_and_resumes(deep_checkpoint, tiny_corpus_file, workdir, reference):
    args = compress_args(deep_checkpoint, tiny_corpus_file, workdir, "interrupted")
    root, run = workdir / "interrupted", workdir / "interrupted" / "run"
    proc = launch(args, root / "logs")
    k = stop_mid_layer(proc, run, root / "logs")
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends; delivered once the process runs again
    os.kill(proc.pid, signal.SIGCONT)
    assert finish(proc, root / "logs") == 130
    err = last_stderr(root / "logs")
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("misq: interrupted") and "--resume" in err
    assert k <= done_layers(run) < LAYERS  # the state is kept (the signal may land as layer k ends)
    assert not (run / "results.json").exists() and not (root / "packed").exists()
    assert json.loads((run / "progress.json").read_text())["status"] == "interrupted"  # misq status: not FAILED
    assert_resumes_to_reference(args, root, reference, done_layers(run))


# ----------------------------------------------------------------------------- in-process runs
# These interrupt between layers (KeyboardInterrupt raised once layer 0 is recorded), which is
# enough for what they check: refusals, and the --budget model path (saved plans) of a resume.


def tiny_args(model: Path, calib: Path, root: Path, *extra: str) -> list[str]:
    return ["compress", str(model), str(calib), "--device", "cpu", "--nsamples", "2", "--seqlen", "32", "--n-groups", "4",
            "--grouping", "hessian", "--sparsity", "0.5", "--groupsize", "0", "--no-act-order", "--no-mse",
            "--target-avg-bits", "3.5", "--cache-dir", str(root / "cache"), "--out", str(root / "run"), *extra]


@pytest.fixture
def interrupt_after_layer0(monkeypatch):
    """Ctrl-C right after layer 0 has been recorded (once)."""
    from misq.runs.resume import ResumeState

    original = ResumeState.layer_done
    fired = []

    def layer_done(self, i, layer_state, output):
        original(self, i, layer_state, output)
        if i == 0 and not fired:
            fired.append(i)
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "layer_done", layer_done)
    return fired


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("misq: error: ") and "Traceback" not in err, err
    return lines[0]


def test_resume_refuses_a_different_configuration(tiny_checkpoint, tmp_path, interrupt_after_layer0, capsys):
    corpus = tmp_path / "calib.txt"
    from misq.demo.toy import synthetic_corpus

    corpus.write_text(synthetic_corpus(400, seed=4))
    args = tiny_args(tiny_checkpoint, corpus, tmp_path)
    assert cli.main(args) == 130 and interrupt_after_layer0
    capsys.readouterr()
    state = tmp_path / "run" / "resume" / "state.json"
    before = state.read_bytes()
    assert json.loads(before)["done_layers"] == 1

    assert cli.main([*args, "--resume", "--sparsity", "0.6"]) == 2
    line = one_error_line(capsys)
    assert "cannot resume" in line and "--sparsity 0.5 -> 0.6" in line and "drop --resume" in line
    assert cli.main([*args, "--resume", "--seqlen", "48"]) == 2
    assert "--seqlen 32 -> 48" in one_error_line(capsys)
    assert cli.main([*args, "--resume", "--dtype", "float32"]) == 2
    assert "--dtype 'float16' -> 'float32'" in one_error_line(capsys)
    # Same options, but the calibration text changed since: other windows, other inputs.
    corpus.write_text(synthetic_corpus(400, seed=5))
    assert cli.main([*args, "--resume"]) == 2
    assert "calibration windows differ" in one_error_line(capsys)
    assert state.read_bytes() == before  # a refused resume leaves the state as it was
    assert not (tmp_path / "run" / "results.json").exists()
    # Where activations live changes no number: that option may change on resume.
    corpus.write_text(synthetic_corpus(400, seed=4))
    assert cli.main([*args, "--resume", "--offload-activations"]) == 0
    assert "resuming after 1 finished layer(s)" in (tmp_path / "run" / "compress.log").read_text()


def test_resume_without_a_recorded_run_is_refused(tiny_checkpoint, tiny_corpus_file, tmp_path, capsys):
    args = tiny_args(tiny_checkpoint, tiny_corpus_file, tmp_path)
    assert cli.main([*args, "--resume"]) == 2
    assert "nothing to resume" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before the run folder is created
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    assert "already finished" in one_error_line(capsys)


def test_resume_with_model_budget_matches_uninterrupted(tiny_checkpoint, tiny_corpus_file, tmp_path, interrupt_after_layer0):
    extra = ("--grouping", "mi", "--budget", "model")
    ref_root, root = tmp_path / "ref", tmp_path / "resumed"
    interrupt_after_layer0.append("off")  # the reference runs through
    assert cli.main(tiny_args(tiny_checkpoint, tiny_corpus_file, ref_root, "--save", str(ref_root / "packed"), *extra)) == 0
    interrupt_after_layer0.clear()
    args = tiny_args(tiny_checkpoint, tiny_corpus_file, root, "--save", str(root / "packed"), *extra)
    assert cli.main(args) == 130
    assert (root / "run" / "resume" / "plans.safetensors").is_file()  # the measuring pass is not repeated
    assert cli.main([*args, "--resume"]) == 0
    log = (root / "run" / "compress.log").read_text()
    assert "resuming after 1 finished layer(s)" in log
    assert_same_results(ref_root / "run" / "results.json", root / "run" / "results.json")
    assert_same_packed(ref_root / "packed", root / "packed")


def test_layers_are_written_in_the_background_and_errors_come_back(tmp_path, monkeypatch):
    """layer_done returns before the layer is on disk; the next layer_done (or wait) finishes it
    first, so the state never counts a layer whose file is not complete, and a failed write is
    raised in the caller's thread, the state still at the layers before it."""
    import threading

    import torch

    from misq.runs import resume
    from misq.runs.resume import ResumeState

    class Output:
        def __init__(self, n):
            self.grids, self.records = {}, [{"name": f"layer {i}"} for i in range(n)]

    state = ResumeState(tmp_path / "run", {"model": {"model": "m"}, "compress": {}})
    state.start_fresh()
    gate = threading.Event()
    real = resume._save_tensors

    def slow_then_failing(tensors, path):
        gate.wait(10)
        if path.name == "layer_002.safetensors":
            raise OSError(28, "No space left on device", str(path))
        real(tensors, path)

    monkeypatch.setattr(resume, "_save_tensors", slow_then_failing)
    w = {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 2)}
    state.layer_done(0, w, Output(1))
    assert not state.layer_path(0).exists()  # still being written
    gate.set()
    state.layer_done(1, w, Output(2))  # finishes layer 0 first
    assert state.layer_path(0).exists()
    state.wait()
    assert json.loads(state.state_path.read_text())["done_layers"] == 2
    state.layer_done(2, w, Output(3))
    with pytest.raises(OSError, match="No space left"):
        state.wait()
    assert json.loads(state.state_path.read_text())["done_layers"] == 2
    state.layer_done(3, w, Output(4))
    state.wait(quiet=True)  # nothing pending is lost or raised twice
    assert json.loads(state.state_path.read_text())["done_layers"] == 4
