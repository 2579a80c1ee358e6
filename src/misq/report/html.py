"""Render a comparison dict as Markdown and as self-contained HTML.

Both renderers walk one list of sections built by :func:`build_sections`, so report.md and
report.html always hold the same tables with the same formatted numbers, and every number
is formatted from the comparison dict (``comparison_results.json``), never recomputed.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from misq.report.labels import DENSE_TEXT
from misq.runs.rundir import format_bytes, format_duration

DASH = "—"


@dataclass
class Block:
    """One piece of a section: kind is "p", "warn", "list", "table" or "img"."""

    kind: str
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Section:
    title: str
    blocks: list[Block]


# --------------------------------------------------------------------------- number formats


def num(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def pct(x: float | None, signed: bool = False) -> str:
    """A value already in percent: ``80.00%`` / ``+25.00%``."""
    return DASH if x is None else (f"{x:+.2f}%" if signed else f"{x:.2f}%")


def share(x: float | None) -> str:
    """A fraction as a percentage: 0.1 -> ``10.0%``."""
    return DASH if x is None else f"{100 * x:.1f}%"


def ratio(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}x"


def size(n: int | None) -> str:
    return DASH if n is None else f"{format_bytes(n)} ({n:,} B)"


def duration(s: float | None) -> str:
    return DASH if s is None else f"{format_duration(s)} ({s:.1f} s)"


def _or_dash(x: Any) -> str:
    return DASH if x is None or x == "" else str(x)


# --------------------------------------------------------------------------- sections


def build_sections(c: dict[str, Any], plots: dict[str, bytes] | None = None) -> tuple[str, list[Block], list[Section]]:
    """Title, introductory blocks and the numbered sections of the report."""
    from misq.report.plots import CAPTIONS

    plots = plots or {}
    run = c["runs"][c["primary"]]
    base = c["baseline"]

    def img(key: str) -> list[Block]:
        return [Block("img", text=key, items=[CAPTIONS[key]])] if key in plots else []

    title = f"misq comparison report: {base['model'] or 'model'}"
    intro = [
        Block("p", f"Baseline: {base['path']} ({base['dtype']}, seqlen {_or_dash(base['seqlen'])}). "
                   f"Runs compared: {len(c['runs'])}. Generated {c['created']} by misq {c['misq_version']}."),
    ]
    intro += [Block("warn", f"Warning: {w}") for w in c["warnings"]]
    if len(c["runs"]) > 1:
        intro.append(Block("p", "Runs, one row each:"))
        intro.append(_runs_table(c))
        intro.append(Block("p", f"Sections 1-6 describe run #{c['primary'] + 1} \"{run['label']}\" ({run['path']}): {c['primary_reason']}."))
    else:
        intro.append(Block("p", f"Run: \"{run['label']}\" ({run['path']}). Verdict: {run['verdict']['status']}."))

    cfg = run["config"]
    config = Block("table", headers=["Setting", "Baseline", run["label"]], rows=[
        ["Model", _or_dash(base["model"]), _or_dash(run["model"])],
        ["Precision / bits", _or_dash(base["dtype"]), cfg["precision"]],
        ["Sparsity & pattern", DENSE_TEXT, cfg["sparsity"]],
        ["Method (grouping)", DASH, _or_dash(cfg["method"])],
        ["Calibration dataset", DASH, _or_dash(cfg["calibration_dataset"])],
        ["Calibration samples", DASH, _or_dash(cfg["nsamples"])],
        ["Groups (K)", DASH, _or_dash(cfg["n_groups"])],
        ["Budget scope", DASH, _or_dash(cfg["budget"])],
        ["Descent passes after the solve", DASH, _or_dash(cfg.get("refine_passes"))],
        ["Seqlen", _or_dash(base["seqlen"]), _or_dash(cfg["seqlen"])],
    ])  # fmt: skip

    ppl_rows = []
    for ds, e in run["perplexity"].items():
        note = "" if e["comparable"] else " (not comparable)"
        ppl_rows.append([ds, num(e["baseline"]), num(e["compressed"]) if not e.get("diverged") else "diverged",
                         pct(e["retention_pct"]) + note, pct(e["change_pct"], signed=True) + note])  # fmt: skip
    ppl_blocks = [Block("p", "Retention = baseline PPL / compressed PPL; change = (compressed - baseline) / baseline.")]
    ppl_blocks += [Block("warn", f"Warning: {w}") for w in run["warnings"] if "comparable" in w]
    ppl_blocks += [Block("table", headers=["Dataset", "Baseline PPL", "Compressed PPL", "Retention", "Change"], rows=ppl_rows)]

    verdict = run["verdict"]
    sections = [
        Section("1. Configuration", [config]),
        Section("2. Perplexity", ppl_blocks + img("ppl")),
        Section("3. Compression", _compression_blocks(run) + img("bits_hist") + img("bits_per_layer") + _layer_blocks(run) + img("rel_error")),
        Section("4. Cost", [_cost_table(c, run)]),
        Section("5. Verdict", [
            Block("p", "Rules: " + " | ".join(c["rules"]["text"])),
            Block("table", headers=["Rule", "Value", "Result", "Note"], rows=[
                [r["rule"], _rule_value(r), r["status"].upper(), r["note"]] for r in verdict["rules"]]),
            Block("p", f"Verdict: {verdict['summary']}"),
        ]),
        Section("6. Suggestions", [Block("list", items=[f"{s['text']} (triggered by: {s['trigger']})" for s in run["suggestions"]])]
                if run["suggestions"] else [Block("p", "None: no check triggered (budget, dataset outlier, calibration samples, "
                                                       "layer error outliers, width saturation, scale overhead, sparsity, "
                                                       "zero-shot accuracy).")]),
    ]
    if run.get("zeroshot"):
        sections.append(Section(f"{len(sections) + 1}. Zero-shot accuracy", _zeroshot_blocks(run)))
    if c.get("generations"):
        sections.append(Section(f"{len(sections) + 1}. Generations", _generation_blocks(c["generations"])))
    if c.get("frontier"):
        sections.append(Section(f"{len(sections) + 1}. Perplexity against honest size", _frontier_blocks(c["frontier"]) + img("frontier")))
    return title, intro, sections


def _frontier_blocks(fr: dict[str, Any]) -> list[Block]:
    """Every run and reference point by size; for each reference, the runs that beat it."""
    datasets = fr["datasets"]
    rows = [[p["name"] + (" (reference)" if p["reference"] else ""), num(p["size"], 3)]
            + [num(p["ppl"].get(d)) for d in datasets] for p in sorted(fr["points"], key=lambda p: p["size"])]
    beaten = [[ref, ", ".join(by) or "none"] for ref, by in fr["beaten_by"].items()]
    return [Block("p", f"Reference points from {fr['reference']}; size = bits per parameter of the quantized layers, "
                       "everything the packed file stores counted (docs/bit-accounting.md)."),
            Block("table", headers=["Point", "Size (bits/param)", *datasets], rows=rows),
            Block("table", headers=["Reference", "Runs of no larger size with lower wikitext2 and c4 PPL"], rows=beaten)]


def _zeroshot_blocks(run: dict[str, Any]) -> list[Block]:
    """Per task: accuracy ± stderr of baseline and run, change in points and retention; then the mean."""
    zs = run["zeroshot"]
    shots = {v for v in zs["num_fewshot"].values() if v is not None}
    harness = {v for v in zs["harness"].values() if v}
    text = (f"lm-evaluation-harness {', '.join(sorted(harness)) or DASH}, "
            f"{'/'.join(str(v) for v in sorted(shots)) or DASH}-shot. Accuracy in percent ± stderr; change in points "
            "(compressed - baseline); retention = compressed / baseline. The mean uses each task's headline metric "
            "(acc_norm for hellaswag and arc_challenge, acc elsewhere, as the papers report).")
    blocks = [Block("p", text)]
    blocks += [Block("warn", f"Warning: {w}") for w in zs["warnings"]]
    if zs["skipped"]:
        blocks.append(Block("warn", f"Not run for this model: {zs['skipped']}"))

    def acc(value: float | None, err: float | None) -> str:
        return DASH if value is None else (f"{value:.2f} ± {err:.2f}" if err is not None else f"{value:.2f}")

    rows = []
    for task, e in zs["tasks"].items():
        for metric, m in e["metrics"].items():
            note = "" if e["comparable"] else " (not alike)"
            name = task + (" (headline)" if metric == e["metric"] and len(e["metrics"]) > 1 else "")
            rows.append([name, metric, acc(m["baseline"], m["baseline_stderr"]), acc(m["compressed"], m["compressed_stderr"]),
                         DASH if m["change_pts"] is None else f"{m['change_pts']:+.2f}" + note, pct(m["retention_pct"]) + note])
    mean = zs["mean"]
    if mean is not None:
        rows.append([f"mean of {len(mean['tasks'])} task(s)", "headline", num(mean["baseline"]), num(mean["compressed"]),
                     f"{mean['change_pts']:+.2f}", pct(mean["retention_pct"])])
    blocks.append(Block("table", headers=["Task", "Metric", "Baseline %", "Compressed %", "Change (points)", "Retention"],
                        rows=rows))
    return blocks


def _generation_blocks(g: dict[str, Any]) -> list[Block]:
    """One table per prompt: what the baseline and each run generated."""
    cap = g["max_new_tokens"]
    blocks = [Block("p", f"Greedy decoding, at most {_or_dash(cap)} new tokens, recorded by misq eval and misq compress "
                         "(the chat template applied where the tokenizer has one).")]
    blocks += [Block("warn", f"Note: {n}") for n in g["notes"]]
    for i, p in enumerate(g["prompts"], 1):
        chat = " (chat template)" if p["chat_template"] else ""
        blocks.append(Block("p", f"Prompt {i}{chat}: {p['prompt']}"))
        rows = [["baseline", _gen(p["baseline"])]] + [[r["label"], _gen(r["output"])] for r in p["runs"]]
        blocks.append(Block("table", headers=["Model", "Generation"], rows=rows))
    return blocks


def _gen(text: str | None) -> str:
    if text is None:
        return f"{DASH} (not recorded)"
    return text if text.strip() else "(empty: stopped at once)"


def _rule_value(rule: dict[str, Any]) -> str:
    if rule["value"] is None:
        return DASH
    return f"{rule['value']:+.4f} bits" if rule["id"] == "budget" else pct(rule["value"])


def _runs_table(c: dict[str, Any]) -> Block:
    datasets: list[str] = []
    for run in c["runs"]:
        datasets += [ds for ds in run["perplexity"] if ds not in datasets]
    headers = ["#", "Run", "Verdict", "Avg bits", "Sparsity"]
    headers += [h for ds in datasets for h in (f"{ds} PPL", f"{ds} change")]
    zeroshot = any((run.get("zeroshot") or {}).get("mean") for run in c["runs"])
    headers += ["Zero-shot mean", "Zero-shot change"] if zeroshot else []
    headers += ["Ratio (model)", "Compress time"]
    rows = []
    for i, run in enumerate(c["runs"]):
        cfg = run["config"]
        # A dense run says so rather than "0.0%", as in the configuration table.
        sparsity = DENSE_TEXT if cfg["pattern"] == "dense" else \
            share(cfg["sparsity_actual"] if cfg["sparsity_actual"] is not None else cfg["sparsity_target"])
        row = [str(i + 1), run["label"], run["verdict"]["status"], num(run["compression"]["actual_avg_bits"], 3), sparsity]
        for ds in datasets:
            e = run["perplexity"].get(ds) or {}
            row += [num(e.get("compressed")), pct(e.get("change_pct"), signed=True)]
        if zeroshot:
            mean = (run.get("zeroshot") or {}).get("mean") or {}
            row += [pct(mean.get("compressed")), DASH if mean.get("change_pts") is None else f"{mean['change_pts']:+.2f} pts"]
        row += [ratio(run["compression"]["compression_ratio_model"]), duration(run["cost"]["compress_s"])]
        rows.append(row)
    return Block("table", headers=headers, rows=rows)


def _compression_blocks(run: dict[str, Any]) -> list[Block]:
    comp = run["compression"]
    rows = [
        ["Average channel bits", num(comp["avg_channel_bits"], 3)],
        ["Target average bits", num(comp["target_avg_bits"], 3)],
        ["Actual average bits", num(comp["actual_avg_bits"], 4)],
        ["Budget gap (actual - target)", DASH if comp["budget_gap_bits"] is None else f"{comp['budget_gap_bits']:+.4f}"],
        ["Bits per stored weight (with scales and zero points)", num(comp["bits_per_stored_weight"], 3)],
        ["Bits per parameter on disk, quantized layers", num(comp["bits_per_param_disk_quantized"], 3)],
        ["Bits per parameter on disk, whole model", num(comp["bits_per_param_disk_model"], 3)],
        ["Compression ratio vs FP16, quantized layers", ratio(comp["compression_ratio_quantized"])],
        ["Compression ratio vs FP16, whole model", ratio(comp["compression_ratio_model"])],
        ["Size of quantized layers", size(comp["bytes_quantized"])],
        ["Size of whole model", size(comp["bytes_model"])],
        ["Size of FP16 model", size(comp["bytes_fp16_model"])],
    ]
    blocks = [Block("table", headers=["Metric", "Value"], rows=rows)]
    if comp["histogram"]:
        blocks.append(Block("p", "Bit-width histogram (actual allocation):"))
        blocks.append(Block("table", headers=["Width", "Channels", "Channel share", "Weights", "Weight share"], rows=[
            [str(h["width"]), _or_dash(h["channels"]), share(h["channel_share"]), _or_dash(h["weights"]), share(h["weight_share"])]
            for h in comp["histogram"]]))  # fmt: skip
    return blocks


def _layer_blocks(run: dict[str, Any]) -> list[Block]:
    layers = run["layers"]
    rated = [r for r in layers["per_layer"] if r["rel_error"] is not None]
    if not rated:
        return []
    text = f"{layers['count']} quantized layers; median relative error {num(layers['median_rel_error'], 4)}"
    if layers["outlier_limit"] is not None:
        text += f", outlier limit (median + 3 MAD) {num(layers['outlier_limit'], 4)}, outliers: {len(layers['outliers'])}"
    worst = sorted(rated, key=lambda r: -r["rel_error"])[:5]
    return [
        Block("p", text + ". Highest errors:"),
        Block("table", headers=["Layer", "Avg bits", "Rel. error"],
              rows=[[r["name"], num(r["avg_bits"], 3), num(r["rel_error"], 4)] for r in worst]),
    ]


def _cost_table(c: dict[str, Any], run: dict[str, Any]) -> Block:
    rows = [["Compression time", DASH, duration(run["cost"]["compress_s"])]]
    datasets = list(dict.fromkeys([*c["baseline"]["eval_s"], *run["cost"]["eval_s"]]))
    for ds in datasets:
        rows.append([f"Evaluation time, {ds}", duration(c["baseline"]["eval_s"].get(ds)), duration(run["cost"]["eval_s"].get(ds))])
    return Block("table", headers=["Item", "Baseline", "Compressed"], rows=rows)


# --------------------------------------------------------------------------- markdown


def render_markdown(c: dict[str, Any], plots: dict[str, bytes] | None = None) -> str:
    """report.md: the same sections as the HTML; plots are only named (they live in report.html)."""
    title, intro, sections = build_sections(c, plots)
    out = [f"# {title}", ""]
    for block in intro:
        out += _md_block(block)
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            out += _md_block(block)
    return "\n".join(out).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block) -> list[str]:
    if b.kind == "p":
        return [b.text, ""]
    if b.kind == "warn":
        return [f"> **{b.text}**", ""]
    if b.kind == "list":
        return [f"- {item}" for item in b.items] + [""]
    if b.kind == "img":
        return [f"_Plot: {b.items[0]} (embedded in report.html)._", ""]
    lines = ["| " + " | ".join(_md_cell(h) for h in b.headers) + " |", "|" + "---|" * len(b.headers)]
    lines += ["| " + " | ".join(_md_cell(x) for x in row) + " |" for row in b.rows]
    return lines + [""]


# --------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; }
td.PASS { background: #d8f5d8; } td.FAIL { background: #f8d7d7; } td.INCOMPLETE, td.MISSING { background: #fff3cd; }
.warn { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; margin: 0.5em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; }
td { white-space: pre-wrap; }
"""


def render_html(c: dict[str, Any], plots: dict[str, bytes] | None = None) -> str:
    """report.html: one file, CSS inline and plots as base64 PNG data URIs (no external links)."""
    plots = plots or {}
    title, intro, sections = build_sections(c, plots)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    out += [_html_block(b, plots) for b in intro]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        out += [_html_block(b, plots) for b in section.blocks]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_block(b: Block, plots: dict[str, bytes]) -> str:
    esc = html.escape
    if b.kind == "p":
        return f"<p>{esc(b.text)}</p>"
    if b.kind == "warn":
        return f'<div class="warn">{esc(b.text)}</div>'
    if b.kind == "list":
        return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in b.items) + "</ul>"
    if b.kind == "img":
        data = base64.b64encode(plots[b.text]).decode("ascii")
        return (f'<figure><img alt="{esc(b.items[0])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(b.items[0])}</figcaption></figure>")  # fmt: skip
    head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{esc(x)}">{esc(x)}</td>' if x in ("PASS", "FAIL", "INCOMPLETE", "MISSING")
                         else f"<td>{esc(x)}</td>" for x in row) + "</tr>"
        for row in b.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


__all__ = ["Block", "Section", "build_sections", "render_html", "render_markdown"]
