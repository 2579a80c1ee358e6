"""The judgement half of a comparison: the verdict and the data-driven suggestions.

Both read only the per-run analysis that :mod:`misq.report` builds (perplexity entries,
compression figures, layer statistics, the configuration summary), so every rule and every piece
of advice names the number that triggered it.
"""

from __future__ import annotations

import statistics
from typing import Any

BUDGET_TOLERANCE = 0.01  # bits; "budget met" means |actual - target| <= this
VERDICT_DATASETS = ("wikitext2", "c4")


def _rule(rule_id: str, text: str, value: float | None, status: str, note: str = "") -> dict[str, Any]:
    return {"id": rule_id, "rule": text, "value": value, "status": status, "note": note}


def verdict_datasets(evaluated: list[str]) -> tuple[str, ...]:
    """The datasets whose retention the verdict judges: wikitext2 and c4 when the baseline has
    either; otherwise (a user's own text, as in ``misq demo``) every dataset it evaluated."""
    if not evaluated or any(ds in evaluated for ds in VERDICT_DATASETS):
        return VERDICT_DATASETS
    return tuple(evaluated)


def verdict(run: dict[str, Any], threshold_pct: float, datasets: tuple[str, ...] = VERDICT_DATASETS) -> dict[str, Any]:
    """PASS / FAIL / INCOMPLETE by the rules in the comparison's ``rules.text`` (retention judged
    on ``datasets``, see :func:`verdict_datasets`)."""
    comp, cfg = run["compression"], run["config"]
    text = f"|actual - target average bits| <= {BUDGET_TOLERANCE}"
    gap = comp["budget_gap_bits"]
    if cfg["method"] == "uniform":
        rules = [_rule("budget", text, None, "n/a", "uniform precision has no bit budget")]
    elif gap is None:
        rules = [_rule("budget", text, None, "missing", "target or actual average bits not recorded")]
    else:
        status = "pass" if abs(gap) <= BUDGET_TOLERANCE + 1e-9 else "fail"
        rules = [_rule("budget", text, gap, status, f"actual {comp['actual_avg_bits']:.4f} vs target {comp['target_avg_bits']:g}")]
    for ds in datasets:
        entry = run["perplexity"].get(ds) or {}
        value, text = entry.get("retention_pct"), f"retention on {ds} >= {threshold_pct:g}%"
        if value is None:
            rules.append(_rule(f"retention_{ds}", text, None, "missing", f"no {ds} perplexity in both files"))
        elif not entry["comparable"]:
            rules.append(_rule(f"retention_{ds}", text, value, "missing", "perplexities not comparable (see warnings)"))
        else:
            status = "pass" if value >= threshold_pct else "fail"
            rules.append(_rule(f"retention_{ds}", text, value, status, f"{value:.2f}% {'>=' if status == 'pass' else '<'} {threshold_pct:g}%"))
    zs = run.get("zeroshot")
    if zs:  # either file ran zero-shot tasks: their mean accuracy is judged too
        text = f"mean zero-shot accuracy retention >= {threshold_pct:g}%"
        mean = zs["mean"]
        if mean is None or mean["retention_pct"] is None:
            why = zs["skipped"] or zs["baseline_skipped"] or "no task measured alike in both files"
            rules.append(_rule("retention_zeroshot", text, None, "missing", why))
        else:
            value = mean["retention_pct"]
            status = "pass" if value >= threshold_pct else "fail"
            rules.append(_rule("retention_zeroshot", text, value, status,
                               f"{value:.2f}% {'>=' if status == 'pass' else '<'} {threshold_pct:g}% over {len(mean['tasks'])} task(s): "
                               f"mean accuracy {mean['baseline']:.2f}% -> {mean['compressed']:.2f}%"))
    failed = [r for r in rules if r["status"] == "fail"]
    missing = [r for r in rules if r["status"] == "missing"]
    if failed:
        result, why = "FAIL", failed
    elif missing:
        result, why = "INCOMPLETE", missing
    else:
        result, why = "PASS", []
    summary = result + (": " + "; ".join(f"{r['rule']} ({r['note']})" for r in why) if why else ": every applicable rule holds")
    return {"status": result, "summary": summary, "rules": rules}


def suggestions(run: dict[str, Any]) -> list[dict[str, str]]:
    """Advice computed from this run's numbers; each item names the number that triggered it."""
    out: list[dict[str, str]] = []
    comp, cfg, layers = run["compression"], run["config"], run["layers"]

    def add(sid: str, trigger: str, text: str) -> None:
        out.append({"id": sid, "trigger": trigger, "text": text})

    gap = comp["budget_gap_bits"]
    if cfg["method"] != "uniform" and gap is not None and abs(gap) > BUDGET_TOLERANCE + 1e-9:
        fix = "use --budget model, which lets layers trade bits" if cfg["budget"] == "layer" else "add intermediate widths to --bits"
        add("budget_missed", f"actual - target average bits = {gap:+.4f} (tolerance ±{BUDGET_TOLERANCE})",
            f"The bit budget was missed by {gap:+.4f} bits ({comp['actual_avg_bits']:.4f} vs target {comp['target_avg_bits']:g}): "
            f"the widths {cfg['bits']} cannot hit the target exactly at this granularity; {fix}.")  # fmt: skip
    changes = {ds: e["change_pct"] for ds, e in run["perplexity"].items() if e["change_pct"] is not None and e["comparable"]}
    if len(changes) >= 2:
        median = statistics.median(changes.values())
        for ds, change in changes.items():
            if median > 0 and change > 2 * median:
                cal = cfg["calibration_dataset"]
                why = ("although it is the calibration set, so the compression is too aggressive for it" if cal == ds
                       else f"calibration used {cal}; try --dataset {ds} to see whether this is a domain gap")  # fmt: skip
                add(f"dataset_degrades_{ds}", f"{ds} change {change:+.2f}% > 2 x median change {median:+.2f}%",
                    f"{ds} degrades far more than the other datasets ({change:+.2f}% vs median {median:+.2f}%): {why}.")  # fmt: skip
    if isinstance(cfg["nsamples"], int) and cfg["nsamples"] < 128:
        add("few_samples", f"nsamples = {cfg['nsamples']} < 128",
            f"Only {cfg['nsamples']} calibration samples (the protocol uses 128): the Hessian estimates are noisy; use --nsamples 128.")  # fmt: skip
    if layers["outliers"]:
        worst = layers["outliers"][0]
        others = f" and {len(layers['outliers']) - 1} more" if len(layers["outliers"]) > 1 else ""
        add("layer_outlier", f"{worst['name']} rel_error {worst['rel_error']:.4g} > median + 3 MAD = {layers['outlier_limit']:.4g}",
            f"Layer {worst['name']}{others} has an outlying reconstruction error ({worst['rel_error']:.4g} vs median "
            f"{layers['median_rel_error']:.4g}): give it more bits or keep it in fp16, or raise --percdamp if its Hessian is ill-conditioned.")  # fmt: skip
    hist = {h["width"]: h for h in comp["histogram"] if isinstance(h.get("weight_share"), (int, float))}
    widths = sorted(set(cfg["bits"] or []) | set(hist))
    if cfg["method"] not in (None, "uniform") and widths and widths[-1] in hist and hist[widths[-1]]["weight_share"] > 0.5:
        share = hist[widths[-1]]["weight_share"]
        add("saturated_top", f"weight share at the top width {widths[-1]} = {100 * share:.1f}% > 50%",
            f"{100 * share:.1f}% of weights sit at the top width ({widths[-1]} bits): the allocation is saturating and cannot "
            f"favour important channels; add a wider width to --bits or lower --target_avg_bits.")  # fmt: skip
    if cfg["method"] not in (None, "uniform") and widths and widths[0] in hist and hist[widths[0]]["weight_share"] > 0.5:
        share = hist[widths[0]]["weight_share"]
        add("saturated_bottom", f"weight share at the lowest width {widths[0]} = {100 * share:.1f}% > 50%",
            f"{100 * share:.1f}% of weights sit at the lowest width ({widths[0]} bits): the budget is so tight that most channels "
            f"get the floor; raise --target_avg_bits or add a lower width to --bits.")  # fmt: skip
    stored, channel = comp["bits_per_stored_weight"], comp["avg_channel_bits"]
    if stored is not None and channel is not None and stored - channel > 0.5:
        fewer = f" (e.g. --n_groups {max(1, cfg['n_groups'] // 2)})" if isinstance(cfg["n_groups"], int) else ""
        add("scale_overhead", f"bits per stored weight - average channel bits = {stored - channel:.3f} > 0.5",
            f"Scales and zero points cost {stored - channel:.3f} bits per weight ({stored:.3f} stored vs {channel:.3f} channel bits): "
            f"use fewer groups{fewer} to cut the overhead.")  # fmt: skip
    _zeroshot_suggestions(run, add)
    target_sp, actual_sp = cfg["sparsity_target"], cfg["sparsity_actual"]
    if cfg.get("refine_passes") == 0 and (target_sp or 0) > 0:
        add("refine_off", f"refine_passes = 0 with sparsity {100 * target_sp:.0f}%",
            "This pruned run skipped the coordinate descent after the solve (--refine-passes 0): with pruning it lowered "
            "perplexity on every recipe measured (llama-9m 50% + 4-bit: wikitext2 128.50 -> 125.16, BENCHMARKS.md); "
            "rerun with the default --refine-passes 4, at the same size.")  # fmt: skip
    if target_sp is not None and actual_sp is not None and abs(actual_sp - target_sp) > 0.01:
        add("sparsity_missed", f"actual sparsity {actual_sp:.4f} vs target {target_sp:.4f}",
            f"Actual sparsity {100 * actual_sp:.2f}% differs from the target {100 * target_sp:.2f}% by more than 1 point: "
            f"check which layers were skipped.")  # fmt: skip
    return out


def _zeroshot_suggestions(run: dict[str, Any], add: Any) -> None:
    """Advice from the zero-shot accuracies: a task that drops beyond its noise, changes that are
    all noise, a limited or skipped evaluation."""
    zs = run.get("zeroshot")
    if not zs:
        return
    if zs["skipped"]:
        add("zeroshot_skipped", f"zero-shot tasks skipped: {zs['skipped']}",
            f"The zero-shot tasks did not run for this model ({zs['skipped']}): evaluate its packed checkpoint with "
            "misq eval PACKED --tasks ... on a device that holds it whole.")
    limits = {v for v in zs["limit"].values() if v}
    if limits:
        add("zeroshot_limited", f"--task-limit {', '.join(map(str, sorted(limits)))}",
            f"The zero-shot accuracies use at most {max(limits)} examples per task (--task-limit): their stderr is wide and "
            "they are not comparable to published tables; drop --task-limit for the full sets.")
    judged = {t: e for t, e in zs["tasks"].items() if e["comparable"] and e["change_pts"] is not None}
    noisy = []
    for task, e in judged.items():
        errors = [x for x in (e["baseline_stderr"], e["compressed_stderr"]) if x is not None]
        noise = 2 * (sum(x * x for x in errors) ** 0.5) if errors else 0.0  # twice the stderr of the difference
        if e["change_pts"] < -max(2.0, noise):
            add(f"zeroshot_drop_{task}", f"{task} {e['metric']} change {e['change_pts']:+.2f} points, beyond 2 x stderr ±{noise:.2f}",
                f"{task} loses {-e['change_pts']:.2f} points of {e['metric']} ({e['baseline']:.2f}% -> {e['compressed']:.2f}%), "
                "more than its noise: the compression hurts what this task measures even where perplexity holds; "
                "give the model more bits (--target-avg-bits / --target-size) or less sparsity.")
        elif abs(e["change_pts"]) <= noise:
            noisy.append(task)
    if judged and len(noisy) == len(judged):
        changes = ", ".join(f"{t} {judged[t]['change_pts']:+.2f}" for t in noisy)
        add("zeroshot_within_noise", "every zero-shot change is within 2 x its stderr",
            f"Every zero-shot change ({changes} points) is within "
            "twice its stderr: these tasks cannot tell this run from the baseline; rank runs by perplexity, or evaluate "
            "larger task sets.")
