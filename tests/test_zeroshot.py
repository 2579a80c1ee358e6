"""Zero-shot accuracy through lm-evaluation-harness: tasks, results section, report, errors.

The end-to-end tests run a task defined from local files (these machines cannot download the
standard tasks) and skip, saying why, where lm-eval is not installed (``pip install -e .[eval]``).
The rest needs no lm-eval.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_report import BASELINE, make_run

from misq.config import TASK_PRESETS, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.protocol import zeroshot
from misq.report.compare import build_comparison
from misq.report.html import render_markdown

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install -e .[eval])")

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{goal}}}}"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str = "toy_choice", rows: int = 8, data: Path | None = None) -> Path:
    """A two-choice task on a local JSON-lines file, as lm-eval's YAML task format defines it."""
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"goal": f"The cat sees number {i}", "sol1": "a red ball.",
                                            "sol2": "the green house.", "label": i % 2}) + "\n" for i in range(rows)))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return folder


def test_task_presets_and_parsing():
    assert EvalConfig(tasks="paper").tasks == TASK_PRESETS["paper"]
    assert EvalConfig(tasks="piqa,paper,piqa").tasks[0] == "piqa" and len(EvalConfig(tasks="piqa,paper").tasks) == 6
    assert EvalConfig().tasks == () and EvalConfig(datasets="none").datasets == ()
    with pytest.raises(MisqError, match="num-fewshot"):
        EvalConfig(num_fewshot=-1)
    with pytest.raises(MisqError, match="task-batch-size"):
        EvalConfig(task_batch_size="many")


def test_cli_flags(monkeypatch):
    from misq.cli import build_parser, cfg_from_args

    args = build_parser().parse_args(["eval", "m", "--tasks", "paper", "--num-fewshot", "5", "--prompts", "none"])
    cfg = cfg_from_args(EvalConfig, args)
    assert cfg.tasks == TASK_PRESETS["paper"] and cfg.num_fewshot == 5 and cfg.prompts == "none"
    args = build_parser().parse_args(["compress", "m", "--eval-tasks", "piqa", "--task-limit", "10"])
    assert args.tasks == "piqa" and args.task_limit == 10


def test_summarize_labels_acc_and_acc_norm_with_stderr():
    out = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.78, "acc_stderr,none": 0.01, "acc_norm,none": 0.79,
                                "acc_norm_stderr,none": 0.011},
                       "boolq": {"acc,none": 0.7, "acc_stderr,none": "N/A"}},
           "versions": {"piqa": 1.0, "boolq": 2}, "n-shot": {"piqa": 0, "boolq": 0},
           "n-samples": {"piqa": {"original": 1838, "effective": 1838}, "boolq": {"original": 3270, "effective": 3270}}}
    section = zeroshot.summarize(out, num_fewshot=0, limit=None)
    assert section["harness"]["name"] == "lm-evaluation-harness"
    assert section["tasks"]["piqa"] == {"version": "1.0", "num_fewshot": 0, "samples": 1838, "metrics": {
        "acc": {"value": 0.78, "stderr": 0.01}, "acc_norm": {"value": 0.79, "stderr": 0.011}}}
    assert section["tasks"]["boolq"]["metrics"] == {"acc": {"value": 0.7, "stderr": None}}


def test_missing_lm_eval_is_one_clear_line(monkeypatch):
    from misq.jobs import extras

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(MisqError, match=r"pip install 'misq\[eval\]'") as err:
        extras.check(EvalConfig(datasets="none", tasks="piqa"))
    assert "\n" not in str(err.value)
    extras.check(EvalConfig(datasets="none"))  # no tasks: lm-eval is never needed


def zs(acc: dict[str, float], stderr: float = 0.01, **extra) -> dict:
    return {"harness": {"name": "lm-evaluation-harness", "version": "0.4.13"}, "num_fewshot": 0, "limit": None, **extra,
            "tasks": {t: {"version": "1.0", "num_fewshot": 0, "samples": 1000, "metrics": {
                "acc": {"value": v, "stderr": stderr}, "acc_norm": {"value": v + 0.01, "stderr": stderr}}}
                for t, v in acc.items()}}


def test_compare_shows_accuracy_change_retention_and_mean():
    base = copy.deepcopy(BASELINE) | {"zeroshot": zs({"piqa": 0.78, "hellaswag": 0.56})}
    run = make_run(zeroshot=zs({"piqa": 0.76, "hellaswag": 0.50}))
    c = build_comparison((Path("b.json"), base), [(Path("r.json"), run)])
    z = c["runs"][0]["zeroshot"]
    assert z["tasks"]["piqa"]["metric"] == "acc" and z["tasks"]["hellaswag"]["metric"] == "acc_norm"
    assert z["tasks"]["piqa"]["change_pts"] == -2.0 and z["tasks"]["piqa"]["retention_pct"] == round(100 * 76 / 78, 2)
    assert z["tasks"]["hellaswag"]["baseline"] == 57.0 and z["tasks"]["hellaswag"]["compressed"] == 51.0
    assert z["mean"]["baseline"] == 67.5 and z["mean"]["compressed"] == 63.5 and z["mean"]["change_pts"] == -4.0
    rule = next(r for r in c["runs"][0]["verdict"]["rules"] if r["id"] == "retention_zeroshot")
    assert rule["status"] == "pass" and rule["value"] == round(100 * 63.5 / 67.5, 2)
    ids = [s["id"] for s in c["runs"][0]["suggestions"]]
    assert "zeroshot_drop_hellaswag" in ids and "zeroshot_drop_piqa" not in ids  # -2.0 is not beyond max(2, 2.83)
    md = render_markdown(c)
    assert "Zero-shot accuracy" in md and "mean of 2 task(s)" in md and "56.00 ± 1.00" in md and "-4.00" in md


def test_verdict_fails_or_is_incomplete_on_zeroshot():
    base = copy.deepcopy(BASELINE) | {"zeroshot": zs({"piqa": 0.80})}
    broken = make_run(zeroshot=zs({"piqa": 0.50}))
    c = build_comparison((Path("b.json"), base), [(Path("r.json"), broken)])
    assert c["runs"][0]["verdict"]["status"] == "FAIL"
    missing = make_run()
    c = build_comparison((Path("b.json"), base), [(Path("r.json"), missing)])
    assert c["runs"][0]["verdict"]["status"] == "INCOMPLETE"
    assert any("zero-shot" in w for w in c["warnings"])
    skipped = make_run(zeroshot=zs({}, skipped="the model is streamed"))
    c = build_comparison((Path("b.json"), base), [(Path("r.json"), skipped)])
    assert "zeroshot_skipped" in [s["id"] for s in c["runs"][0]["suggestions"]]
    # Files without zero-shot results: no rule, nothing changes.
    c = build_comparison((Path("b.json"), copy.deepcopy(BASELINE)), [(Path("r.json"), make_run())])
    assert c["runs"][0]["zeroshot"] is None and c["runs"][0]["verdict"]["status"] == "PASS"


def test_unlike_tasks_are_not_averaged():
    base = copy.deepcopy(BASELINE) | {"zeroshot": zs({"piqa": 0.78, "boolq": 0.7})}
    run = make_run(zeroshot=zs({"piqa": 0.77, "boolq": 0.69}))
    run["zeroshot"]["tasks"]["boolq"]["num_fewshot"] = 5
    c = build_comparison((Path("b.json"), base), [(Path("r.json"), run)])
    assert c["runs"][0]["zeroshot"]["mean"]["tasks"] == ["piqa"]
    assert any("boolq was not measured alike" in w for w in c["warnings"])


# --------------------------------------------------------------------------- with lm-eval


@needs_lm_eval
def test_eval_runs_a_local_task_and_records_it(tiny_checkpoint, tiny_corpus_file, tmp_path):
    from misq import jobs

    tasks = write_task(tmp_path / "tasks")
    out = tmp_path / "results.json"
    cfg = EvalConfig(datasets=(str(tiny_corpus_file),), tasks="toy_choice", task_dir=str(tasks), prompts="none")
    results = jobs.run_eval(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp_path)),
                            cfg, str(out))
    z = json.loads(out.read_text())["zeroshot"]
    assert z == results["zeroshot"]
    assert z["harness"]["version"] == zeroshot.harness_version() and z["num_fewshot"] == 0
    task = z["tasks"]["toy_choice"]
    assert task["version"] == "1.0" and task["samples"] == 8
    assert set(task["metrics"]) == {"acc", "acc_norm"}
    assert all(0 <= m["value"] <= 1 and m["stderr"] is not None for m in task["metrics"].values())
    assert "generations" not in results and str(tiny_corpus_file) in results["ppl"]  # --prompts none: none recorded


@needs_lm_eval
def test_unknown_task_and_unreachable_data_are_one_line(tmp_path):
    from misq.jobs import extras

    tasks = write_task(tmp_path / "tasks", name="toy_gone", data=tmp_path / "missing.jsonl")
    with pytest.raises(MisqError, match="HF_DATASETS_CACHE") as err:
        extras.check(EvalConfig(datasets="none", tasks="toy_gone", task_dir=str(tasks)))
    assert "\n" not in str(err.value)
    with pytest.raises(MisqError, match="no task 'toy_nonesuch'"):
        zeroshot.task_manager(("toy_nonesuch",), str(tasks))
