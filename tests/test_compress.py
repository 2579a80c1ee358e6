"""End-to-end compression of a tiny model: budgets met, results complete, reload identical."""

from __future__ import annotations

import json

import pytest

from misq import jobs
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.runs.results import Results


@pytest.mark.parametrize("grouping,budget,target", [("hessian", "layer", 3.5), ("mi", "model", 3.0)])
def test_mixed_precision_meets_target(tiny_checkpoint, tiny_corpus_file, tmp_path, grouping, budget, target):
    # Evaluate on a slice of the corpus: the whole file's PPL took most of this test's time.
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(tiny_corpus_file.read_text().splitlines()[:400]))
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, grouping=grouping, budget=budget, n_groups=4,
                         target_avg_bits=target, sparsity=0.5, groupsize=0, act_order=False, mse=False)
    res = jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                                cfg, EvalConfig(datasets=(str(eval_file),)), str(tmp_path / "run"), save_dir=str(tmp_path / "packed"))
    assert abs(res["bits"]["actual_avg_bits"] - target) <= 0.01
    assert res["sparsity"]["actual"] == pytest.approx(0.5, abs=0.02)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["bits"]["actual_avg_bits"] == res["bits"]["actual_avg_bits"]
    for key in ("ppl", "timing", "storage", "layers", "protocol", "config"):
        assert key in on_disk
    assert Results.read(tmp_path / "run" / "results.json").to_json() == on_disk  # the typed record loses nothing
    reloaded = jobs.run_eval(ModelConfig(str(tmp_path / "packed"), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path / "c")),
                                 EvalConfig(datasets=(str(eval_file),)), None)
    name = str(eval_file)
    assert reloaded["ppl"][name] == pytest.approx(res["ppl"][name], rel=1e-4)


def test_results_file_refuses_damaged_or_foreign_json(tmp_path):
    path = tmp_path / "results.json"
    for text, why in (('{"ppl": {', "damaged JSON"), ("[1, 2]", "a JSON list"), ('{"ppl": {}}', "no 'misq_version'"),
                      ('{"ppl": {}, "surprise": 1}', "unknown section")):
        path.write_text(text)
        with pytest.raises(MisqError, match=why) as err:
            Results.read(path)
        assert "\n" not in str(err.value) and "not a misq results file" in str(err.value)
