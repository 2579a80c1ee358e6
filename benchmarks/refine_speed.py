"""Seconds per coordinate-descent pass (``--refine-passes``) on a 13B-shaped decoder layer.

Times :func:`misq.algorithms.coordinate_descent.coordinate_descent` on random weights and a
random positive-definite Hessian for each solve of a LLaMA-13B layer (q/k/v stacked, o, gate/up
stacked, down), 50% + 4-bit per-row grids, next to the sweep itself (:func:`solve`, fused
kernel where it runs) so the ratio says what a pass costs against the solve. Writes
``refine_speed.json`` under --out.

    python benchmarks/refine_speed.py --out "$OUT"            # one H200
    python benchmarks/refine_speed.py --small --device cpu    # smoke test
    python benchmarks/refine_speed.py --launch 8,4 4,4 4,2    # the descent kernel's launch settings

``--launch R,W ...`` times one pass per shape under each (rows per program, warps) of the
descent kernel (fused_descent.DESCENT_CONFIGS for 128-column blocks), after the default run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from misq.algorithms import fused_descent
from misq.algorithms.coordinate_descent import coordinate_descent
from misq.algorithms.fused import get_block_fn
from misq.algorithms.quantizer import find_grid
from misq.algorithms.sparsegpt import column_params, solve
from misq.atomic import atomic_write_json

log = logging.getLogger("refine_speed")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _problem(rows: int, cols: int, device: str):
    """A random [rows, cols] layer, its damped Hessian [cols, cols], the 50% + 4-bit sweep's result
    on it, the grid's column function, and the sweep's seconds."""
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(4 * cols, cols, device=device, generator=g)
    H = X.T @ X / X.shape[0]
    del X
    W = torch.randn(rows, cols, device=device, generator=g)
    grid = find_grid(W, torch.zeros(cols, dtype=torch.long, device=device), torch.tensor([4], device=device))
    block_fn = get_block_fn(device) if device.startswith("cuda") else None
    _sync(device)
    t0 = time.perf_counter()
    res = solve(W, H, column_params([grid]), sparsity=0.5, block_fn=block_fn, refit=False)
    _sync(device)
    t_solve = time.perf_counter() - t0
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * H.diagonal().mean())

    def cols_of(i1: int, i2: int):
        s, z, m = grid.column_grid(i1, i2)
        return s, z, m.unsqueeze(0).expand(rows, -1)

    return W, Hd, res, cols_of, t_solve


def time_solve(rows: int, cols: int, device: str, passes: int, trace_dir: Path | None = None) -> dict:
    """Seconds of the solve and of one descent pass on a random [rows, cols] layer; without
    ``trace_dir``, how many weights each further pass moves; with it, a profile of one pass."""
    W, Hd, res, cols_of, t_solve = _problem(rows, cols, device)
    Wq = res.weight.clone()
    coordinate_descent(Wq.clone(), W, Hd, res.keep, cols_of, passes=1)  # warm-up: Triton compiles for these strides
    _sync(device)
    t0 = time.perf_counter()
    change = coordinate_descent(Wq, W, Hd, res.keep, cols_of, passes=passes)
    _sync(device)
    t_cd = (time.perf_counter() - t0) / passes
    moved = []  # per pass: share of weights that moved, and of (row, block) pairs with any move
    Wm = res.weight.clone()
    for _ in range(passes if trace_dir is None else 0):
        before_w = Wm.clone()
        coordinate_descent(Wm, W, Hd, res.keep, cols_of, passes=1)
        d = (Wm != before_w)
        blocks = d[:, : cols // 128 * 128].reshape(rows, -1, 128).any(-1)
        moved.append({"weights": round(d.float().mean().item(), 5), "row_blocks": round(blocks.float().mean().item(), 5)})
    if trace_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            coordinate_descent(Wq, W, Hd, res.keep, cols_of, passes=1)
            _sync(device)
        trace_dir.mkdir(parents=True, exist_ok=True)
        (trace_dir / f"refine_trace_{rows}x{cols}.txt").write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
            + "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
    before = float(res.error_terms[0][0]) if res.error_terms else float("nan")
    return {"rows": rows, "cols": cols, "solve_s": round(t_solve, 4), "pass_s": round(t_cd, 4), "moved_per_pass": moved,
            "pass_over_solve": round(t_cd / t_solve, 2), "error_change_rel": float(change.sum()) / before if before else None}


def time_recording(rows: int, cols: int, device: str, passes: int, repeats: int) -> dict:
    """Seconds of ``passes`` descent passes on one [rows, cols] layer, relaunched against recorded
    (``coordinate_descent(record=...)``), alternated ``repeats`` times in this one process (the
    machine's drift between calls is larger than the difference); the weights must agree bit for bit."""
    W, Hd, res, cols_of, _ = _problem(rows, cols, device)
    times: dict[str, list[float]] = {"relaunched": [], "recorded": []}
    results = {}
    for flag in (False, True):  # warm-up: Triton compiles, the recording stream is made
        coordinate_descent(res.weight.clone(), W, Hd, res.keep, cols_of, passes=passes, record=flag)
    for _ in range(repeats):
        for name, flag in (("relaunched", False), ("recorded", True)):
            Wq = res.weight.clone()
            _sync(device)
            t0 = time.perf_counter()
            coordinate_descent(Wq, W, Hd, res.keep, cols_of, passes=passes, record=flag)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            results[name] = Wq
    best = {k: min(v) for k, v in times.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"rows": rows, "cols": cols, "passes": passes, "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "recorded_over_relaunched_median": round(med["recorded"] / med["relaunched"], 3),
            "recorded_over_relaunched_best": round(best["recorded"] / best["relaunched"], 3),
            "equal": bool(torch.equal(results["recorded"], results["relaunched"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--trace", action="store_true", help="profile one pass per shape (refine_trace_*.txt in --out)")
    ap.add_argument("--launch", nargs="*", default=[], metavar="R,W",
                    help="also time one pass under each (rows per program, warps) of the descent kernel")
    ap.add_argument("--recording", type=int, default=0, metavar="N",
                    help="only: --passes passes relaunched against recorded as a CUDA graph, alternated N times a shape")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    d, f = (128, 352) if args.small else (args.hidden, args.ffn)
    shapes = {"qkv": (3 * d, d), "o": (d, d), "gate_up": (2 * f, d), "down": (d, f)}
    time_solve(64, 256, args.device, 1)  # warm-up: kernels compiled, allocator primed
    if args.recording:
        ab = {name: time_recording(r, c, args.device, args.passes, args.recording) for name, (r, c) in shapes.items()}
        for name, row in ab.items():
            log.info("%s %s", name, row)
        layer = {k: round(sum(sorted(row["seconds"][k])[args.recording // 2] for row in ab.values()), 4)
                 for k in ("relaunched", "recorded")}
        log.info("layer (medians): %s, recorded/relaunched %.3f", layer, layer["recorded"] / layer["relaunched"])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out) / "refine_recording.json", {"shapes": ab, "layer_median_s": layer})
        return
    rows = {}
    for name, (r, c) in shapes.items():
        rows[name] = time_solve(r, c, args.device, args.passes, Path(args.out) if args.trace else None)
        log.info("%s %s", name, rows[name])
    total = {k: round(sum(v[k] for v in rows.values()), 4) for k in ("solve_s", "pass_s")}
    log.info("layer: solves %.3f s, one pass %.3f s", total["solve_s"], total["pass_s"])
    launches = {}
    default = fused_descent.DESCENT_CONFIGS[128] if args.launch else None
    for spec in args.launch:
        fused_descent.DESCENT_CONFIGS[128] = tuple(int(v) for v in spec.split(","))
        per = {name: time_solve(r, c, args.device, 1)["pass_s"] for name, (r, c) in shapes.items()}
        launches[spec] = {"shapes": per, "layer_pass_s": round(sum(per.values()), 4)}
        log.info("launch %s: one pass %.3f s %s", spec, launches[spec]["layer_pass_s"], per)
    if args.launch:
        fused_descent.DESCENT_CONFIGS[128] = default
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "refine_speed.json", {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                                                  else "cpu", "shapes": rows, "layer": total, "passes": args.passes,
                                                  "default_launch": list(default or ()), "launches": launches})


if __name__ == "__main__":
    main()
