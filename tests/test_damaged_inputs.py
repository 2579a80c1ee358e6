"""Issue 16, classes 4 and 5 (and 6's property test): write failures and damaged inputs.

A failed write (disk full, read-only, name too long) is one ``misq: error:`` line with the path
and leaves no partial output; every file misq reads may be damaged, and a damaged one is a
clean refusal (MisqError: one line, exit 2), never a traceback.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from misq import cli
from misq.errors import MisqError

RESULTS = {
    "misq_version": "0.2.0", "kind": "baseline", "created": "2026-01-01T00:00:00Z",
    "model": {"name_or_path": "m", "dtype": "float16"}, "device": "cpu",
    "protocol": {"name": "gptq", "seqlen": 32}, "ppl": {"wikitext2": 5.5},
    "eval": {"wikitext2": {"ppl": 5.5, "tokens": 640, "segments": 20, "seqlen": 32, "seconds": 1.0}},
    "timing": {"eval_s": {"wikitext2": 1.0}}, "memory": {"peak_rss_gib": 1.0},
}
RUN = copy.deepcopy(RESULTS) | {
    "kind": "compressed", "ppl": {"wikitext2": 6.0},
    "config": {"sparsity": 0.5, "grouping": "hessian", "bits": [2, 4, 8], "target_avg_bits": 4.0, "seqlen": 32},
    "sparsity": {"target": 0.5, "actual": 0.5, "pattern": "unstructured"},
    "bits": {"actual_avg_bits": 4.0, "target_avg_bits": 4.0}, "layers": [{"name": "a", "rel_error": 0.1}],
}
PROGRESS = {"status": "running", "pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00Z", "started_unix": 1.0,
            "updated": "2026-01-01T00:00:00Z", "updated_unix": 1.0, "stage": "compress", "layer": 1, "layers_total": 2,
            "sublayer": None, "elapsed_s": 3.0, "eta_s": 4.0, "peak_accelerator_bytes": None}


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """``misq ARGV``: exit 0, or a clean refusal (exit 2, one ``misq: error:`` line); anything
    else (a traceback) propagates and fails the test."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("misq: error: ")]
    assert "Traceback" not in err
    assert rc == 0 or (rc == 2 and len(lines) == 1), err
    return rc, lines[0] if lines else ""


# ----------------------------------------------------------------------------- write failures


@pytest.fixture()
def no_plots(monkeypatch):
    import misq.report.plots as plots

    monkeypatch.setattr(plots, "make_plots", lambda comparison: {})


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG])
def test_compare_write_failure_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch, no_plots, code):
    from misq import atomic

    base, run = tmp_path / "base.json", tmp_path / "run.json"
    base.write_text(json.dumps(RESULTS))
    run.write_text(json.dumps(RUN))
    out = tmp_path / "report"
    assert cli.main(["compare", str(base), str(run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = atomic._write

    def failing(path, data):
        if path.name.startswith(".report.html"):
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(atomic, "_write", failing)
    capsys.readouterr()
    rc, line = run_cli(capsys, ["compare", str(base), str(run), "--out", str(out)])
    assert rc == 2 and os.strerror(code) in line and "report.html" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # all old, no temp files, no lone JSON


def test_export_disk_full_leaves_no_partial_folder(capsys, tmp_path, monkeypatch, packed):
    from transformers import PreTrainedModel

    def full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    rc, line = run_cli(capsys, ["export", str(packed), "--dense", str(tmp_path / "dense")])
    assert rc == 2 and "No space left on device" in line and "free some space" in line
    assert os.listdir(tmp_path) == []  # neither the folder nor a hidden partial one


def test_compress_out_path_too_long(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file):
    rc, line = run_cli(capsys, ["compress", str(tiny_checkpoint), str(tiny_corpus_file), "--device", "cpu",
                                "--out", str(tmp_path / ("x" * 400))])
    assert rc == 2 and "too long" in line


# ----------------------------------------------------------------------------- damaged inputs (property tests)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def damaged(draw, valid: dict) -> str:
    """``valid`` as JSON, then damaged: a field replaced by random JSON, removed, or the text cut."""
    data = copy.deepcopy(valid)
    how = draw(st.sampled_from(["replace", "nested", "remove", "truncate", "other"]))
    keys = sorted(data)
    if how == "replace":
        data[draw(st.sampled_from(keys))] = draw(json_values)
    elif how == "nested":
        dicts = [k for k in keys if isinstance(data[k], dict) and data[k]]
        if dicts:
            k = draw(st.sampled_from(dicts))
            data[k][draw(st.sampled_from(sorted(data[k])))] = draw(json_values)
    elif how == "remove":
        data.pop(draw(st.sampled_from(keys)))
    elif how == "other":
        return json.dumps(draw(json_values))
    text = json.dumps(data)
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(text=damaged(PROGRESS))
def test_status_of_a_damaged_progress_file(capsys, tmp_path_factory, text):
    run = tmp_path_factory.mktemp("status")
    (run / "progress.json").write_text(text)
    run_cli(capsys, ["status", str(run)])


@FAST
@given(text=damaged(RUN), which=st.sampled_from(["baseline", "run"]))
def test_compare_of_damaged_results(capsys, tmp_path_factory, text, which):
    import misq.report.plots as plots

    root = tmp_path_factory.mktemp("compare")
    base, run = root / "base.json", root / "run.json"
    base.write_text(text if which == "baseline" else json.dumps(RESULTS))
    run.write_text(text if which == "run" else json.dumps(RUN))
    real, plots.make_plots = plots.make_plots, (lambda comparison: {})
    try:
        rc, _ = run_cli(capsys, ["compare", str(base), str(run), "--out", str(root / "out")])
    finally:
        plots.make_plots = real
    files = sorted(os.listdir(root / "out")) if (root / "out").exists() else []
    assert files in ([], [".misq-run", "comparison_results.json", "report.html", "report.md"]) if rc == 0 else \
        "comparison_results.json" not in files


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_checkpoint):
    """A valid resume state (one finished layer) and the model it belongs to."""
    from misq.config import ModelConfig
    from misq.models import layout
    from misq.models.loading import load_model

    root = tmp_path_factory.mktemp("resume")
    model, _ = load_model(ModelConfig(model=str(tiny_checkpoint)))
    from misq.runs.resume import ResumeState

    state = ResumeState(root / "run", {"model": {"model": "m"}, "compress": {}})
    state.start_fresh()
    layer = layout.decoder_layers(model)[0]
    from misq.models.layout import layer_prefix

    tensors = {layer_prefix(0) + k: v for k, v in layer.state_dict().items()}

    class Output:
        def __init__(self):
            self.grids, self.records = {}, [{"name": "x"}]

    state.layer_done(0, tensors, Output())
    state.wait()  # the layer is written in the background
    return root / "run", model


@FAST
@given(data=st.data())
def test_resume_of_a_damaged_state(tmp_path_factory, interrupted, data):
    from misq.runs.resume import ResumeState

    src, model = interrupted
    run = tmp_path_factory.mktemp("r") / "run"
    shutil.copytree(src, run)
    valid = json.loads((run / "resume" / "state.json").read_text())
    target = data.draw(st.sampled_from(["state", "layer"]))
    if target == "state":
        (run / "resume" / "state.json").write_text(data.draw(damaged(valid)))
    else:
        layer = run / "resume" / "layer_000.safetensors"
        raw = layer.read_bytes()
        layer.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    state = ResumeState(run, {"model": {"model": "m"}, "compress": {}})
    try:
        state.check_resumable()
        state.restore(model)
    except MisqError as err:
        assert "\n" not in str(err)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_checkpoint, tiny_corpus_file) -> Path:
    root = tmp_path_factory.mktemp("dmg")
    argv = ["compress", str(tiny_checkpoint), str(tiny_corpus_file), "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
            "--cache-dir", str(root / "cache"), "--out", str(root / "run"), "--save", str(root / "packed")]
    assert cli.main(argv) == 0
    return root / "packed"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_eval_of_a_damaged_packed_checkpoint(tmp_path_factory, packed, data):
    """A truncated safetensors file or a damaged misq section: refused when the checkpoint is
    loaded (what ``misq eval`` does first), with one line."""
    from misq.config import DataConfig, ModelConfig
    from misq.jobs.loading import load

    folder = tmp_path_factory.mktemp("p") / "packed"
    shutil.copytree(packed, folder)
    how = data.draw(st.sampled_from(["truncate", "config", "section", "layer"]))
    cfg = json.loads((folder / "config.json").read_text())
    if how == "truncate":
        raw = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "config":
        (folder / "config.json").write_text(data.draw(damaged(cfg)))
    elif how == "section":
        cfg["misq"][data.draw(st.sampled_from(sorted(cfg["misq"])))] = data.draw(json_values)
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        layers = cfg["misq"]["layers"]
        name = data.draw(st.sampled_from(sorted(layers)))
        layers[name][data.draw(st.sampled_from(sorted(layers[name])))] = data.draw(json_values)
        (folder / "config.json").write_text(json.dumps(cfg))
    try:
        load(ModelConfig(model=str(folder), device="cpu"), DataConfig(seqlen=32))
    except MisqError as err:
        assert "\n" not in str(err)
