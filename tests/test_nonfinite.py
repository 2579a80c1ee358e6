"""Issue 16, class 3: nothing broken is reported as a result.

NaN/Inf weights are refused when loaded (plain, streamed, packed: its fp16 scales too); a
non-finite perplexity is an error naming the dataset; a config that claims more layers than the
weights hold is refused before any work; ``--resume`` checks a fingerprint of the weights; a
packed checkpoint honours ``--dtype``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from misq import cli
from misq.errors import MisqError, NumericalError


def one_line(capsys, argv: list[str], *expected: str) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("misq: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def poisoned(src: Path, dst: Path, name_part: str, value: float = float("nan"), file: str = "model.safetensors") -> str:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / file))
    name = next(k for k in sorted(tensors) if name_part in k and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(dst / file), metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    from misq.demo.toy import synthetic_corpus

    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(synthetic_corpus(120, seed=2))
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_checkpoint, tiny_corpus_file) -> Path:
    root = tmp_path_factory.mktemp("nf")
    argv = ["compress", str(tiny_checkpoint), str(tiny_corpus_file), "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
            "--cache-dir", str(root / "cache"), "--out", str(root / "run"), "--save", str(root / "packed")]
    assert cli.main(argv) == 0
    return root / "packed"


def eval_argv(model: Path, text: Path, *extra: str) -> list[str]:
    return ["eval", str(model), "--device", "cpu", "--datasets", str(text), "--seqlen", "32", *extra]


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_nan_weight_is_refused_when_loaded(capsys, tmp_path, tiny_checkpoint, small_text, stream):
    name = poisoned(tiny_checkpoint, tmp_path / "model", "layers.1.mlp.up_proj")
    out = tmp_path / "results.json"
    one_line(capsys, eval_argv(tmp_path / "model", small_text, stream, "--out", str(out)),
             name, "NaN/Inf", "damaged")
    assert not out.exists()


def test_inf_in_a_packed_checkpoints_scales_is_refused(capsys, tmp_path, packed, small_text):
    name = poisoned(packed, tmp_path / "packed", ".scales", float("inf"))
    one_line(capsys, eval_argv(tmp_path / "packed", small_text), name, "NaN/Inf")


def test_non_finite_perplexity_is_an_error_naming_the_dataset(monkeypatch):
    from misq.protocol import perplexity

    monkeypatch.setattr(perplexity, "_nll_whole", lambda *a, **k: torch.tensor([1.0, float("nan")]))
    with pytest.raises(NumericalError, match="eval wikitext2: the loss is NaN or infinite in 1 of 2"):
        perplexity.perplexity(torch.nn.Linear(1, 1), torch.zeros(1, 64, dtype=torch.long), 32, "cpu", layerwise=False,
                              desc="eval wikitext2")
    monkeypatch.setattr(perplexity, "_nll_whole", lambda *a, **k: torch.tensor([1e6, 1e6]))
    with pytest.raises(NumericalError, match="overflows"):
        perplexity.perplexity(torch.nn.Linear(1, 1), torch.zeros(1, 64, dtype=torch.long), 32, "cpu", layerwise=False,
                              desc="eval wikitext2")


def test_config_claiming_more_layers_than_the_weights_hold(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, small_text):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(cfg))
    argv = ["compress", str(model), str(tiny_corpus_file), "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    one_line(capsys, argv, f"claims {cfg['num_hidden_layers']} decoder layers", f"layer(s) {cfg['num_hidden_layers'] - 1}")
    assert not (tmp_path / "run").exists()  # before any work
    one_line(capsys, eval_argv(model, small_text, "--stream"), "claims")


def test_resume_refuses_weights_that_changed_at_the_same_path(tmp_path, tiny_checkpoint):
    from misq.models.safetensors_files import weights_fingerprint
    from misq.runs.resume import ResumeState

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    resolved = {"model": {"model": str(model)}, "compress": {}}
    first = ResumeState(tmp_path / "run", resolved)
    first.weights = weights_fingerprint(model)
    first.start_fresh()
    same = ResumeState(tmp_path / "run", resolved)
    same.weights = weights_fingerprint(model)
    same.check_resumable()  # unchanged weights resume
    # Rewrite the weights with other values of the same shapes (same size, same header).
    poisoned(tiny_checkpoint, tmp_path / "other", "embed_tokens", 0.5)
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = ResumeState(tmp_path / "run", resolved)
    changed.weights = weights_fingerprint(model)
    assert changed.weights != first.weights
    with pytest.raises(MisqError, match="weight files changed"):
        changed.check_resumable()


def test_packed_checkpoint_honours_dtype(packed):
    from misq.config import DataConfig, ModelConfig
    from misq.jobs.loading import load

    loaded = load(ModelConfig(model=str(packed), dtype="float32", device="cpu"), DataConfig(seqlen=32))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    saved = load(ModelConfig(model=str(packed), device="cpu"), DataConfig(seqlen=32))  # the default: as saved
    assert {p.dtype for p in saved.model.parameters()} == {torch.float16}
    assert math.isfinite(float(next(saved.model.parameters()).float().sum()))


def test_explicit_float16_applies_to_a_bfloat16_packed_checkpoint(tmp_path, tiny_checkpoint, tiny_corpus_file):
    """``--dtype float16`` is a choice the user made, so a bfloat16 checkpoint is cast, while no
    --dtype keeps the saved bfloat16 (float16 used to be the default, so the two looked alike)."""
    from misq.config import DataConfig, ModelConfig
    from misq.jobs.loading import load

    argv = ["compress", str(tiny_checkpoint), str(tiny_corpus_file), "--device", "cpu", "--nsamples", "2", "--seqlen", "32",
            "--dtype", "bfloat16", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--save", str(tmp_path / "packed"), "--prompts", "none"]
    assert cli.main(argv) == 0
    as_saved = load(ModelConfig(model=str(tmp_path / "packed"), device="cpu"), DataConfig(seqlen=32))
    assert {p.dtype for p in as_saved.model.parameters()} == {torch.bfloat16}
    asked = load(ModelConfig(model=str(tmp_path / "packed"), dtype="float16", device="cpu"), DataConfig(seqlen=32))
    assert {p.dtype for p in asked.model.parameters()} == {torch.float16}
    assert ModelConfig(model="m").weight_dtype == "float16"  # a plain checkpoint's default is unchanged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_the_finite_check_finds_every_kind_of_bad_value(dtype, bad):
    """check_finite reads a tensor's least and greatest values (float8: of a float32 copy): a
    NaN, +Inf or -Inf anywhere is refused with the count, a clean tensor passes."""
    from misq.errors import MisqError
    from misq.models.loading import check_finite

    t = torch.randn(64, 33).to(dtype)
    if bad is None:
        check_finite([("w", t)], "here")
        return
    if dtype == torch.float8_e4m3fn and bad == bad:
        pytest.skip("float8_e4m3fn has NaN but no infinity")
    t[17, 5] = bad
    t[40, 0] = bad
    with pytest.raises(MisqError, match="tensor w holds 2 NaN/Inf"):
        check_finite([("w", t)], "here")
