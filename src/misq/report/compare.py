"""Compare compressed runs against an FP16 baseline: numbers, verdict and suggestions.

:func:`compare` loads the results files, builds one comparison dict (what
``comparison_results.json`` holds) and renders ``report.md`` and ``report.html`` from that
dict alone (see :mod:`misq.report.html`), so every number in a report is a number in the JSON.

Each run is read against the baseline by :func:`misq.report.run_analysis.analyse_run`. Derived
percentages (retention, change, budget gap) are rounded there, once, to the precision the reports
print; the verdict rules test those same rounded numbers, so a report never shows "90.00%" next
to a FAIL.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import misq
from misq.atomic import _json_default, atomic_write_all
from misq.errors import MisqError
from misq.report.advice import BUDGET_TOLERANCE, VERDICT_DATASETS, verdict_datasets
from misq.report.frontier import FRONTIER_DATASETS, dominated_by, frontier_png, load_reference_points, run_point
from misq.report.labels import dedupe_labels
from misq.report.run_analysis import (
    DATASET_ORDER,
    analyse_run,
    datasets_of,
    eval_seconds,
    ppl_of,
    seqlen_of,
)
from misq.report.tasks import generations_comparison
from misq.runs.rundir import RESULTS_FILE, iso_utc

log = logging.getLogger(__name__)



def load_results(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Read a misq results file (or a run directory holding ``results.json``)."""
    p = Path(path)
    if p.is_dir():
        if not (p / RESULTS_FILE).is_file():
            raise MisqError(f"{p} is a directory without {RESULTS_FILE}: pass a results file written by misq compress or misq eval")
        p = p / RESULTS_FILE
    if not p.is_file():
        raise MisqError(f"results file {p} does not exist: pass the results.json written by misq compress or misq eval")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MisqError(f"{p} is not misq results JSON ({err}): pass a results file written by misq compress or misq eval") from None
    if not isinstance(data, dict) or not ({"ppl", "eval"} & data.keys()):
        raise MisqError(f"{p} is not a misq results file (no 'ppl' or 'eval' section): pass a file written by misq compress or misq eval")
    for key, kinds in _SECTION_TYPES.items():
        value = data.get(key)
        if value is not None and not isinstance(value, kinds):
            raise MisqError(f"{p} is damaged ({key!r} is a JSON {type(value).__name__}): pass a results file written by "
                            "misq compress or misq eval")
    for key in ("ppl", "eval"):
        for name, value in (data.get(key) or {}).items():
            if key == "ppl" and (isinstance(value, bool) or not isinstance(value, (int, float, type(None)))):
                raise MisqError(f"{p} is damaged (ppl {name!r} is not a number): pass a results file written by misq")
            if key == "eval" and not isinstance(value, (dict, type(None))):
                raise MisqError(f"{p} is damaged (eval {name!r} is not an object): pass a results file written by misq")
    return p, data


# The JSON type of each section that the comparison reads, when present.
_SECTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "kind": str, "model": dict, "protocol": dict, "config": dict, "ppl": dict, "eval": dict, "timing": dict,
    "sparsity": dict, "storage": dict, "bits": dict, "layers": list, "memory": dict, "saved": dict,
    "zeroshot": dict, "generations": dict,
}


def compare(
    baseline_path: str | os.PathLike,
    results_paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    retention_threshold: float = 0.9,
    overwrite: bool = False,
    reference: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compare compressed results against a baseline and write the three report files.

    Writes ``comparison_results.json``, ``report.md`` and a self-contained ``report.html``
    into ``out_dir`` (all three or none) and returns the dict the JSON holds. ``out_dir`` must
    be new, empty or an earlier misq report (``overwrite``: any folder), checked before any work.
    """
    from misq.ownership import REPORT, check_not_input, check_output_folder, claim_folder

    check_output_folder(out_dir, REPORT, "--out", overwrite=overwrite)
    for p in [baseline_path, *results_paths]:
        check_not_input(out_dir, {"an input": p}, "--out")
    if not results_paths:
        raise MisqError("no compressed results given: pass at least one results.json from misq compress")
    if not 0.0 < retention_threshold <= 1.0:
        raise MisqError(f"retention threshold {retention_threshold} is outside (0, 1]: give a fraction, e.g. 0.9 for 90%")
    refs = load_reference_points(reference) if reference is not None else None  # a bad file: before any work
    baseline = load_results(baseline_path)
    runs = [load_results(p) for p in results_paths]
    # Imported here: the renderers pull in matplotlib, which analysis alone does not need.
    from misq.report.html import render_html, render_markdown
    from misq.report.plots import make_plots

    try:
        comparison = build_comparison(baseline, runs, retention_threshold=retention_threshold)
        plots = make_plots(comparison)
        if refs is not None:
            comparison["frontier"] = _frontier(comparison, runs, refs, str(reference))
            plots["frontier"] = frontier_png(comparison["frontier"]["points"])
        texts = {"comparison_results.json": json.dumps(comparison, indent=2, default=_json_default) + "\n",
                 "report.md": render_markdown(comparison, plots), "report.html": render_html(comparison, plots)}
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as err:
        names = ", ".join(str(p) for p in [baseline[0], *(r[0] for r in runs)])
        raise MisqError(f"cannot compare {names}: a field has an unexpected type or value ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); the file is damaged: use a results file "
                        "written by misq compress or misq eval") from None
    out = claim_folder(out_dir, REPORT)
    try:
        atomic_write_all({out / name: text.encode("utf-8") for name, text in texts.items()})
    except OSError as err:  # one that atomic_write_all did not word itself
        raise MisqError(f"cannot write the report into {str(out)!r} ({err.strerror or err}): nothing was changed there; "
                        "check the folder and try again") from None
    log.info("wrote comparison_results.json, report.md and report.html to %s", out)
    return comparison


def _frontier(comparison: dict[str, Any], runs: list[tuple[Path, dict[str, Any]]], refs: list[dict[str, Any]],
              reference: str) -> dict[str, Any]:
    """The runs as points of honest size and PPL beside the reference points (``--reference``)."""
    points = []
    for run, (_path, res) in zip(comparison["runs"], runs):
        point = run_point(run["label"], res)
        if point is not None:
            points.append(point)
    beaten = {r["name"]: dominated_by(r, points, ("wikitext2", "c4")) for r in refs}
    return {"reference": reference, "datasets": list(FRONTIER_DATASETS), "points": points + refs, "beaten_by": beaten}


def build_comparison(
    baseline: tuple[Path, dict[str, Any]],
    runs: list[tuple[Path, dict[str, Any]]],
    *,
    retention_threshold: float = 0.9,
) -> dict[str, Any]:
    """The comparison dict for already-loaded ``(path, results)`` pairs."""
    base_path, base = baseline
    warnings: list[str] = []
    if base.get("kind") not in (None, "baseline"):
        warnings.append(f"the baseline file {base_path} has kind {base.get('kind')!r}, not 'baseline': retention is measured against it anyway")
    threshold_pct = round(100 * retention_threshold, 2)  # one rounding, shared by text and rules
    judged = verdict_datasets(datasets_of(base))
    analysed = [analyse_run(p, r, base, threshold_pct, judged) for p, r in runs]
    dedupe_labels(analysed, [p for p, _ in runs])
    primary, reason = _pick_primary(analysed)
    zeroshot_rule = [f"mean zero-shot accuracy retention >= {threshold_pct:g}% (retention = compressed / baseline "
                     "mean accuracy over the tasks both files measured alike)"] if any(r["zeroshot"] for r in analysed) else []
    return {
        "misq_version": misq.__version__,
        "kind": "comparison",
        "created": iso_utc(time.time()),
        "rules": {
            "retention_threshold_pct": threshold_pct,
            "budget_tolerance_bits": BUDGET_TOLERANCE,
            "verdict_datasets": list(judged),
            "text": [
                f"budget met: |actual - target average bits| <= {BUDGET_TOLERANCE} (not applicable to uniform precision)",
                *(f"retention on {ds} >= {threshold_pct:g}% (retention = baseline PPL / compressed PPL)" for ds in judged),
                *zeroshot_rule,
                "PASS when every applicable rule holds; FAIL when any fails; INCOMPLETE when none fails but a number is missing or not comparable",
            ],
        },
        "baseline": {
            "path": str(base_path),
            "model": (base.get("model") or {}).get("name_or_path"),
            "parameters": (base.get("model") or {}).get("parameters"),
            "dtype": (base.get("model") or {}).get("dtype", "float16"),
            "seqlen": seqlen_of(base),
            "ppl": {ds: ppl_of(base, ds) for ds in datasets_of(base)},
            "eval_s": eval_seconds(base),
        },
        "primary": primary,
        "primary_reason": reason,
        # The headline for the CLI: the primary run's verdict, and every run's status.
        "verdict": {"status": analysed[primary]["verdict"]["status"], "run": analysed[primary]["label"],
                    "summary": analysed[primary]["verdict"]["summary"],
                    "per_run": {r["label"]: r["verdict"]["status"] for r in analysed}},
        "warnings": warnings + [f"{r['label']}: {w}" for r in analysed for w in r["warnings"]],
        "runs": analysed,
        # What each model generated for the recorded prompts (None: no file recorded any).
        "generations": generations_comparison(base, [(r["label"], res) for r, (_, res) in zip(analysed, runs)]),
    }


def _pick_primary(runs: list[dict[str, Any]]) -> tuple[int, str]:
    """Index of the run the detailed sections describe: the best mean retention."""
    if len(runs) == 1:
        return 0, "the only run"

    def score(run: dict[str, Any]) -> float:
        values = [e["retention_pct"] for e in run["perplexity"].values() if e["retention_pct"] is not None and e["comparable"]]
        return statistics.fmean(values) if values else -math.inf

    scores = [score(r) for r in runs]
    best = max(range(len(runs)), key=lambda i: (scores[i], -i))  # ties: the earlier run
    if scores[best] == -math.inf:
        return 0, f"the first of {len(runs)} runs (no comparable perplexities to rank them)"
    return best, f"the best mean perplexity retention ({scores[best]:.2f}%) of {len(runs)} runs"


__all__ = ["BUDGET_TOLERANCE", "DATASET_ORDER", "VERDICT_DATASETS", "build_comparison", "compare", "load_results"]
