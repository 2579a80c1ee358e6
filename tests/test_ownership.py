"""Issue 16, classes 1 and 2: misq writes only into folders it owns, one writer at a time.

Every refusal is one ``misq: error:`` line, exit 2, before any work, and the user's files are
untouched. A compression run takes an OS lock on its folder: a second run fails at once naming
the holder, and the lock of a killed run does not block ``--resume``.
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

from misq import cli
from misq.errors import MisqError
from misq.ownership import LOCK, MARKER, FolderLock, check_output_folder


def compress(tmp_path: Path, model: Path, dataset: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["compress", str(model), str(dataset), "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out or tmp_path / "run"), *extra]


def refused(capsys, argv: list[str], *expected: str) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("misq: error: ") and "Traceback" not in err, err
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint, tiny_corpus_file) -> Path:
    """One real (fast: no evaluation) compression run with a packed checkpoint."""
    root = tmp_path_factory.mktemp("owned")
    assert cli.main(compress(root, tiny_checkpoint, tiny_corpus_file, "--save", str(root / "packed"))) == 0
    return root


def test_out_may_not_be_the_model(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    before = snapshot(tiny_checkpoint)
    refused(capsys, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, out=tiny_checkpoint), "is the model folder")
    refused(capsys, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--save", str(tiny_checkpoint)),
            "--save", "is the model folder")
    assert snapshot(tiny_checkpoint) == before
    assert not (tmp_path / "run").exists()


def test_save_may_not_be_out(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    refused(capsys, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--save", str(tmp_path / "run")),
            "is the --out folder")
    assert not (tmp_path / "run").exists()


def test_save_into_a_foreign_folder_is_refused_before_the_work(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(capsys, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, "--save", str(mine)), "not a misq output")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    assert (mine / "notes.txt").read_text() == "keep me"


def test_out_into_a_foreign_folder_is_refused(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"mine": 1}')
    (mine / "resume").mkdir()
    (mine / "resume" / "keep.txt").write_text("keep")
    before = snapshot(mine)
    refused(capsys, compress(tmp_path, tiny_checkpoint, tiny_corpus_file, out=mine), "not a folder misq made", "--overwrite")
    assert snapshot(mine) == before


def test_a_finished_run_is_never_replaced(capsys, finished_run, tiny_checkpoint, tiny_corpus_file):
    run = finished_run / "run"
    assert json.loads((run / MARKER).read_text())["kind"] == "compress-run"
    before = snapshot(run)
    # The same --out again (as a second run with the default --out would do): refused, nothing changed.
    refused(capsys, compress(finished_run, tiny_checkpoint, tiny_corpus_file), "earlier finished run", "--overwrite")
    assert snapshot(run) == before


def test_overwrite_takes_over_a_folder(tmp_path, tiny_checkpoint, tiny_corpus_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x.txt").write_text("x")
    with pytest.raises(MisqError):
        check_output_folder(mine, "compress-run", "--out")
    assert check_output_folder(mine, "compress-run", "--out", overwrite=True) == mine


def test_a_folder_of_another_kind_is_refused(capsys, finished_run, tmp_path):
    """compare --out into a run folder, and into a user's folder with a report.md of their own."""
    results = finished_run / "run" / "results.json"
    refused(capsys, ["compare", str(results), str(results), "--out", str(finished_run / "run")], "misq compress-run folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report\n")
    refused(capsys, ["compare", str(results), str(results), "--out", str(mine)], "not a folder misq made")
    assert (mine / "report.md").read_text() == "my own report\n" and sorted(os.listdir(mine)) == ["report.md"]


def test_eval_out_naming_a_folder_or_a_foreign_file(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    base = ["eval", str(tiny_checkpoint), "--device", "cpu", "--datasets", str(tiny_corpus_file), "--seqlen", "32"]
    t0 = time.perf_counter()
    refused(capsys, [*base, "--out", str(tmp_path)], "is a folder")
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    refused(capsys, [*base, "--out", str(mine)], "not a misq results file", "--overwrite")
    refused(capsys, [*base, "--out", str(tiny_checkpoint / "config.json")], "a file of the model")
    assert time.perf_counter() - t0 < 30  # refused before the evaluation
    assert mine.read_text() == '{"mine": true}'


def test_export_may_not_write_into_its_input(capsys, finished_run):
    packed = finished_run / "packed"
    before = snapshot(packed)
    refused(capsys, ["export", str(packed), "--dense", str(packed)], "is the packed checkpoint")
    assert snapshot(packed) == before


def test_packed_and_exported_folders_follow_the_umask(finished_run, tmp_path):
    packed = finished_run / "packed"
    mask = os.umask(0o022)
    os.umask(mask)
    assert (packed.stat().st_mode & 0o777) == 0o777 & ~mask
    for p in packed.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o666 & ~mask, p
    old = os.umask(0o027)
    try:
        assert cli.main(["export", str(packed), "--dense", str(tmp_path / "dense")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "dense").stat().st_mode & 0o777 == 0o750
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in (tmp_path / "dense").iterdir())


# ----------------------------------------------------------------------------- one writer per folder


def test_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(capsys, finished_run, tiny_checkpoint,
                                                                       tiny_corpus_file):
    run = finished_run / "run"
    with FolderLock(run):
        line = refused(capsys, compress(finished_run, tiny_checkpoint, tiny_corpus_file, "--resume"),
                       "in use by another misq run", f"pid {os.getpid()}", "started")
    assert "misq status" in line


def test_the_lock_of_a_killed_run_is_released(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    code = ("import sys, time; from misq.ownership import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(MisqError, match=f"pid {proc.pid}"):
            FolderLock(folder).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        lock = FolderLock(folder).acquire()  # the OS dropped the dead process's lock: --resume is not blocked
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (folder / LOCK).is_file()
