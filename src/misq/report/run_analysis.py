"""One compressed run read against the baseline's results file: its configuration, perplexity
with retention, honest size and bit distribution, per-layer errors, zero-shot accuracy, warnings,
verdict and suggestions (:func:`analyse_run`), and the field readers that tolerate older or
partial results files. :mod:`misq.report.compare` assembles these into the comparison."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

# DATASETS from misq.config, not misq.protocol.data: the same tuple, without importing torch.
from misq.config import DATASETS, sparsity_pattern
from misq.report.advice import VERDICT_DATASETS, suggestions, verdict
from misq.report.labels import run_label, sparsity_text
from misq.report.tasks import has_zeroshot, zeroshot_comparison

DATASET_ORDER = DATASETS  # the protocol's three, in the order its tables list them
PROTOCOL_KEYS = ("name", "c4_documents", "c4_max_tokens", "unk_as_text")


# --------------------------------------------------------------------------- reading fields


def _num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def ppl_of(res: dict[str, Any], ds: str) -> float | None:
    value = (res.get("ppl") or {}).get(ds)
    if value is None:
        value = ((res.get("eval") or {}).get(ds) or {}).get("ppl")
    return _num(value)


def _diverged(res: dict[str, Any], ds: str) -> bool:
    """Whether a PPL is recorded but is NaN or infinite (the model broke)."""
    value = (res.get("ppl") or {}).get(ds)
    return isinstance(value, (int, float)) and not math.isfinite(value)


def datasets_of(*results: dict[str, Any]) -> list[str]:
    """Datasets any of the files evaluated, the protocol's three first in their usual order."""
    names: set[str] = set()
    for res in results:
        names |= set((res.get("ppl") or {}).keys()) | set((res.get("eval") or {}).keys())
    return [d for d in DATASET_ORDER if d in names] + sorted(names - set(DATASET_ORDER))


def seqlen_of(res: dict[str, Any]) -> int | None:
    for source in (res.get("protocol") or {}, res.get("config") or {}):
        if isinstance(source.get("seqlen"), int):
            return source["seqlen"]
    for entry in (res.get("eval") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("seqlen"), int):
            return entry["seqlen"]
    return None


def eval_seconds(res: dict[str, Any]) -> dict[str, float | None]:
    timed = (res.get("timing") or {}).get("eval_s") or {}
    return {ds: _num(timed.get(ds, ((res.get("eval") or {}).get(ds) or {}).get("seconds"))) for ds in datasets_of(res)}


# --------------------------------------------------------------------------- one run


def analyse_run(path: Path, res: dict[str, Any], base: dict[str, Any], threshold_pct: float,
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
        "cost": {"compress_s": _num((res.get("timing") or {}).get("compress_s")), "eval_s": eval_seconds(res)},
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
    b_len, r_len = seqlen_of(base), seqlen_of(res)
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
        "seqlen": seqlen_of(res),
        "seed": cfg.get("seed"),
        # Descent passes after the solve; results files from before the option ran none.
        "refine_passes": cfg.get("refine_passes", 0) if cfg and res.get("kind") != "baseline" else None,
    }
    summary["sparsity"] = sparsity_text(summary)
    return summary


def _perplexity(base: dict[str, Any], res: dict[str, Any], comparable: bool) -> dict[str, dict[str, Any]]:
    table = {}
    for ds in datasets_of(base, res):
        b, c = ppl_of(base, ds), ppl_of(res, ds)
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
