"""The same command with the same seed gives the same results on the CPU.

Two runs of one ``misq compress`` command (MI grouping, whose spectral step and k-means draw
random numbers; a model-wide budget; evaluation; a packed checkpoint) must agree on every field
of results.json except timings, peak memory, the creation time and the checkpoint's path, and
on every stored tensor bit for bit. A different seed must change the result, or the comparison
would pass for a seed that is silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from results_compare import assert_same_packed, assert_same_results, strip_volatile

from misq import cli


def command(model: Path, corpus: Path, root: Path, name: str, seed: str = "0") -> list[str]:
    return ["compress", str(model), str(corpus), "--device", "cpu", "--nsamples", "4", "--seqlen", "32", "--seed", seed,
            "--grouping", "mi", "--budget", "model", "--sparsity", "0.5", "--groupsize", "0", "--no-act-order", "--no-mse", "--n-groups", "4", "--target-avg-bits", "3.25",
            "--cache-dir", str(root / "cache"), "--out", str(root / name / "run")]


def test_same_command_same_results(tiny_checkpoint, tiny_corpus_file, tmp_path):
    from misq.demo.toy import synthetic_corpus

    evaltext = tmp_path / "eval.txt"
    evaltext.write_text(synthetic_corpus(60, seed=9))
    for name in ("first", "second"):
        extra = ["--eval", str(evaltext), "--save", str(tmp_path / name / "packed")]
        assert cli.main(command(tiny_checkpoint, tiny_corpus_file, tmp_path, name) + extra) == 0
    first, second = tmp_path / "first", tmp_path / "second"
    assert json.loads((first / "run" / "results.json").read_text())["ppl"]
    assert_same_results(first / "run" / "results.json", second / "run" / "results.json")
    assert_same_packed(first / "packed", second / "packed")

    assert cli.main(command(tiny_checkpoint, tiny_corpus_file, tmp_path, "other-seed", seed="1")) == 0
    a, b = (strip_volatile(json.loads((tmp_path / n / "run" / "results.json").read_text())) for n in ("first", "other-seed"))
    assert a["layers"] != b["layers"], "--seed 1 gave the same compression as --seed 0"
