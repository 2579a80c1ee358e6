"""`misq compare`: numbers, verdict, suggestions and the three report files."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from misq.errors import MisqError
from misq.report.compare import build_comparison, compare, load_results
from misq.report.html import render_markdown

BASELINE = {
    "misq_version": "0.1.0", "kind": "baseline", "created": "2026-11-21T17:00:00Z",
    "model": {"name_or_path": "llama-7b", "parameters": 6_738_415_616, "dtype": "float16"},
    "protocol": {"name": "gptq-sparsegpt", "seqlen": 2048, "c4_documents": 1100, "c4_max_tokens": 524288, "unk_as_text": True},
    "ppl": {"wikitext2": 100.0, "ptb": 200.0, "c4": 50.0},
    "eval": {"wikitext2": {"ppl": 100.0, "seqlen": 2048, "seconds": 30.0}},
    "timing": {"eval_s": {"wikitext2": 30.0, "ptb": 10.0, "c4": 40.0}},
}  # fmt: skip


def make_run(**changes) -> dict:
    """A healthy compressed run (PASS, no suggestions); ``changes`` patch top-level sections."""
    layers = [{"name": f"model.layers.{i}.mlp.down_proj", "rel_error": 0.010 + 0.001 * (i % 3), "sparsity": 0.5,
               "avg_bits": 4.0, "solve_s": 0.5} for i in range(12)]  # fmt: skip
    run = {
        "misq_version": "0.1.0", "kind": "compressed",
        "model": {"name_or_path": "llama-7b"},
        "protocol": dict(BASELINE["protocol"]),
        "config": {"dataset": "c4", "nsamples": 128, "seed": 0, "sparsity": 0.5, "prunen": 0, "prunem": 0, "grouping": "mi",
                   "wbits": 4, "n_groups": 10, "target_avg_bits": 4.0, "bits": [2, 3, 4, 6, 8], "budget": "layer",
                   "refine_passes": 4},
        "ppl": {"wikitext2": 105.0, "ptb": 210.0, "c4": 52.0},
        "timing": {"compress_s": 640.0, "eval_s": {"wikitext2": 12.3, "ptb": 5.0, "c4": 20.0}},
        "bits": {"target_avg_bits": 4.0, "actual_avg_bits": 4.003, "exact": True, "histogram": {
            "2": {"channels": 10, "channel_share": 0.1, "weights": 1000, "weight_share": 0.1},
            "4": {"channels": 60, "channel_share": 0.6, "weights": 6000, "weight_share": 0.6},
            "8": {"channels": 30, "channel_share": 0.3, "weights": 3000, "weight_share": 0.3}}},
        "sparsity": {"target": 0.5, "actual": 0.5, "pattern": "unstructured"},
        "storage": {"avg_channel_bits": 4.003, "bits_per_stored_weight": 4.253, "bits_per_param_disk_quantized": 3.27,
                    "bits_per_param_disk_model": 3.6, "compression_ratio_quantized": 4.893, "compression_ratio_model": 4.444,
                    "bytes_quantized": 2_000_000_000, "bytes_model": 3_000_000_000, "bytes_fp16_model": 13_476_831_232},
        "layers": layers,
    }  # fmt: skip
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(run.get(key), dict):
            run[key] = {**run[key], **value}
        else:
            run[key] = value
    return run


@pytest.fixture
def no_plots(monkeypatch):
    """Skip drawing where a test is about numbers or files, not pictures (plots cost ~1 s)."""
    monkeypatch.setattr("misq.report.plots.make_plots", lambda comparison: {})


def analyse(run: dict, baseline: dict = BASELINE, threshold: float = 0.9) -> dict:
    comparison = build_comparison((Path("base.json"), baseline), [(Path("run.json"), run)], retention_threshold=threshold)
    return comparison["runs"][0]


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def md_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text`` as a list of {header: cell} rows."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            def split(line):
                return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

            headers, rows, i = split(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(headers, split(lines[i]))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def table_with(text: str, header: str) -> list[dict[str, str]]:
    return next(t for t in md_tables(text) if t and header in t[0])


def as_float(cell: str) -> float:
    return float(re.match(r"[+-]?[\d.]+", cell.replace(",", "")).group())


# --------------------------------------------------------------------------- numbers


def test_retention_and_change_on_hand_made_numbers():
    run = analyse(make_run(ppl={"wikitext2": 125.0, "ptb": 200.0, "c4": 40.0}))
    assert run["perplexity"]["wikitext2"]["retention_pct"] == 80.0
    assert run["perplexity"]["wikitext2"]["change_pct"] == 25.0
    assert run["perplexity"]["ptb"]["retention_pct"] == 100.0 and run["perplexity"]["ptb"]["change_pct"] == 0.0
    assert run["perplexity"]["c4"]["retention_pct"] == 125.0 and run["perplexity"]["c4"]["change_pct"] == -20.0


def test_ratios_given_or_derived_from_bits_per_param():
    assert analyse(make_run())["compression"]["compression_ratio_model"] == 4.444
    storage = {k: v for k, v in make_run()["storage"].items() if not k.startswith("compression_ratio")}
    storage["bits_per_param_disk_quantized"] = 3.2
    run = make_run()
    run["storage"] = storage  # replaced, not merged: the ratios are absent
    comp = analyse(run)["compression"]
    assert comp["compression_ratio_quantized"] == pytest.approx(5.0)  # 16 / 3.2
    assert comp["compression_ratio_model"] == pytest.approx(16 / 3.6, abs=1e-4)


def test_report_numbers_equal_the_json(tmp_path):
    base = write(tmp_path / "base.json", BASELINE)
    run = write(tmp_path / "run" / "results.json", make_run(ppl={"wikitext2": 125.0, "ptb": 230.0, "c4": 53.3}))
    c = compare(base, [run], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "comparison_results.json").read_text()) == json.loads(json.dumps(c))
    md = (tmp_path / "out" / "report.md").read_text()
    html = (tmp_path / "out" / "report.html").read_text()
    r = c["runs"][0]

    ppl = table_with(md, "Retention")
    assert [row["Dataset"] for row in ppl] == ["wikitext2", "ptb", "c4"]
    for row in ppl:
        e = r["perplexity"][row["Dataset"]]
        assert as_float(row["Baseline PPL"]) == pytest.approx(e["baseline"], abs=0.005)
        assert as_float(row["Compressed PPL"]) == pytest.approx(e["compressed"], abs=0.005)
        assert as_float(row["Retention"]) == e["retention_pct"]  # rounded once, in the JSON
        assert as_float(row["Change"]) == e["change_pct"]
    assert ppl[0]["Retention"] == "80.00%" and ppl[0]["Change"] == "+25.00%"

    metrics = {row["Metric"]: row["Value"] for row in table_with(md, "Metric")}
    comp = r["compression"]
    assert as_float(metrics["Average channel bits"]) == pytest.approx(comp["avg_channel_bits"], abs=5e-4)
    assert as_float(metrics["Bits per stored weight (with scales and zero points)"]) == pytest.approx(comp["bits_per_stored_weight"], abs=5e-4)
    assert as_float(metrics["Bits per parameter on disk, whole model"]) == pytest.approx(comp["bits_per_param_disk_model"], abs=5e-4)
    assert as_float(metrics["Compression ratio vs FP16, quantized layers"]) == pytest.approx(comp["compression_ratio_quantized"], abs=5e-3)
    assert as_float(metrics["Compression ratio vs FP16, whole model"]) == pytest.approx(comp["compression_ratio_model"], abs=5e-3)
    assert f"({comp['bytes_model']:,} B)" in metrics["Size of whole model"] and "GiB" in metrics["Size of whole model"]
    hist = table_with(md, "Weight share")
    assert [int(h["Width"]) for h in hist] == [h["width"] for h in comp["histogram"]]
    assert [as_float(h["Weight share"]) for h in hist] == [100 * h["weight_share"] for h in comp["histogram"]]

    # The HTML shows the same formatted numbers as the Markdown.
    for row in ppl + hist:
        for cell in row.values():
            assert cell in html


def test_html_is_self_contained(tmp_path):
    base = write(tmp_path / "base.json", BASELINE)
    run = write(tmp_path / "run.json", make_run())
    compare(base, [run], tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    srcs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html and "http://" not in html and "https://" not in html


# --------------------------------------------------------------------------- verdict


def test_verdict_pass():
    v = analyse(make_run())["verdict"]
    assert v["status"] == "PASS" and {r["status"] for r in v["rules"]} == {"pass"}


def test_verdict_fails_on_budget_and_names_the_rule():
    v = analyse(make_run(bits={"actual_avg_bits": 4.05}))["verdict"]
    assert v["status"] == "FAIL"
    assert [r["id"] for r in v["rules"] if r["status"] == "fail"] == ["budget"]
    assert "4.0500" in v["summary"]


def test_verdict_fails_on_retention_with_exact_threshold():
    # 100 / 111.12 = 89.99% fails; 100 / 111.11 = 90.00% holds (the rule compares the shown number).
    assert analyse(make_run(ppl={"wikitext2": 111.12, "c4": 52.0}))["verdict"]["status"] == "FAIL"
    assert analyse(make_run(ppl={"wikitext2": 111.11, "c4": 52.0}))["verdict"]["status"] == "PASS"
    v = analyse(make_run(ppl={"wikitext2": 105.0, "c4": 60.0}), threshold=0.95)["verdict"]
    assert v["status"] == "FAIL" and "retention on c4 >= 95%" in v["summary"]


def test_verdict_judges_a_users_own_text_when_no_standard_dataset_was_evaluated():
    # misq demo (and any user with only their own text): judge that text, not missing wikitext2/c4.
    base = dict(BASELINE, ppl={"heldout.txt": 3.0}, eval={}, timing={})
    ok = make_run(ppl={"heldout.txt": 3.1})
    comparison = build_comparison((Path("base.json"), base), [(Path("run.json"), ok)])
    assert comparison["rules"]["verdict_datasets"] == ["heldout.txt"]
    v = comparison["runs"][0]["verdict"]
    assert v["status"] == "PASS" and [r["id"] for r in v["rules"]] == ["budget", "retention_heldout.txt"]
    bad = make_run(ppl={"heldout.txt": 4.0})  # 75% retention
    assert analyse(bad, baseline=base)["verdict"]["status"] == "FAIL"
    # With wikitext2 in the baseline the standard pair is judged, and a missing c4 stays INCOMPLETE.
    only_wikitext2 = make_run()
    only_wikitext2["ppl"] = {"wikitext2": 105.0}
    assert analyse(only_wikitext2)["verdict"]["status"] == "INCOMPLETE"


def test_verdict_incomplete_and_uniform():
    run = make_run()
    run["ppl"] = {"wikitext2": 105.0}
    v = analyse(run)["verdict"]
    assert v["status"] == "INCOMPLETE" and "no c4 perplexity" in v["summary"]
    uniform = make_run(config={"grouping": "uniform"}, bits={"target_avg_bits": None, "actual_avg_bits": 4.0})
    v = analyse(uniform)["verdict"]
    assert v["status"] == "PASS" and v["rules"][0]["status"] == "n/a"


def test_diverged_run_fails():
    run = analyse(make_run(ppl={"wikitext2": float("nan"), "c4": float("inf")}))
    assert run["perplexity"]["c4"]["retention_pct"] == 0.0 and run["verdict"]["status"] == "FAIL"


def test_seqlen_mismatch_warns_instead_of_crashing(tmp_path, no_plots):
    base = write(tmp_path / "base.json", BASELINE)
    run = write(tmp_path / "run.json", make_run(protocol={"seqlen": 4096}))
    c = compare(base, [run], tmp_path / "out")
    assert c["runs"][0]["comparable"] is False and c["runs"][0]["verdict"]["status"] == "INCOMPLETE"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "seqlen differs (baseline 2048, run 4096)" in md and "NOT comparable" in md
    assert "seqlen differs" in (tmp_path / "out" / "report.html").read_text()


# --------------------------------------------------------------------------- suggestions


def ids(run: dict) -> list[str]:
    return [s["id"] for s in analyse(run)["suggestions"]]


def test_no_suggestions_for_a_healthy_run():
    assert ids(make_run()) == []
    md = render_markdown(build_comparison((Path("b"), BASELINE), [(Path("r"), make_run())]))
    assert "None: no check triggered" in md


def test_each_suggestion_appears_only_when_triggered():
    assert ids(make_run(bits={"actual_avg_bits": 4.2})) == ["budget_missed"]
    assert ids(make_run(config={"nsamples": 32})) == ["few_samples"]
    assert ids(make_run(ppl={"wikitext2": 105.0, "ptb": 260.0, "c4": 52.0})) == ["dataset_degrades_ptb"]
    assert ids(make_run(storage={"bits_per_stored_weight": 4.6})) == ["scale_overhead"]
    assert ids(make_run(sparsity={"actual": 0.45})) == ["sparsity_missed"]
    assert ids(make_run(config={"refine_passes": 0})) == ["refine_off"]
    assert ids(make_run(config={"refine_passes": 0, "sparsity": 0.0}, sparsity={"target": 0.0, "actual": 0.0})) == []
    top = {"2": {"weight_share": 0.1}, "4": {"weight_share": 0.3}, "8": {"weight_share": 0.6}}
    assert ids(make_run(bits={"histogram": top})) == ["saturated_top"]
    bottom = {"2": {"weight_share": 0.7}, "4": {"weight_share": 0.1}, "8": {"weight_share": 0.2}}
    assert ids(make_run(bits={"histogram": bottom})) == ["saturated_bottom"]
    layers = make_run()["layers"]
    layers[7]["rel_error"] = 0.3
    assert ids(make_run(layers=layers)) == ["layer_outlier"]


def test_suggestions_quote_the_numbers_that_triggered_them():
    s = {x["id"]: x for x in analyse(make_run(bits={"actual_avg_bits": 4.2}, config={"nsamples": 32}))["suggestions"]}
    assert "+0.2000" in s["budget_missed"]["text"] and "+0.2000" in s["budget_missed"]["trigger"]
    assert "32" in s["few_samples"]["trigger"]
    layers = make_run()["layers"]
    layers[7]["rel_error"] = 0.3
    s = analyse(make_run(layers=layers))["suggestions"][0]
    assert "model.layers.7.mlp.down_proj" in s["text"] and "0.3" in s["trigger"]
    s = analyse(make_run(ppl={"wikitext2": 105.0, "ptb": 260.0, "c4": 52.0}))["suggestions"][0]
    assert "+30.00%" in s["trigger"] and "+5.00%" in s["trigger"] and "calibration used c4" in s["text"]


# --------------------------------------------------------------------------- several runs


def test_multi_run_table_and_primary(tmp_path, no_plots):
    base = write(tmp_path / "base.json", BASELINE)
    paths = [
        write(tmp_path / "k10" / "results.json", make_run()),
        write(tmp_path / "k5" / "results.json", make_run(config={"n_groups": 5}, ppl={"wikitext2": 101.0, "ptb": 202.0, "c4": 51.0})),
        write(tmp_path / "u4.json", make_run(config={"grouping": "uniform", "sparsity": 0.0}, sparsity={"target": 0.0, "actual": 0.0, "pattern": "none"},
                                           ppl={"wikitext2": 130.0, "ptb": 250.0, "c4": 60.0})),
        write(tmp_path / "k10b" / "results.json", make_run(config={"seed": 1})),
    ]  # fmt: skip
    c = compare(base, paths, tmp_path / "out")
    labels = [r["label"] for r in c["runs"]]
    assert labels[:3] == ["mi K=10 4.0b layer +50% (k10)", "mi K=5 4.0b layer +50%", "uniform 4b"]
    assert labels[3] == "mi K=10 4.0b layer +50% (k10b)"  # same config, told apart by folder
    assert c["primary"] == 1 and "best mean perplexity retention" in c["primary_reason"]

    md = (tmp_path / "out" / "report.md").read_text()
    runs = table_with(md, "Compress time")
    assert [row["Run"] for row in runs] == labels
    assert [row["Verdict"] for row in runs] == [r["verdict"]["status"] for r in c["runs"]] == ["PASS", "PASS", "FAIL", "PASS"]
    for row, r in zip(runs, c["runs"]):
        for ds in ("wikitext2", "ptb", "c4"):
            assert as_float(row[f"{ds} PPL"]) == pytest.approx(r["perplexity"][ds]["compressed"], abs=0.005)
            assert as_float(row[f"{ds} change"]) == r["perplexity"][ds]["change_pct"]
        assert as_float(row["Avg bits"]) == pytest.approx(r["compression"]["actual_avg_bits"], abs=5e-4)
    assert 'Sections 1-6 describe run #2 "mi K=5 4.0b layer +50%"' in md
    assert table_with(md, "Setting")[0].keys() >= {"Baseline", "mi K=5 4.0b layer +50%"}


# --------------------------------------------------------------------------- files and errors


def test_load_errors(tmp_path):
    with pytest.raises(MisqError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    with pytest.raises(MisqError, match="without results.json"):
        load_results(tmp_path)
    (tmp_path / "bad.json").write_text("not json {")
    with pytest.raises(MisqError, match="is not misq results JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(MisqError, match="not a misq results file"):
        load_results(tmp_path / "other.json")
    base = write(tmp_path / "base.json", BASELINE)
    with pytest.raises(MisqError, match="no compressed results"):
        compare(base, [], tmp_path / "out")
    with pytest.raises(MisqError, match="give a fraction"):
        compare(base, [base], tmp_path / "out", retention_threshold=90)
    assert not (tmp_path / "out").exists()


def test_old_files_with_missing_sections():
    baseline = {"ppl": {"wikitext2": 5.68, "c4": 7.34}}
    run = {"kind": "compressed", "ppl": {"wikitext2": 6.1, "c4": 7.9}}
    c = build_comparison((Path("base.json"), baseline), [(Path("old/results.json"), run)])
    r = c["runs"][0]
    assert r["label"] == "old" and r["verdict"]["status"] == "INCOMPLETE"
    assert r["perplexity"]["wikitext2"]["retention_pct"] == round(100 * 5.68 / 6.1, 2)
    assert any("seqlen is not recorded" in w for w in c["warnings"])
    md = render_markdown(c)
    assert "| Average channel bits | — |" in md


def test_compare_is_atomic(tmp_path, monkeypatch, no_plots):
    base = write(tmp_path / "base.json", BASELINE)
    run = write(tmp_path / "run.json", make_run())
    out = tmp_path / "out"
    out.mkdir()
    (out / ".misq-run").write_text('{"kind": "report"}')  # an earlier misq report folder
    (out / "report.md").write_text("old report\n")
    real_replace = os.replace

    def replace_fails_on_report(src, dst):
        if str(dst).endswith("report.md"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_on_report)
    with pytest.raises(MisqError, match="disk full"):
        compare(base, [run], out)
    assert not (out / "report.html").exists()
    # All three or none: no JSON without its report (issue 16), no temp files.
    assert sorted(p.name for p in out.iterdir() if p.name != "report.md" and not p.name.startswith(".report.md")) == [".misq-run"]


def test_baseline_kind_warnings():
    c = build_comparison((Path("b.json"), make_run()), [(Path("r.json"), copy.deepcopy(BASELINE))])
    assert any("has kind 'compressed'" in w for w in c["warnings"])
    assert any("is a baseline file" in w for w in c["warnings"])


def test_labels_for_fractional_targets_nm_patterns_and_same_folders():
    runs = [
        (Path("a/run/results.json"), make_run(config={"target_avg_bits": 3.25}, bits={"target_avg_bits": 3.25, "actual_avg_bits": 3.25})),
        (Path("b/run/results.json"), make_run(config={"prunen": 2, "prunem": 4}, sparsity={"pattern": "2:4"})),
        (Path("c/run/results.json"), make_run(config={"prunen": 2, "prunem": 4}, sparsity={"pattern": "2:4"})),
    ]  # fmt: skip
    c = build_comparison((Path("base.json"), BASELINE), runs)
    assert [r["label"] for r in c["runs"]] == ["mi K=10 3.25b layer +50%", "mi K=10 4.0b layer +2:4 (run) #2", "mi K=10 4.0b layer +2:4 (run) #3"]
    c["primary"] = 1
    assert "| Sparsity & pattern | none (dense) | 50.0% 2:4, actual 50.0% |" in render_markdown(c)


def test_a_run_without_pruning_is_named_by_its_quantization_alone():
    """Sparsity 0 is no pattern: no "+dense" in the label, and the cell says "none (dense)", not "0.0% dense"."""
    run = make_run(config={"sparsity": 0.0}, sparsity={"target": 0.0, "actual": 0.0, "pattern": "dense"})
    uniform = make_run(config={"sparsity": 0.0, "grouping": "uniform"}, sparsity={"target": 0.0, "actual": 0.0, "pattern": "dense"})
    c = build_comparison((Path("base.json"), BASELINE), [(Path("mixed.json"), run), (Path("gptq.json"), uniform)])
    assert [r["label"] for r in c["runs"]] == ["mi K=10 4.0b layer", "uniform 4b"]
    assert all(r["config"]["pattern"] == "dense" and r["config"]["sparsity"] == "none (dense)" for r in c["runs"])
    md = render_markdown(c)
    assert "| Sparsity & pattern | none (dense) | none (dense) |" in md
    assert "dense" not in " ".join(row["Run"] for row in table_with(md, "Run"))
    assert [row["Sparsity"] for row in table_with(md, "Run")] == ["none (dense)", "none (dense)"]
    # A file older than the "pattern" field gets the same words from its config.
    old = make_run(config={"sparsity": 0.0})
    del old["sparsity"]
    assert analyse(old)["label"] == "mi K=10 4.0b layer" and analyse(old)["config"]["sparsity"] == "none (dense)"


def test_run_directory_is_accepted(tmp_path):
    write(tmp_path / "run" / "results.json", make_run())
    path, data = load_results(tmp_path / "run")
    assert path == tmp_path / "run" / "results.json" and data["kind"] == "compressed"


def test_headline_verdict_is_the_primary_runs():
    c = build_comparison((Path("b.json"), BASELINE), [(Path("r1.json"), make_run(bits={"actual_avg_bits": 4.3})), (Path("r2.json"), make_run())])
    assert c["verdict"]["status"] == c["runs"][c["primary"]]["verdict"]["status"]
    assert set(c["verdict"]["per_run"].values()) == {"FAIL", "PASS"}
