"""Decode and prefill speed of the packed runtime on one GPU (issue 14).

Per 13B-shaped linear (out x in: 5120x5120 q/o, 13824x5120 gate/up, 5120x13824 down), at batches
1 to 16 (decode): misq's kernels vs fp16 cuBLAS vs torch's int4 tinygemm (groups of 128), CUDA-graph
timed (triton.testing.do_bench_cudagraph), for dense 4-bit g128, 3-bit g128, 50% + 4-bit g128
and mixed 3/4-bit g128; the weights' GPU bytes against the honest (file) size. Prefill (--prefill,
M = 512 and 2048 rows by default): the same linears through the fused tensor-core kernel (tiles
dequantized on the fly) and through dequantize + cuBLAS, against fp16 cuBLAS. Then end-to-end
greedy decode tokens/s of a 13B-shaped LLaMA (--layers decoder layers, random weights) in fp16
and packed, in the same static-cache loop, one decode step replayed as a CUDA graph (--compile:
both models compiled first). --prefill-model M,...: the same model's prompt forward of M tokens
and its greedy decode without a CUDA graph, eager, host time included, fp16 against packed.

    PYTHONPATH=src python3 benchmarks/decode_speed.py --skip-e2e --workers 16 --out decode.json

(--tune first sweeps the launch settings per shape and keeps the best for the rows; without it the
rows use launch_plan.default_config, as the runtime does; --tuned-from JSON starts from an earlier
tune.) Each linear is timed twice: its one call repeated (``*_us``; its weights may stay in L2,
which flatters packed layers of 14-37 MB against fp16's 52-142 MB) and over copies of its weights
larger than L2 (``*_cold_us``, --cold-mib), as a model's layers read them; --tune times the cold
way. The packed models give each step's layers (q/k/v, gate/up) one column order, as misq's
solves do, and time each uniform format unmerged and merged (misq.runtime.merge; --skip-merged for
unmerged only); --floor also times the model with every decoder linear computing nothing.
Its parts: decode_layers.py (shapes, formats, random layers, timers), decode_tune.py (--tune),
decode_model.py (the whole-model timings); this file times the linears and runs them all.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from decode_layers import (
    FLIPPABLE,
    FORMATS,
    MERGED_SHAPES,
    SHAPES,
    G,
    bench,
    bench_cold,
    copies_for,
    flipped,
    random_packed,
    with_copies,
)
from decode_model import E2E_FORMATS, end_to_end, prefill_model
from decode_tune import candidates, load_tuned, prewarm, tune, tuned_rows


def tinygemm(rows: int, cols: int):
    """fn(x) running torch's int4 kernel on a random [rows, cols] weight, or None if unavailable."""
    try:
        w = torch.randint(0, 16, (rows, cols), dtype=torch.int32, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(cols // G, rows, 2, device="cuda", dtype=torch.bfloat16)
        fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, G, sz)  # noqa: E731
        fn(torch.randn(1, cols, device="cuda", dtype=torch.bfloat16))
        return fn
    except (RuntimeError, AttributeError) as err:
        print("tinygemm unavailable:", str(err).splitlines()[0])
        return None


def _errors(lin, x, y) -> tuple[float, float]:
    """(max |y - ref|, max |y - ref| / fp16 tolerance) against x @ W^T in float64 (W the
    dequantized weight); <= 1 is within fp16 rounding."""
    W = lin.dequantize(torch.float16)
    ref = x.double() @ W.double().t()
    tol = 2.0 ** -11 * (x.abs().double() @ W.abs().double().t()) + 2.0 ** -10 * ref.abs() + 1e-5
    d = (y.double() - ref).abs()
    return d.max().item(), (d / tol).max().item()


def gathers(shapes: dict, batches: tuple) -> list[dict]:
    """The column gather before the kernels (x[:, perm]): torch's index_select against
    kernels.gather_columns, per input width and batch."""
    from misq.runtime.kernels import gather_columns

    out = []
    for C in sorted({c for _, c in shapes.values()}):
        idx = torch.randperm(C, device="cuda").to(torch.int32)
        for M in batches:
            x = torch.randn(M, C, device="cuda", dtype=torch.float16)
            r = {"cols": C, "batch": M, "index_select_us": bench(lambda x=x, idx=idx: x.index_select(1, idx)),
                 "gather_columns_us": bench(lambda x=x, idx=idx: gather_columns(x, idx))}
            print(json.dumps(r), flush=True)
            out.append(r)
    return out


def h2_parts(lins: list, x: torch.Tensor) -> dict:
    """Batch 1, cold: the h2 path's two launches timed apart over the same copies of a layer's
    weights: x's gather alone (``gather_cold_us``: half2_gather._gather_pairs, all the layer's h2
    segments in one launch) and the decode kernel alone on gathered pairs, launched without PDL
    (``h2_alone_cold_us``: no wait, and no overlap with the launch before), to set against the
    pair as the runtime runs it (``misq_cold_us``). {} for a layer whose plan is not one h2 launch
    after a gather."""
    from dataclasses import replace

    from misq.runtime.decode_plan import _H2Step
    from misq.runtime.launch_plan import config_for

    gathers, decodes = [], []
    for lin in lins:
        steps = lin.decode_plan(1).steps
        if len(steps) != 1 or not isinstance(steps[0], _H2Step) or not steps[0].pregather:
            return {}
        cfgs = [replace(config_for(1, s.bits, lin.out_features, lin.perm.numel()), pdl=False) for s in lin.segments]
        step, alone = steps[0], lin.decode_plan(1, cfgs).steps[0]
        buf = torch.empty(step.scratch, dtype=torch.int32, device=x.device)
        out = torch.empty(1, lin.out_features, dtype=x.dtype, device=x.device)
        step.gather(x, out, buf, buf.view(torch.float32))  # the pairs the kernel alone reads
        gathers.append(lambda step=step, out=out, buf=buf: step.gather(x, out, buf, buf.view(torch.float32)))
        decodes.append(lambda alone=alone, out=out, buf=buf: alone.decode(x, out, buf, buf.view(torch.float32)))
    return {"gather_cold_us": bench_cold(gathers), "h2_alone_cold_us": bench_cold(decodes)}


def linears(shapes: dict, formats: list, batches: tuple, tinygemm_batches: tuple = (1, 16),
            flips: tuple[str, ...] = (), cold_bytes: int = 256 << 20, parts: bool = False) -> list[dict]:
    """Per shape, format and batch: misq's default path against fp16 cuBLAS and torch's int4
    kernel (CUDA-graph timed), its error against the dequantized weights, GPU and honest bytes;
    at batch 1 also a mixed layer's widths one launch each (and with ``parts``, cold, the h2
    path's gather and kernel timed apart: h2_parts); at every batch each launch_plan switch
    named in ``flips`` at its other setting (``misq_<name>_on_us`` or ``_off_us``, cold too; a
    switch changes the default settings only, not those of --tuned-from).
    ``cold_bytes`` > 0: each of the three also timed over copies of its weights of at least that
    many bytes in all (``*_cold_us``, bench_cold), so that no call finds its weights in L2; the
    warm figures (``*_us``) flatter the packed layers, whose 14-37 MB fit in an H200's 50 MB L2
    while fp16's 52-142 MB do not."""

    from misq.runtime.decode_plan import decode_matmul

    rows_out = []
    for shape_name, (R, C) in shapes.items():
        Wd = torch.randn(R, C, device="cuda", dtype=torch.float16) * 0.02
        tg = tinygemm(R, C)
        fp16, fp16_cold, tg_cold = {}, {}, {}
        Wds = [Wd] + [torch.randn_like(Wd) * 0.02 for _ in range(copies_for(R * C * 2, cold_bytes) - 1)]
        tgs = [tg] + [tinygemm(R, C) for _ in range(copies_for(R * C // 2, cold_bytes) - 1)] if tg else []
        for M in batches:
            x = torch.randn(M, C, device="cuda", dtype=torch.float16)
            fp16[M] = bench(lambda x=x, Wd=Wd: F.linear(x, Wd))
            if cold_bytes:
                fp16_cold[M] = bench_cold([lambda x=x, W=W: F.linear(x, W) for W in Wds])
                if tgs and M in tinygemm_batches:
                    xb = x.to(torch.bfloat16)
                    tg_cold[M] = bench_cold([lambda xb=xb, t=t: t(xb) for t in tgs])
        del Wds, tgs
        for fmt in formats:
            lin, honest = random_packed(R, C, *FORMATS[fmt])
            lins = with_copies(lin, fmt, cold_bytes)
            for M in batches:
                x = torch.randn(M, C, device="cuda", dtype=torch.float16)
                xb = x.to(torch.bfloat16)
                err, err_rel = _errors(lin, x, lin(x))
                r = {"shape": shape_name, "format": fmt, "batch": M, "misq_us": bench(lambda x=x, lin=lin: lin(x)),
                     "fp16_cublas_us": fp16[M],
                     "int4_tinygemm_us": bench(lambda xb=xb, tg=tg: tg(xb)) if tg is not None and M in tinygemm_batches
                     else None,
                     "max_abs_err_vs_dequant": err, "err_over_fp16_tolerance": err_rel, "gpu_bytes": lin.weight_nbytes,
                     "honest_bytes": honest, "gpu_over_honest": lin.weight_nbytes / honest}
                r["speedup_vs_fp16"] = r["fp16_cublas_us"] / r["misq_us"]
                if cold_bytes:  # weights read from memory on every call, as in a model
                    r.update(copies=len(lins), misq_cold_us=bench_cold([lambda x=x, m=m: m(x) for m in lins]),
                             fp16_cublas_cold_us=fp16_cold[M], int4_tinygemm_cold_us=tg_cold.get(M))
                    r["speedup_vs_fp16_cold"] = r["fp16_cublas_cold_us"] / r["misq_cold_us"]
                    if parts and M == 1:
                        r.update(h2_parts(lins, x))
                for name in flips:  # side by side: the switch's other setting
                    with flipped(name) as now:
                        key = f"misq_{name.lower()}_{'on' if now else 'off'}"
                        try:
                            r[key + "_us"] = bench(lambda x=x, lin=lin: lin(x))
                            if cold_bytes:
                                r[key + "_cold_us"] = bench_cold([lambda x=x, m=m: m(x) for m in lins])
                            r[key + "_err_over_fp16_tolerance"] = _errors(lin, x, lin(x))[1]
                        except Exception as err:  # reported: the driver may not take the launch attribute
                            r[key + "_error"] = str(err).splitlines()[0][:200]
                if M == 1 and len(lin.segments) == 2:  # side by side: the two widths in one launch or one by one
                    r["misq_one_launch_a_width_us"] = bench(lambda x=x, lin=lin, R=R: decode_matmul(
                        x, lin.perm, lin.segments, R, lin.bias, kperm=lin.kperm, pair_h2=False))
                print(json.dumps(r), flush=True)
                rows_out.append(r)
            del lin, lins
        del Wd
    return rows_out


def prefill(shapes: dict, formats: list, rows: tuple, dequant_configs: tuple = ((64, 4), (128, 4), (128, 8), (256, 8))
            ) -> list[dict]:
    """Per shape, format and M: the fused prefill kernel, dequantize + cuBLAS, and what the layer's
    forward picks (launch_plan.PREFILL_FUSED_MAX_ROWS), against fp16 cuBLAS. First, per shape, the
    dequantize kernel's BLOCK_N / warps (fastest kept for the rows)."""
    from misq.runtime import kernels, launch_plan

    out = []
    for shape_name, (R, C) in shapes.items():
        Wd = torch.randn(R, C, device="cuda", dtype=torch.float16) * 0.02
        if dequant_configs:  # the dequantize kernel alone (4-bit): keep the fastest setting for this shape
            dl = random_packed(R, C, *FORMATS["4bit_g128"])[0]
            wt = torch.empty(C, R, device="cuda", dtype=torch.float16)
            times = sorted((bench(lambda c=c, wt=wt, perm=dl.perm, segs=dl.segments, R=R: kernels.dequantize_into(wt, perm, segs, R, *c)), c)
                           for c in dequant_configs)
            kernels.DEQUANT_CONFIG = times[0][1]
            out.append({"shape": shape_name, "dequantize_4bit_us": {f"{c[0]}x{c[1]}w": t for t, c in times},
                        "dequantize_4bit_GBps": (C * R * 2.5) / times[0][0] / 1e3})
            print(json.dumps(out[-1]), flush=True)
            del dl, wt
        for M in rows:
            x = torch.randn(M, C, device="cuda", dtype=torch.float16)
            t16 = bench(lambda x=x, Wd=Wd: F.linear(x, Wd))
            for fmt in formats:
                lin, _ = random_packed(R, C, *FORMATS[fmt])
                r = {"shape": shape_name, "format": fmt, "rows": M, "fp16_cublas_us": t16,
                     "dequant_cublas_us": bench(lambda x=x, lin=lin: lin._prefill_dequant(x))}
                if lin.fused_prefill_ok():
                    y = lin._prefill_fused(x)
                    r["fused_us"] = bench(lambda x=x, lin=lin: lin._prefill_fused(x))
                    r["max_abs_err_vs_dequant"], r["err_over_fp16_tolerance"] = _errors(lin, x, y)
                    r["config"] = vars(launch_plan.config_for(M, lin.segments[0].bits, R, C))
                r["forward"] = "fused" if lin.fused_prefill_ok() and M <= launch_plan.PREFILL_FUSED_MAX_ROWS else "dequant"
                r["misq_us"] = r["fused_us"] if r["forward"] == "fused" else r["dequant_cublas_us"]
                r["slowdown_vs_fp16"] = r["misq_us"] / t16
                r["best_slowdown_vs_fp16"] = min(r["dequant_cublas_us"], r.get("fused_us", 1e9)) / t16
                print(json.dumps(r), flush=True)
                out.append(r)
                del lin
        del Wd
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="decode_speed.json")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the end-to-end model")
    ap.add_argument("--skip-linears", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true", help="time the linears only")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="packed formats to time (end to end: those of " + ", ".join(E2E_FORMATS) + " named here)")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--prefill", default="512,2048", help="prefill rows to time ('' for none)")
    ap.add_argument("--tune", action="store_true", help="sweep the kernels' launch settings first")
    ap.add_argument("--workers", type=int, default=12, help="processes compiling kernels up front (0: none)")
    ap.add_argument("--tune-gather", action="store_true",
                    help="with --tune at batch 1: only the h2 defaults, x gathered first against gathered per program")
    ap.add_argument("--prefill-model", default="", help="prefill rows of the whole-model timing ('' for none)")
    ap.add_argument("--prefill-graph", action="store_true",
                    help="--prefill-model: each prompt's forward replayed as a CUDA graph (the GPU's time alone)")
    ap.add_argument("--floor", action="store_true",
                    help="end to end: last, the model with every decoder linear computing nothing (the floor)")
    ap.add_argument("--flip", default="", metavar="NAMES",
                    help="linears and end to end: also time with each named launch_plan switch (" + ", ".join(FLIPPABLE)
                         + ") at its other setting, side by side")
    ap.add_argument("--pdl", action="store_true", help="the same as --flip H2_PDL")
    ap.add_argument("--parts", action="store_true",
                    help="linears at batch 1, cold: also the h2 path's x gather and kernel timed apart")
    ap.add_argument("--merged-shapes", action="store_true",
                    help="linears and --tune: also the merged q/k/v and gate/up shapes (15360 and 27648 x 5120)")
    ap.add_argument("--cold-mib", type=int, default=256,
                    help="linears: also time each over copies of its weights of this many MiB in all, so none is "
                         "read from L2 (0: warm figures only); --tune: time the settings so (0: one layer, warm)")
    ap.add_argument("--skip-merged", action="store_true",
                    help="end to end and --prefill-model: only unmerged layers (not also q/k/v and gate/up merged)")
    ap.add_argument("--merged-only", action="store_true",
                    help="end to end and --prefill-model: formats whose layers merge timed merged only (not also unmerged)")
    ap.add_argument("--tuned-from", default="", metavar="JSON",
                    help="start from the fastest settings of an earlier --tune run's JSON (launch_plan.TUNED)")
    ap.add_argument("--compile", action="store_true",
                    help="end to end: torch.compile each model's forward (fp16 and packed alike) before the CUDA graph")
    args = ap.parse_args()
    formats, batches = args.formats.split(","), tuple(int(b) for b in args.batches.split(","))
    # end to end: the chosen formats among the three the issue names (all three unless --formats narrows them)
    e2e_formats = tuple(f for f in E2E_FORMATS if f in formats)
    pf_rows = tuple(int(m) for m in args.prefill.split(",") if m)
    tuned = load_tuned(args.tuned_from) if args.tuned_from else {}
    flips = tuple(n for n in args.flip.split(",") if n) + (("H2_PDL",) if args.pdl else ())
    if bad := [n for n in flips if n not in FLIPPABLE]:
        ap.error(f"--flip: unknown switch {', '.join(bad)}; choose from {', '.join(FLIPPABLE)}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    shapes = SHAPES | (MERGED_SHAPES if args.merged_shapes else {})

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)

    if args.workers:
        # Triton specializes integer arguments on == 1 and on divisibility by 16: one batch of each kind
        kinds = sorted({1 if b == 1 else (16 if b % 16 == 0 else 2) for b in batches})
        jobs = []
        for (_, bits, R, C), cfg in tuned.items():  # --tuned-from's settings, for both widths' formats
            jobs += [(R, C, f, M, cfg) for f in ("4bit_g128", "3bit_g128", "mixed_3_4_g128", "50pct_4bit_g128")
                     if str(bits) in f for M in (1, 16)]
        for R, C in shapes.values():
            if args.tune:
                for M in tuned_rows(batches, pf_rows):
                    jobs += [(R, C, f, M, cfg) for f in ("4bit_g128", "3bit_g128", "mixed_3_4_g128")
                             for cfg in candidates(M, args.tune_gather)]
            jobs += [(R, C, f, M, None) for f in formats for M in kinds + list(pf_rows[:1])]
        if not args.skip_e2e:
            jobs += [(R, C, f, M, None) for R, C in SHAPES.values() for f in e2e_formats for M in (1, 16)]
        prewarm(sorted(set(jobs), key=str), args.workers)
    if args.tuned_from:
        from misq.runtime import launch_plan

        launch_plan.TUNED.update(tuned)
        res["tuned_from"] = {"path": args.tuned_from, "settings": {str(k): vars(c) for k, c in tuned.items()}}
    if args.tune:
        res["tune"] = tune(shapes, batches, pf_rows, args.tune_gather, args.cold_mib << 20)
        save()
    if not args.skip_linears:
        res["gathers"] = gathers(shapes, batches)
        res["linears"] = linears(shapes, formats, batches, flips=flips, cold_bytes=args.cold_mib << 20,
                                 parts=args.parts)
        save()
    if pf_rows:
        res["prefill"] = prefill(shapes, formats, pf_rows)
        save()
    if args.prefill_model:
        res["prefill_model"] = prefill_model(args.layers, tuple(int(m) for m in args.prefill_model.split(",")),
                                             merged=not args.skip_merged, formats=tuple(formats),
                                             merged_only=args.merged_only, graph=args.prefill_graph)
        save()
    if not args.skip_e2e:
        try:
            res["end_to_end"] = end_to_end(args.layers, args.compile, flips, e2e_formats, not args.skip_merged,
                                           args.floor, args.merged_only)
        except Exception as err:  # report what failed, keep the linear results
            res["end_to_end_error"] = repr(err)
            print("end-to-end failed:", repr(err))
    save()


if __name__ == "__main__":
    main()
