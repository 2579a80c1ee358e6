"""Numerical failures stop a compression run with the layer's name, before anything broken is
written: no results.json, no packed checkpoint, and no resume file for the failed layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from misq import cli
from misq.algorithms.sparsegpt import damped_inverse_cholesky
from misq.errors import NumericalError


def compress(model: Path, corpus: Path, tmp_path: Path) -> list[str]:
    # the prototype's scheme (mixed widths per channel group, 50% pruning), named in full
    return ["compress", str(model), str(corpus), "--device", "cpu", "--nsamples", "2", "--seqlen", "32", "--n-groups", "4",
            "--grouping", "hessian", "--sparsity", "0.5", "--groupsize", "0", "--no-act-order", "--no-mse",
            "--target-avg-bits", "3.5", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--save", str(tmp_path / "packed")]


def stopped(capsys, tmp_path: Path, argv: list[str], layers_done: int) -> str:
    """The run failed with one error line, wrote no results and recorded only the good layers."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("misq: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    run = tmp_path / "run"
    assert not (run / "results.json").exists() and not (tmp_path / "packed").exists()
    assert json.loads((run / "resume" / "state.json").read_text())["done_layers"] == layers_done
    assert sorted(p.name for p in (run / "resume").glob("layer_*")) == [f"layer_{i:03d}.safetensors" for i in range(layers_done)]
    assert json.loads((run / "progress.json").read_text())["status"] == "failed"
    return lines[0]


@pytest.mark.parametrize("budget", ["layer", "model"])  # model: caught in the measuring pass, before any layer
def test_nan_in_activations_names_the_layer(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, budget, monkeypatch):
    from misq.models import loading

    # NaN weights are refused when loaded (tests/test_nonfinite.py); switch that check off to reach
    # the second line of defence, the check of each layer's calibration inputs.
    monkeypatch.setattr(loading, "check_finite", lambda *args, **kwargs: None)
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.1.post_attention_layernorm.weight"][3] = float("nan")  # poisons layer 1's MLP input
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    argv = compress(model, tiny_corpus_file, tmp_path) + ["--budget", budget]
    line = stopped(capsys, tmp_path, argv, layers_done=1 if budget == "layer" else 0)
    assert "model.layers.1.mlp.gate_proj: its calibration inputs hold NaN/Inf" in line
    assert "check the checkpoint's weights" in line


@pytest.mark.parametrize("bad", [float("nan"), 1e6])  # 1e6 is finite in float32 but not in the model's float16
def test_non_finite_solved_layer_is_not_written(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, monkeypatch, bad):
    from misq.compress import driver

    real_solve, calls = driver.solve, []

    def solve(*args, **kwargs):
        res = real_solve(*args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # steps run q/k/v, o, gate/up, down per layer: the 6th is layer 1's o_proj
            res.weight[0, 0] = bad
        return res

    monkeypatch.setattr(driver, "solve", solve)
    line = stopped(capsys, tmp_path, compress(tiny_checkpoint, tiny_corpus_file, tmp_path), layers_done=1)
    assert "model.layers.1.self_attn.o_proj: the solved weights hold NaN/Inf in float16" in line
    assert "--dtype bfloat16 or float32" in line


def test_indefinite_hessian_names_the_layers(capsys, tmp_path, tiny_checkpoint, tiny_corpus_file, monkeypatch):
    from misq.algorithms import sparsegpt

    monkeypatch.setattr(sparsegpt, "_upper_cholesky_of_inverse", lambda H, method: None)  # no damping ever helps
    line = stopped(capsys, tmp_path, compress(tiny_checkpoint, tiny_corpus_file, tmp_path), layers_done=0)
    names = "+".join(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert f"{names}: the Hessian is not positive definite" in line
    assert "after 6 tries" in line and "--nsamples" in line and "--percdamp" in line


def test_damped_inverse_cholesky_retries_then_gives_up(caplog):
    H = -torch.eye(8)  # damping by a multiple of a negative mean diagonal never makes this PD
    with pytest.raises(NumericalError, match=r"not positive definite even with damping 1e\+03 .* after 6 tries"):
        damped_inverse_cholesky(H.clone(), 0.01)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 6
