"""Compare compressed runs against an FP16 baseline: numbers, verdict and suggestions.

:func:`compare` loads the results files, builds one comparison dict (what
``comparison_results.json`` holds) and renders ``report.md`` and ``report.html`` from that
dict alone (see :mod:`misq.report.html`), so every number in a report is a number in the JSON.

Derived percentages (retention, change, budget gap) are rounded here, once, to the precision
the reports print; the verdict rules test those same rounded numbers, so a report never shows
"90.00%" next to a FAIL.
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

# DATASETS from misq.config, not misq.protocol.data: the same tuple, without importing torch.
from misq.config import DATASETS, sparsity_pattern
from misq.errors import MisqError
from misq.report.advice import (
    BUDGET_TOLERANCE,
    VERDICT_DATASETS,
    suggestions,
    verdict,
    verdict_datasets,
)
from misq.report.frontier import FRONTIER_DATASETS, dominated_by, frontier_png, load_reference_points, run_point
from misq.report.labels import dedupe_labels, run_label, sparsity_text
from misq.report.tasks import generations_comparison, has_zeroshot, zeroshot_comparison
from misq.runs.rundir import RESULTS_FILE, iso_utc

log = logging.getLogger(__name__)

DATASET_ORDER = DATASETS  # the protocol's three, in the order its tables list them
PROTOCOL_KEYS = ("name", "c4_documents", "c4_max_tokens", "unk_as_text")


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
    judged = verdict_datasets(_datasets(base))
    analysed = [_analyse_run(p, r, base, threshold_pct, judged) for p, r in runs]
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
            "seqlen": _seqlen(base),
            "ppl": {ds: _ppl(base, ds) for ds in _datasets(base)},
            "eval_s": _eval_seconds(base),
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


# --------------------------------------------------------------------------- reading fields


def _num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _ppl(res: dict[str, Any], ds: str) -> float | None:
    value = (res.get("ppl") or {}).get(ds)
    if value is None:
        value = ((res.get("eval") or {}).get(ds) or {}).get("ppl")
    return _num(value)


def _diverged(res: dict[str, Any], ds: str) -> bool:
    """Whether a PPL is recorded but is NaN or infinite (the model broke)."""
    value = (res.get("ppl") or {}).get(ds)
    return isinstance(value, (int, float)) and not math.isfinite(value)


def _datasets(*results: dict[str, Any]) -> list[str]:
    """Datasets any of the files evaluated, the protocol's three first in their usual order."""
    names: set[str] = set()
    for res in results:
        names |= set((res.get("ppl") or {}).keys()) | set((res.get("eval") or {}).keys())
    return [d for d in DATASET_ORDER if d in names] + sorted(names - set(DATASET_ORDER))


def _seqlen(res: dict[str, Any]) -> int | None:
    for source in (res.get("protocol") or {}, res.get("config") or {}):
        if isinstance(source.get("seqlen"), int):
            return source["seqlen"]
    for entry in (res.get("eval") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("seqlen"), int):
            return entry["seqlen"]
    return None


def _eval_seconds(res: dict[str, Any]) -> dict[str, float | None]:
    timed = (res.get("timing") or {}).get("eval_s") or {}
    return {ds: _num(timed.get(ds, ((res.get("eval") or {}).get(ds) or {}).get("seconds"))) for ds in _datasets(res)}


# --------------------------------------------------------------------------- one run


def _analyse_run(path: Path, res: dict[str, Any], base: dict[str, Any], threshold_pct: float,
                 judged: tuple[str, ...] = VERDICT_DATASETS) -> dict[str, Any]:
    warnings: list[str] = []
    if res.get("kind") == "baseline":
        warnings.append(f"{path} is a baseline file, not a compressed run")
    base_model = (base.get("model") or {}).get("name_or_path")
    model = (res.get("model") or {}).get("name_or_path")
    # A packed checkpoint's own evaluation names the checkpoint; it records the model it came from.
    source = (res.get("model") or {}).get("compressed_from")
    if base_model and model and base_model != model and source != base_model:
        warnings.append(f"model differs from the baseline ({model} vs {base_model}): perplexities are not comparable")
    comparable = _check_protocol(base, res, warnings)
    config = _config_summary(res)
    perplexity = _perplexity(base, res, comparable)
    compression = _compression(res, config)
    layers = _layers(res)
    zeroshot = zeroshot_comparison(base, res)
    if zeroshot is not None:
        warnings += zeroshot["warnings"]
        if has_zeroshot(base) and not has_zeroshot(res):
            warnings.append("the baseline has zero-shot accuracies and this run none: run misq eval on its packed "
                            "checkpoint with the same --tasks")
    run = {
        "path": str(path),
        "label": run_label(config, path),
        "model": model,
        "comparable": comparable,
        "config": config,
        "perplexity": perplexity,
        "compression": compression,
        "cost": {"compress_s": _num((res.get("timing") or {}).get("compress_s")), "eval_s": _eval_seconds(res)},
        "layers": layers,
        "zeroshot": zeroshot,
        "warnings": warnings,
    }
    run["verdict"] = verdict(run, threshold_pct, judged)
    run["suggestions"] = suggestions(run)
    return run


def _check_protocol(base: dict[str, Any], res: dict[str, Any], warnings: list[str]) -> bool:
    """Warn (never fail) when the two files did not measure PPL the same way."""
    comparable = True
    b_len, r_len = _seqlen(base), _seqlen(res)
    if b_len is not None and r_len is not None and b_len != r_len:
        warnings.append(f"seqlen differs (baseline {b_len}, run {r_len}): perplexities are NOT comparable; re-evaluate both with the same --seqlen")
        comparable = False
    elif b_len is None or r_len is None:
        warnings.append("seqlen is not recorded in both files: cannot confirm the perplexities are comparable")
    b_proto, r_proto = base.get("protocol") or {}, res.get("protocol") or {}
    differ = [k for k in PROTOCOL_KEYS if k in b_proto and k in r_proto and b_proto[k] != r_proto[k]]
    if differ:
        detail = ", ".join(f"{k} {b_proto[k]!r} vs {r_proto[k]!r}" for k in differ)
        warnings.append(f"evaluation protocol differs ({detail}): perplexities are NOT comparable")
        comparable = False
    return comparable


def _config_summary(res: dict[str, Any]) -> dict[str, Any]:
    cfg = res.get("config") or {}
    sp = res.get("sparsity") or {}
    bits = res.get("bits") or {}
    grouping = cfg.get("grouping")
    target = _num(bits.get("target_avg_bits", cfg.get("target_avg_bits") if grouping != "uniform" else None))
    prunen, prunem = cfg.get("prunen") or 0, cfg.get("prunem") or 0
    # The file's own pattern when it has one; files older than that field get it from their config.
    # "none" is this module's old word for "dense": read it as such.
    pattern = sp.get("pattern")
    if pattern in (None, "", "none"):
        pattern = sparsity_pattern(float(cfg.get("sparsity") or 0.0), int(prunen), int(prunem))
    sparsity_target = _num(sp.get("target", prunen / prunem if prunen and prunem else cfg.get("sparsity")))
    if res.get("kind") == "baseline" or not cfg:
        precision = (res.get("model") or {}).get("dtype", "float16")
    elif grouping == "uniform":
        precision = f"uniform {cfg.get('wbits')}-bit"
    else:
        widths = ",".join(str(b) for b in cfg.get("bits") or [])
        precision = f"mixed {{{widths}}}, target {target:g} avg bits" if target is not None else f"mixed {{{widths}}}"
    summary = {
        "precision": precision,
        "bits": cfg.get("bits"),
        "wbits": cfg.get("wbits"),
        "target_avg_bits": target,
        "sparsity_target": sparsity_target,
        "sparsity_actual": _num(sp.get("actual")),
        "pattern": pattern,
        "method": grouping,
        "calibration_dataset": cfg.get("dataset"),
        "nsamples": cfg.get("nsamples"),
        "n_groups": cfg.get("n_groups") if grouping != "uniform" else None,
        "budget": cfg.get("budget") if grouping != "uniform" else None,
        "seqlen": _seqlen(res),
        "seed": cfg.get("seed"),
        # Descent passes after the solve; results files from before the option ran none.
        "refine_passes": cfg.get("refine_passes", 0) if cfg and res.get("kind") != "baseline" else None,
    }
    summary["sparsity"] = sparsity_text(summary)
    return summary


def _perplexity(base: dict[str, Any], res: dict[str, Any], comparable: bool) -> dict[str, dict[str, Any]]:
    table = {}
    for ds in _datasets(base, res):
        b, c = _ppl(base, ds), _ppl(res, ds)
        entry: dict[str, Any] = {"baseline": b, "compressed": c, "retention_pct": None, "change_pct": None, "comparable": comparable}
        if b is not None and b > 0 and c is not None and c > 0:
            entry["retention_pct"] = round(100 * b / c, 2)
            entry["change_pct"] = round(100 * (c - b) / b, 2)
        elif b is not None and _diverged(res, ds):
            entry["retention_pct"], entry["diverged"] = 0.0, True  # NaN/inf PPL: nothing retained
        table[ds] = entry
    return table


def _compression(res: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    st, bits = res.get("storage") or {}, res.get("bits") or {}

    def ratio(key: str, bits_key: str) -> float | None:
        # The protocol defines the ratio as 16 / bits per parameter on disk; older files lack it.
        given, per_param = _num(st.get(key)), _num(st.get(bits_key))
        if given is None and per_param:
            return round(16 / per_param, 4)
        return given

    avg_channel = _num(st.get("avg_channel_bits", bits.get("actual_avg_bits")))
    actual = _num(bits.get("actual_avg_bits", avg_channel))
    target = config["target_avg_bits"]
    histogram = []  # the entries misq.algorithms.allocation.bit_histogram defines, as the results file holds them
    for width, h in sorted((bits.get("histogram") or {}).items(), key=lambda kv: float(kv[0])):
        histogram.append({"width": int(float(width)), **{k: h.get(k) for k in ("channels", "channel_share", "weights", "weight_share")}})
    return {
        "avg_channel_bits": avg_channel,
        "bits_per_stored_weight": _num(st.get("bits_per_stored_weight")),
        "bits_per_param_disk_quantized": _num(st.get("bits_per_param_disk_quantized")),
        "bits_per_param_disk_model": _num(st.get("bits_per_param_disk_model")),
        "compression_ratio_quantized": ratio("compression_ratio_quantized", "bits_per_param_disk_quantized"),
        "compression_ratio_model": ratio("compression_ratio_model", "bits_per_param_disk_model"),
        "bytes_quantized": st.get("bytes_quantized"),
        "bytes_model": st.get("bytes_model"),
        "bytes_fp16_model": st.get("bytes_fp16_model"),
        "target_avg_bits": target,
        "actual_avg_bits": actual,
        "budget_gap_bits": round(actual - target, 4) if actual is not None and target is not None else None,
        "exact": bits.get("exact"),
        "histogram": histogram,
    }


def _layers(res: dict[str, Any]) -> dict[str, Any]:
    """Per-layer bits and errors, and which layers' errors are outliers (> median + 3 MAD)."""
    per_bits = {e.get("name"): e.get("avg_bits") for e in (res.get("bits") or {}).get("per_layer") or [] if isinstance(e, dict)}
    rows = [
        {"name": e.get("name"), "avg_bits": _num(e.get("avg_bits", per_bits.get(e.get("name")))), "rel_error": _num(e.get("rel_error"))}
        for e in res.get("layers") or []
        if isinstance(e, dict)
    ]
    if not rows:
        rows = [{"name": n, "avg_bits": _num(b), "rel_error": None} for n, b in per_bits.items()]
    out: dict[str, Any] = {"count": len(rows), "per_layer": rows, "median_rel_error": None, "mad_rel_error": None,
                           "outlier_limit": None, "outliers": []}  # fmt: skip
    errors = [r["rel_error"] for r in rows if r["rel_error"] is not None]
    if len(errors) >= 3:
        med = statistics.median(errors)
        mad = statistics.median(abs(e - med) for e in errors)
        # A floor on the MAD keeps float noise among near-equal errors from flagging "outliers".
        limit = med + 3 * max(mad, 1e-3 * med)
        flagged = [r for r in rows if r["rel_error"] is not None and r["rel_error"] > limit]
        flagged.sort(key=lambda r: -r["rel_error"])
        out.update(median_rel_error=med, mad_rel_error=mad, outlier_limit=limit,
                   outliers=[{"name": r["name"], "rel_error": r["rel_error"]} for r in flagged])  # fmt: skip
    return out


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
