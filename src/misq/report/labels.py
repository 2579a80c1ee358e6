"""The words a report uses for a run: its label and its sparsity.

One place, so that the label in every table, the configuration cell and the runs table agree.
A run with no pruning is "dense": the absence of a pattern, never a pattern to print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from misq.runs.rundir import RESULTS_FILE

DENSE_TEXT = "none (dense)"  # what a report says of a run (or baseline) with no pruning


def sparsity_text(config: dict[str, Any]) -> str:
    """The report's words for a run's sparsity: ``none (dense)``, or ``50.0% unstructured, actual 49.9%``."""
    if config["pattern"] == "dense":
        return DENSE_TEXT
    target = "—" if config["sparsity_target"] is None else f"{100 * config['sparsity_target']:.1f}%"
    actual = "" if config["sparsity_actual"] is None else f", actual {100 * config['sparsity_actual']:.1f}%"
    return f"{target} {config['pattern']}{actual}"


def run_label(config: dict[str, Any], path: Path) -> str:
    """A short name for a run, e.g. ``mi K=10 4.0b layer`` (plus ``+50%`` / ``+2:4`` when pruned).

    A dense run is named by its quantization alone: "dense" is the absence of a pattern, not one.
    """
    method = config["method"]
    if method == "uniform":
        label = f"uniform {config['wbits']}b"
    elif method:
        target = config["target_avg_bits"]
        # One decimal as in "4.0b", more only when needed ("3.25b").
        shown = None if target is None else (f"{target:.1f}" if round(target, 1) == target else f"{target:g}")
        label = f"{method} K={config['n_groups']} {shown}b {config['budget']}" if shown else f"{method} K={config['n_groups']}"
    else:
        label = path.parent.name if path.name == RESULTS_FILE else path.stem
    if config["pattern"] == "unstructured":
        if config["sparsity_target"]:
            label += f" +{100 * config['sparsity_target']:.0f}%"
    elif config["pattern"] != "dense":
        label += f" +{config['pattern']}"
    return label


def dedupe_labels(runs: list[dict[str, Any]], paths: list[Path]) -> None:
    """Two runs of a sweep can share a config (e.g. different seeds): tell them apart."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run["label"]] = counts.get(run["label"], 0) + 1
    for run, path in zip(runs, paths):
        if counts[run["label"]] > 1:
            where = path.parent.name if path.name == RESULTS_FILE else path.stem
            run["label"] = f"{run['label']} ({where})"
    labels = [r["label"] for r in runs]
    for i, run in enumerate(runs):
        if labels.count(run["label"]) > 1:  # same folder names too: fall back to the position
            run["label"] += f" #{i + 1}"


__all__ = ["DENSE_TEXT", "dedupe_labels", "run_label", "sparsity_text"]
