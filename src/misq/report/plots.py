"""Plots for the comparison report, as PNG bytes ready to embed in HTML.

Every plot reads the comparison dict (what ``comparison_results.json`` holds), never the raw
results files, so a plot cannot show a number the JSON does not have. A plot whose data is
missing is left out rather than drawn empty.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import matplotlib

# Reports are written on headless machines (GPU nodes, CI): never ask for a display.
matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)

#: Plot key -> caption; the renderers place each plot by its key.
CAPTIONS = {
    "ppl": "Perplexity per dataset: baseline vs compressed (lower is better)",
    "bits_hist": "Bit-width distribution: share of weights per width, target and actual average marked",
    "bits_per_layer": "Average bits per quantized layer",
    "rel_error": "Relative reconstruction error per layer (outliers above median + 3 MAD marked)",
    "frontier": "Perplexity against honest size: the runs beside the reference points (lower left is better)",
}


def make_plots(comparison: dict[str, Any]) -> dict[str, bytes]:
    """All plots that the data allows, keyed as in :data:`CAPTIONS`; the run-level ones are
    drawn for the primary run (``comparison["primary"]``)."""
    run = comparison["runs"][comparison["primary"]]
    makers = {
        "ppl": lambda: _ppl_bars(comparison),
        "bits_hist": lambda: _bits_hist(run),
        "bits_per_layer": lambda: _bits_per_layer(run),
        "rel_error": lambda: _rel_error(run),
    }
    plots = {}
    for key, make in makers.items():
        fig = make()
        if fig is not None:
            plots[key] = _png(fig)
    log.debug("made plots: %s", ", ".join(plots) or "none")
    return plots


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)  # figures otherwise pile up in pyplot's registry across reports
    return buf.getvalue()


def _ppl_bars(comparison: dict[str, Any]) -> plt.Figure | None:
    """Grouped bars: per dataset, the baseline then each run."""
    runs = comparison["runs"]
    datasets = [ds for ds in runs[0]["perplexity"]]
    for run in runs[1:]:
        datasets += [ds for ds in run["perplexity"] if ds not in datasets]
    series = [("baseline", [comparison["baseline"]["ppl"].get(ds) for ds in datasets])]
    series += [(r["label"], [r["perplexity"].get(ds, {}).get("compressed") for ds in datasets]) for r in runs]
    if not datasets or all(v is None for _, values in series for v in values):
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(datasets) * (1 + 0.3 * len(runs))), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        xs = [d + (i - (len(series) - 1) / 2) * width for d in range(len(datasets))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "n/a" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return fig


def _bits_hist(run: dict[str, Any]) -> plt.Figure | None:
    comp = run["compression"]
    hist = [h for h in comp["histogram"] if isinstance(h.get("weight_share"), (int, float))]
    if not hist:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    # Widths on a numeric axis, so the average bits markers land where they belong.
    bars = ax.bar([h["width"] for h in hist], [100 * h["weight_share"] for h in hist], 0.7, color="tab:blue")
    ax.bar_label(bars, labels=[f"{100 * h['weight_share']:.1f}%" for h in hist], fontsize=8, padding=2)
    if comp["target_avg_bits"] is not None:
        ax.axvline(comp["target_avg_bits"], color="tab:red", linestyle="--", label=f"target {comp['target_avg_bits']:g}")
    if comp["actual_avg_bits"] is not None:
        ax.axvline(comp["actual_avg_bits"], color="tab:green", linestyle=":", label=f"actual {comp['actual_avg_bits']:.3f}")
    ax.set_xticks([h["width"] for h in hist])
    ax.set_xlabel("bit width")
    ax.set_ylabel("share of weights (%)")
    ax.margins(y=0.15)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _bits_per_layer(run: dict[str, Any]) -> plt.Figure | None:
    values = [r["avg_bits"] for r in run["layers"]["per_layer"]]
    if not values or all(v is None for v in values):
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, min(14.0, 0.05 * len(values) + 4)), 3.2))
    ax.bar(range(len(values)), [v if v is not None else 0.0 for v in values], 1.0, color="tab:blue")
    target = run["compression"]["target_avg_bits"]
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("quantized layer (in model order)")
    ax.set_ylabel("average bits")
    return fig


def _rel_error(run: dict[str, Any]) -> plt.Figure | None:
    layers = run["layers"]
    points = [(i, r["rel_error"]) for i, r in enumerate(layers["per_layer"]) if r["rel_error"] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, min(14.0, 0.05 * len(points) + 4)), 3.2))
    ax.plot([i for i, _ in points], [e for _, e in points], marker=".", linewidth=0.8, color="tab:blue")
    outliers = {o["name"] for o in layers["outliers"]}
    marked = [(i, r["rel_error"]) for i, r in enumerate(layers["per_layer"]) if r["name"] in outliers]
    if marked:
        ax.scatter([i for i, _ in marked], [e for _, e in marked], color="tab:red", zorder=3, label="outlier")
    if layers["outlier_limit"] is not None:
        ax.axhline(layers["outlier_limit"], color="tab:red", linestyle="--", linewidth=0.8, label="median + 3 MAD")
        ax.legend(fontsize=8)
    positive = [e for _, e in points if e > 0]
    if positive and max(positive) / min(positive) > 100:  # errors span decades in deep models
        ax.set_yscale("log")
    ax.set_xlabel("quantized layer (in model order)")
    ax.set_ylabel("relative error")
    return fig


__all__ = ["CAPTIONS", "make_plots"]
