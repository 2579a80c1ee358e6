"""The comparison of what results files record beside perplexity: zero-shot accuracy
(lm-evaluation-harness) and greedy generations.

Accuracies are percentages here (the files hold fractions); change is in percentage points
(compressed - baseline) and retention is compressed / baseline. Each is rounded once, to what
the reports print, and the verdict and suggestions test those same numbers.
"""

from __future__ import annotations

import math
from typing import Any

# The metric the papers' tables quote for a task: length-normalised accuracy where the answers'
# lengths differ a lot (hellaswag, arc_challenge), plain accuracy elsewhere.
NORM_TASKS = ("hellaswag", "arc_challenge")


def headline_metric(task: str, metrics: dict[str, Any]) -> str | None:
    """``acc_norm`` for :data:`NORM_TASKS` (when recorded), else ``acc``, else whatever is there."""
    order = ("acc_norm", "acc") if task in NORM_TASKS else ("acc", "acc_norm")
    return next((m for m in order if m in metrics), None)


def _pct(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return 100 * float(x)


def _section(res: dict[str, Any]) -> dict[str, Any]:
    zs = res.get("zeroshot")
    return zs if isinstance(zs, dict) else {}


def has_zeroshot(res: dict[str, Any]) -> bool:
    """Whether a results file ran (or tried to run) zero-shot tasks."""
    zs = _section(res)
    return bool(zs.get("tasks")) or bool(zs.get("skipped"))


def _metric(entry: dict[str, Any] | None, metric: str) -> tuple[float | None, float | None]:
    value = ((entry or {}).get("metrics") or {}).get(metric) or {}
    return _pct(value.get("value")), _pct(value.get("stderr"))


def _pair(b: float | None, c: float | None, b_err: float | None, c_err: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline": None if b is None else round(b, 2), "compressed": None if c is None else round(c, 2),
                           "baseline_stderr": None if b_err is None else round(b_err, 2),
                           "compressed_stderr": None if c_err is None else round(c_err, 2),
                           "change_pts": None, "retention_pct": None}
    if b is not None and c is not None:
        out["change_pts"] = round(c - b, 2)
        out["retention_pct"] = round(100 * c / b, 2) if b > 0 else None
    return out


def zeroshot_comparison(base: dict[str, Any], res: dict[str, Any]) -> dict[str, Any] | None:
    """Per task: accuracy of baseline and run, change, retention and stderr, for acc and acc_norm,
    the headline metric, whether the two were measured alike; and the mean over comparable tasks.
    None when neither file ran zero-shot tasks."""
    if not (has_zeroshot(base) or has_zeroshot(res)):
        return None
    b_zs, r_zs = _section(base), _section(res)
    b_tasks, r_tasks = b_zs.get("tasks") or {}, r_zs.get("tasks") or {}
    warnings: list[str] = []
    tasks: dict[str, Any] = {}
    for task in list(dict.fromkeys([*b_tasks, *r_tasks])):
        b, r = b_tasks.get(task) or {}, r_tasks.get(task) or {}
        metrics = {}
        for metric in dict.fromkeys([*(b.get("metrics") or {}), *(r.get("metrics") or {})]):
            b_val, b_err = _metric(b, metric)
            c_val, c_err = _metric(r, metric)
            metrics[metric] = _pair(b_val, c_val, b_err, c_err)
        differ = [f"{key} {b.get(key)!r} vs {r.get(key)!r}" for key in ("version", "num_fewshot", "samples")
                  if b and r and b.get(key) != r.get(key)]
        if differ:
            warnings.append(f"zero-shot task {task} was not measured alike ({', '.join(differ)}): its accuracies cannot be set side by side")
        head = headline_metric(task, metrics)
        tasks[task] = {"metric": head, **(metrics.get(head) or _pair(None, None, None, None)),
                       "comparable": not differ and bool(b) and bool(r), "metrics": metrics}
    counted = [t for t, e in tasks.items() if e["comparable"] and e["baseline"] is not None and e["compressed"] is not None]
    mean = None
    if counted:
        b_mean = sum(tasks[t]["baseline"] for t in counted) / len(counted)
        c_mean = sum(tasks[t]["compressed"] for t in counted) / len(counted)
        mean = {"tasks": counted, **_pair(b_mean, c_mean, None, None)}
    return {
        "harness": {"baseline": (b_zs.get("harness") or {}).get("version"), "compressed": (r_zs.get("harness") or {}).get("version")},
        "num_fewshot": {"baseline": b_zs.get("num_fewshot"), "compressed": r_zs.get("num_fewshot")},
        "limit": {"baseline": b_zs.get("limit"), "compressed": r_zs.get("limit")},
        "skipped": r_zs.get("skipped"),
        "baseline_skipped": b_zs.get("skipped"),
        "tasks": tasks,
        "mean": mean,
        "warnings": warnings,
    }


def generations_comparison(base: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """Prompt by prompt, what the baseline and each run (by label) generated; None when no file
    recorded generations. A run that recorded none, or not this prompt, shows None."""
    def section(res: dict[str, Any]) -> dict[str, Any]:
        g = res.get("generations")
        return g if isinstance(g, dict) else {}

    files: list[tuple[str | None, dict[str, Any]]] = [(None, section(base))]  # None: the baseline
    files += [(label, section(res)) for label, res in runs]
    if not any(g.get("prompts") for _, g in files):
        return None
    outputs: dict[str, dict[str, Any]] = {}  # prompt -> {"chat_template": bool, "by": {label: output}}
    for label, g in files:
        for entry in g.get("prompts") or []:
            if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
                slot = outputs.setdefault(entry["prompt"], {"chat_template": entry.get("chat_template"), "by": {}})
                slot["by"][label] = entry.get("output")
    notes = [f"{label or 'baseline'}: no generations ({g['skipped']})" for label, g in files if g.get("skipped")]
    notes += [f"{label or 'baseline'}: no generations recorded" for label, g in files if not g]
    caps = {label or "baseline": g.get("max_new_tokens") for label, g in files if g.get("prompts")}
    if len(set(caps.values())) > 1:
        notes.append("length caps differ (" + ", ".join(f"{k} {v}" for k, v in caps.items()) + " new tokens)")
    return {
        "max_new_tokens": next(iter(caps.values()), None),
        "greedy": True,
        "prompts": [{"prompt": prompt, "chat_template": slot["chat_template"], "baseline": slot["by"].get(None),
                     "runs": [{"label": label, "output": slot["by"].get(label)} for label, _ in runs]}
                    for prompt, slot in outputs.items()],
        "notes": notes,
    }


__all__ = ["NORM_TASKS", "generations_comparison", "has_zeroshot", "headline_metric", "zeroshot_comparison"]
