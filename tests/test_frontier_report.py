"""misq compare --reference: runs placed beside named reference points, and the frontier table."""

from __future__ import annotations

import json

import pytest

from misq.errors import MisqError
from misq.report.compare import compare
from misq.report.frontier import dominated_by, frontier_table, load_reference_points, run_point


def _results(path, size, wikitext2, c4, kind="compressed"):
    res = {"misq_version": "x", "kind": kind, "created": "2026-01-01T00:00:00Z", "model": {"name_or_path": "m"},
           "device": "cpu", "protocol": {"name": "gptq-sparsegpt", "seqlen": 64, "c4_documents": 1100, "c4_max_tokens": None,
                                         "unk_as_text": True},
           "ppl": {"wikitext2": wikitext2, "c4": c4}, "eval": {}, "timing": {"eval_s": {}}}
    if kind == "compressed":
        res |= {"config": {"grouping": "uniform", "wbits": 3, "sparsity": 0.0}, "storage": {"bits_per_param_disk_quantized": size}}
    path.write_text(json.dumps(res))
    return path


def test_points_and_domination():
    refs = [{"name": "r", "size": 3.2, "ppl": {"wikitext2": 117.0, "c4": 152.3}, "reference": True}]
    better = run_point("a", {"storage": {"bits_per_param_disk_quantized": 3.06}, "ppl": {"wikitext2": 116.7, "c4": 150.6}})
    bigger = run_point("b", {"storage": {"bits_per_param_disk_quantized": 3.3}, "ppl": {"wikitext2": 110.0, "c4": 140.0}})
    worse = run_point("c", {"storage": {"bits_per_param_disk_quantized": 3.0}, "ppl": {"wikitext2": 116.0, "c4": 160.0}})
    assert dominated_by(refs[0], [better, bigger, worse], ("wikitext2", "c4")) == ["a"]
    assert "| **a** | 3.060 |" in frontier_table([better, *refs])


def test_compare_places_runs_beside_references(tmp_path):
    ref = tmp_path / "refs.json"
    ref.write_text(json.dumps({"points": [{"name": "GPTQ 3-bit", "size": 3.064, "ppl": {"wikitext2": 122.06, "c4": 155.03}}]}))
    base = _results(tmp_path / "base.json", None, 111.1, 146.2, kind="baseline")
    run = _results(tmp_path / "run.json", 3.06, 116.7, 150.6)
    out = compare(base, [run], tmp_path / "report", reference=ref)
    assert out["frontier"]["beaten_by"]["GPTQ 3-bit"] and (tmp_path / "report" / "report.html").is_file()
    assert "Perplexity against honest size" in (tmp_path / "report" / "report.md").read_text()


def test_a_bad_reference_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "refs.json"
    bad.write_text('{"points": [{"name": "x"}]}')
    with pytest.raises(MisqError, match="not a reference-points JSON"):
        load_reference_points(bad)


def test_a_packed_checkpoints_own_eval_compares_with_its_baseline(tmp_path):
    """misq eval of the saved checkpoint names the checkpoint, but records the model it came from:
    the README's baseline-then-packed comparison must not warn that the models differ."""
    base = _results(tmp_path / "base.json", None, 111.1, 146.2, kind="baseline")
    packed = json.loads(_results(tmp_path / "p.json", 3.06, 116.7, 150.6).read_text())
    packed["model"] = {"name_or_path": "packed/m", "compressed_from": "m"}
    (tmp_path / "p.json").write_text(json.dumps(packed))
    out = compare(base, [tmp_path / "p.json"], tmp_path / "report")
    assert not [w for w in out["runs"][0]["warnings"] if "model differs" in w]
    packed["model"] = {"name_or_path": "packed/m", "compressed_from": "other"}
    (tmp_path / "p.json").write_text(json.dumps(packed))
    out = compare(base, [tmp_path / "p.json"], tmp_path / "report2")
    assert [w for w in out["runs"][0]["warnings"] if "model differs" in w]


def test_dominated_by_can_allow_a_dataset_some_slack():
    ref = {"name": "r", "size": 3.0, "ppl": {"wikitext2": 10.0, "c4": 20.0, "ptb": 30.0}}
    a = {"name": "a", "size": 2.9, "ppl": {"wikitext2": 9.0, "c4": 19.0, "ptb": 30.5}}  # PTB +1.7%
    b = {"name": "b", "size": 2.9, "ppl": {"wikitext2": 9.0, "c4": 19.0, "ptb": 31.0}}  # PTB +3.3%
    assert dominated_by(ref, [a, b], ("wikitext2", "c4")) == ["a", "b"]
    assert dominated_by(ref, [a, b], ("wikitext2", "c4"), within={"ptb": 0.02}) == ["a"]
