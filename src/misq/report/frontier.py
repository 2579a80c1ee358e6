"""Perplexity against honest size: misq's runs beside named reference points.

A *point* is a name, an honest size (bits per parameter of the quantized layers, as
docs/bit-accounting.md counts it) and perplexities by dataset. Reference points come from a
JSON file (``{"points": [{"name", "size", "ppl": {dataset: value}}]}``, e.g.
``benchmarks/references/llama-9m.json``); a run's point comes from its results file. The plot
and the table are what ``benchmarks/frontier.py`` and ``misq compare --reference`` show.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from misq.errors import MisqError

FRONTIER_DATASETS = ("wikitext2", "c4", "ptb")


def load_reference_points(path: str | Path) -> list[dict[str, Any]]:
    """The named points of a reference JSON, checked; one clear error for a bad file."""
    try:
        data = json.loads(Path(path).read_text())
        points = data["points"] if isinstance(data, dict) else data
        out = []
        for p in points:
            ppl = {str(k): float(v) for k, v in p["ppl"].items() if v is not None}
            out.append({"name": str(p["name"]), "size": float(p["size"]), "ppl": ppl, "reference": True})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise MisqError(f"{path} is not a reference-points JSON ({type(err).__name__}: {err}): give "
                        '{"points": [{"name": ..., "size": bits, "ppl": {"wikitext2": ...}}]}') from None
    return out


def run_point(name: str, results: dict[str, Any]) -> dict[str, Any] | None:
    """A run's point from its results dict, or None when it has no honest size or no PPL."""
    size = (results.get("storage") or {}).get("bits_per_param_disk_quantized")
    ppl = results.get("ppl") or {}
    if not isinstance(size, (int, float)) or not ppl:
        return None
    return {"name": name, "size": float(size), "ppl": {k: float(v) for k, v in ppl.items()}, "reference": False}


def dominated_by(point: dict[str, Any], others: list[dict[str, Any]], datasets: tuple[str, ...],
                 within: dict[str, float] | None = None) -> list[str]:
    """Names of ``others`` at most ``point``'s size with lower PPL on every one of ``datasets``,
    and no more than (1 + slack)× its PPL on each dataset of ``within`` (e.g. {"ptb": 0.02}, the
    frontier goal's allowance for the noisier set)."""
    out = []
    for o in others:
        lower = all(d in o["ppl"] and d in point["ppl"] and o["ppl"][d] < point["ppl"][d] for d in datasets)
        close = all(d in o["ppl"] and d in point["ppl"] and o["ppl"][d] <= point["ppl"][d] * (1 + slack)
                    for d, slack in (within or {}).items())
        if o["size"] <= point["size"] + 1e-9 and lower and close:
            out.append(o["name"])
    return out


def frontier_table(points: list[dict[str, Any]], datasets: tuple[str, ...] = FRONTIER_DATASETS) -> str:
    """A Markdown table of all points by size, references marked."""
    lines = ["| point | size (bits/param) | " + " | ".join(datasets) + " |", "| --- | ---: |" + " ---: |" * len(datasets)]
    for p in sorted(points, key=lambda p: (p["size"], p["name"])):
        cells = [f"{p['ppl'][d]:.2f}" if d in p["ppl"] else "–" for d in datasets]
        name = f"{p['name']} (reference)" if p["reference"] else f"**{p['name']}**"
        lines.append(f"| {name} | {p['size']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def frontier_png(points: list[dict[str, Any]], datasets: tuple[str, ...] = ("wikitext2", "c4"),
                 title: str = "perplexity against honest size", max_size: float = 6.0) -> bytes:
    """One panel per dataset: PPL (log) against bits per parameter; references grey, misq blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p["size"] <= max_size]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for ref, colour, marker in ((True, "0.45", "s"), (False, "tab:blue", "o")):
            pts = sorted((p for p in shown if p["reference"] == ref and d in p["ppl"]), key=lambda p: p["size"])
            if not pts:
                continue
            ax.scatter([p["size"] for p in pts], [p["ppl"][d] for p in pts], c=colour, marker=marker,
                       label="reference" if ref else "misq", zorder=3)
            for p in pts:
                ax.annotate(p["name"], (p["size"], p["ppl"][d]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if not ref:  # misq's own frontier: the lower envelope of its points
                best, env = math.inf, []
                for p in pts:
                    if p["ppl"][d] < best:
                        best = p["ppl"][d]
                        env.append(p)
                ax.plot([p["size"] for p in env], [p["ppl"][d] for p in env], c=colour, lw=1, zorder=2)
        ax.set_yscale("log")
        ax.set_xlabel("honest size (bits per parameter of the quantized layers)")
        ax.set_ylabel(f"{d} perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
