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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch
import torch.nn.functional as F

from misq.checkpoint.layer_format import layer_nbytes
from misq.runtime.layout import Segment, pack_words
from misq.runtime.linear import PackedLinear

SHAPES = {"qo_5120x5120": (5120, 5120), "gate_up_13824x5120": (13824, 5120), "down_5120x13824": (5120, 13824)}
# a 13B layer's q/k/v and gate/up as the runtime merges them (misq.runtime.merge): --merged-shapes
MERGED_SHAPES = {"qkv_15360x5120": (15360, 5120), "gate_up_merged_27648x5120": (27648, 5120)}
FORMATS = {  # name: (widths of the column halves, unstructured sparsity)
    "4bit_g128": ((4, 4), 0.0), "3bit_g128": ((3, 3), 0.0), "50pct_4bit_g128": ((4, 4), 0.5), "mixed_3_4_g128": ((3, 4), 0.0),
}
G = 128


def random_packed(rows: int, cols: int, widths: tuple[int, int], sparsity: float, device: str = "cuda",
                  perm: torch.Tensor | None = None) -> tuple[PackedLinear, int]:
    """(a random PackedLinear, the honest byte count its file would hold). Columns: a random
    permutation (act-order; or ``perm``), the first half at widths[0], the rest at widths[1], groups of 128."""
    perm = torch.randperm(cols, device=device).to(torch.int32) if perm is None else perm
    half = cols // 2
    segs, start, meta_bits, survivors = [], 0, [], {}
    for b in sorted(set(widths)):
        n = sum(half if i == 0 else cols - half for i, w in enumerate(widths) if w == b)
        k = -(-n // G)
        codes = torch.randint(0, 1 << b, (rows, n), device=device)
        zeros = torch.randint(0, 1 << b, (rows, k), device=device)
        gidx = torch.arange(n, device=device) // G
        if sparsity:  # pruned weights hold their zero-point code
            codes = torch.where(torch.rand(rows, n, device=device) < sparsity, zeros[:, gidx], codes)
        segs.append(Segment(bits=b, start=start, n=n, words=pack_words(codes, b),
                            scales=(torch.rand(k, rows, device=device) * 0.01 + 1e-3).half(),
                            zeros=zeros.t().contiguous().to(torch.uint8), gidx=gidx.to(torch.int32), group_len=G))
        start += n
        meta_bits += [b] * k
        survivors[str(b)] = round(rows * n * (1 - sparsity))
    meta = {"rows": rows, "cols": cols, "groups": len(meta_bits), "group_bits": meta_bits, "permuted": True,
            "survivors": survivors}
    honest = sum(layer_nbytes(meta, "unstructured" if sparsity else "dense").values())
    return PackedLinear(perm, segs, None, rows), honest


def bench(fn, rep: int = 20) -> float:
    """Microseconds per call, CUDA-graph replayed. The same call repeats with nothing in between,
    so weights that fit in L2 (50 MB on an H200) are read from it after the first call: see
    bench_cold for the figure a model, whose every layer has its own weights, sees."""
    import triton.testing

    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=rep)


def copies_for(nbytes: int, cold_bytes: int) -> int:
    """How many copies of a weight of ``nbytes`` make at least ``cold_bytes`` (at least 1)."""
    return max(1, -(-cold_bytes // max(nbytes, 1)))


def with_copies(lin: PackedLinear, fmt: str, cold_bytes: int) -> list[PackedLinear]:
    """``lin`` and further random layers of its shape and format, together at least ``cold_bytes``
    (just ``lin`` for 0): the layers bench_cold cycles through."""
    R, C = lin.out_features, lin.in_features
    return [lin] + [random_packed(R, C, *FORMATS[fmt])[0] for _ in range(copies_for(lin.weight_nbytes, cold_bytes) - 1)]


def bench_cold(fns: list) -> float:
    """Microseconds per call of one of ``fns`` (the same operation on different copies of its
    weights, together larger than L2), CUDA-graph replayed one after the other: each call reads
    its weights from memory, as a decoder layer does."""
    return bench(lambda: [f() for f in fns]) / len(fns)


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


def candidates(M: int, gather_only: bool = False) -> list:
    """Launch settings --tune sweeps at M rows (the runtime's default first). At M = 1: the fp16
    pairs kernel (h2, 3- and 4-bit layers; others fall back to their default), the float32 CUDA-core
    kernel with x gathered before it (pregather: float32, pre-scaled) and the tensor cores."""
    from misq.runtime.launch_plan import Config

    if M == 1 and gather_only:  # the runtime's h2 defaults, x gathered first or by each program
        from dataclasses import replace

        from misq.runtime.launch_plan import default_config

        return [c for b in (4, 3) for d in [default_config(1, b, 0, 0)] for c in (d, replace(d, pregather=False))]
    if M == 1:  # h2: x gathered first into fp16 pairs (pregather) or by each program for its own blocks
        # (fewer programs than one wave, several blocks each, loads pipelined by num_stages, against
        # one block a program); gathered first, each launched as the runtime does (PDL or not)
        from misq.runtime.launch_plan import H2_PDL

        return [*(Config("h2", bn, t, w, st, pregather=True, pdl=H2_PDL) for bn, t, w, st in
                  ((256, 1056, 4, 1), (128, 2112, 4, 1), (512, 2112, 4, 1), (256, 2112, 2, 1), (64, 2112, 2, 1),
                   (64, 4224, 4, 1), (64, 660, 2, 3), (128, 660, 4, 3), (128, 528, 2, 3), (256, 264, 4, 3),
                   (64, 1320, 2, 2), (128, 1320, 4, 2),
                   # session 12's: two blocks a program pipelined (the 3-bit default), narrower programs
                   (64, 2112, 4, 2), (32, 2112, 4, 2), (32, 4224, 2, 1), (32, 2640, 1, 2),
                   # deeper pipelines, for weights streamed from memory rather than L2 (--cold-mib)
                   (64, 1320, 2, 3), (64, 660, 4, 4), (128, 1056, 4, 3), (32, 1320, 2, 4))),
                Config("h2", 256, 1056, 4),
                Config("mma", 64, 2112, 4, pregather=True), Config("fma", 64, 2112, 4, pregather=True)]
    if M <= 16:  # the default first, then longer or shorter split-K programs, pipelined or not
        return [Config("mma", 64, 2112, 4, pregather=True)] + [
            Config("mma", bn, t, w, st, pregather=True)
            for bn, w, ts in ((64, 4, (528, 1056, 2112, 4224)), (128, 8, (1056, 2112))) for t in ts for st in (1, 2, 3)
            if (bn, t, st) != (64, 2112, 1)]
    return [Config("mma", 64, 1, 4, 3, block_m=128), Config("mma", 128, 1, 8, 3, block_m=128),
            Config("mma", 64, 1, 4, 3, block_m=256), Config("mma", 128, 1, 8, 3, block_m=256),
            Config("mma", 64, 1, 4, 4, block_m=64)]


def _set(lin, M: int, cfg) -> None:
    from misq.runtime import launch_plan

    R, C = lin.out_features, lin.in_features
    for seg in lin.segments:
        launch_plan.TUNED[(launch_plan.bucket(M), seg.bits, R, C)] = cfg


def _warm(job) -> str:
    """Compile (into Triton's disk cache) what one (shape, format, batch, config) needs."""
    R, C, fmt, M, cfg = job
    torch.manual_seed(0)
    lin = random_packed(R, C, *FORMATS[fmt])[0]
    if cfg is not None:
        _set(lin, M, cfg)
    try:
        x = torch.randn(M, C, device="cuda", dtype=torch.float16)
        lin(x)
        if M > 16:
            lin._prefill_dequant(x)
            if lin.fused_prefill_ok():
                lin._prefill_fused(x)
        torch.cuda.synchronize()
        return "ok"
    except Exception as err:  # reported, and skipped later
        return f"{job}: {str(err).splitlines()[0][:100]}"


def prewarm(jobs: list, workers: int) -> None:
    """Compile every kernel variant in parallel processes (Triton's cache is on disk)."""
    import multiprocessing as mp

    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        bad = [r for r in pool.map(_warm, jobs, chunksize=1) if r != "ok"]
    print(f"prewarm: {len(jobs)} jobs in {time.time() - t:.0f}s", *bad, sep="\n", flush=True)


def tuned_rows(batches: tuple, prefill_rows: tuple) -> list[int]:
    """The rows of x tune() times at: the largest batch of each TUNED bucket, and prefill's smallest."""
    from misq.runtime import launch_plan

    reps = sorted({max(b for b in batches if launch_plan.bucket(b) == k) for k in {launch_plan.bucket(b) for b in batches}})
    return reps + ([min(prefill_rows)] if prefill_rows else [])


def tune(shapes: dict, batches: tuple, prefill_rows: tuple, gather_only: bool = False, cold_bytes: int = 0) -> dict:
    """Time the candidate launch settings per (batch bucket, bits, N, K) on the dense 3/4-bit g128
    layers (at the largest batch of each bucket, prefill at its smallest M) and keep the best in
    launch_plan.TUNED (a mixed 3/4 layer's paired launch runs the 3-bit setting: the one with more warps).
    ``cold_bytes`` > 0: each setting timed over copies of the layer of that many bytes in all
    (bench_cold), as a model reads its layers, rather than one layer's call repeated from L2."""
    from misq.runtime import launch_plan

    out = {}
    reps = tuned_rows(batches, prefill_rows)
    for R, C in shapes.values():
        for fmt in ("4bit_g128", "3bit_g128"):
            lin = random_packed(R, C, *FORMATS[fmt])[0]
            lins = with_copies(lin, fmt, cold_bytes)
            bits = lin.segments[0].bits
            for M in reps:
                key = (launch_plan.bucket(M), bits, R, C)
                x = torch.randn(M, C, device="cuda", dtype=torch.float16)
                trials = []
                for cfg in candidates(M, gather_only):
                    launch_plan.TUNED[key] = cfg
                    try:
                        fns = [m._prefill_fused if M > 16 else m for m in lins]
                        trials.append((bench(lambda x=x, fn=fns[0]: fn(x), rep=12) if not cold_bytes
                                       else bench_cold([lambda x=x, fn=fn: fn(x) for fn in fns]), cfg))
                    except Exception as err:  # a setting that does not compile or fit is skipped
                        print("skip", cfg, str(err).splitlines()[0][:80])
                if not trials:
                    launch_plan.TUNED.pop(key, None)
                    continue
                trials.sort(key=lambda r: r[0])
                launch_plan.TUNED[key] = trials[0][1]
                out[str(key)] = [{"us": t, **vars(c)} for t, c in trials]
                print("tuned", key, f"{trials[0][0]:.2f}us", trials[0][1], "| next", [f"{t:.2f}" for t, _ in trials[1:4]],
                      flush=True)
    return out


def load_tuned(path: str) -> dict:
    """The fastest setting of each key in a --tune run's JSON ("tune": key -> trials, fastest
    first), as launch_plan.TUNED takes them: (bucket, bits, N, K) -> Config."""
    import ast

    from misq.runtime.launch_plan import Config

    with open(path) as f:
        section = json.load(f).get("tune") or {}
    return {ast.literal_eval(key): Config(**{k: v for k, v in trials[0].items() if k != "us"})
            for key, trials in section.items() if trials}


# launch_plan's module switches --flip may time with the other setting (read when a layer plans its launches)
FLIPPABLE = ("H2_PDL", "GATHER_PDL")


@contextlib.contextmanager
def flipped(name: str):
    """launch_plan.<name> set to its other setting for the block, then back; the layers plan their
    launches again both times (the settings' version moves). Yields the setting in force."""
    from misq.runtime import launch_plan

    default = getattr(launch_plan, name)
    setattr(launch_plan, name, not default)
    launch_plan.TUNED.update()
    try:
        yield not default
    finally:
        setattr(launch_plan, name, default)
        launch_plan.TUNED.update()


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


def decode_tps(model, steps: int = 64, prompt: int = 16, graph: bool = True, then=None,
               then_steps: int = 0) -> tuple[float, str]:
    """(tokens/s of greedy decode, how): static KV cache, the decode step as a CUDA graph
    (eager if capture fails, or if ``graph`` is false); ``then(run)``, if given, is called after
    the timing with the step's runner, which it may call ``then_steps`` times more (the cache
    counts every step written, whatever its position: decode_profile.py traces them)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8 + then_steps)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), use_cache=True)
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        cpos = torch.tensor([prompt], device="cuda")

        def step():
            return model(tok, past_key_values=cache, cache_position=cpos, use_cache=True).logits

        how = "cuda_graph"
        try:
            if not graph:
                raise RuntimeError("eager asked for")
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            run = graph.replay
        except RuntimeError as err:
            if graph:
                print("CUDA graph capture failed, timing eager:", str(err).splitlines()[0])
            how, out = "eager", None
            torch.cuda.synchronize()

            def run():
                nonlocal out
                out = step()
        for i in range(4):  # warm-up
            cpos.fill_(prompt + i)
            run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            cpos.fill_(prompt + 4 + i)
            run()
            tok.copy_(out[:, -1:].argmax(-1))
        torch.cuda.synchronize()
        tps = steps / (time.perf_counter() - t)
        if then is not None:
            then(run)
    return tps, how


def _compiled(model, compile_forward: bool):
    """model, its forward wrapped in torch.compile (afresh: the layers may have been swapped) when
    asked; PackedLinear enters the graph as one opaque op (misq::packed_linear)."""
    if compile_forward:
        torch._dynamo.reset()
        model.forward = torch.compile(type(model).forward.__get__(model))
    return model


def mergeable_format(fmt: str) -> bool:
    """Whether a real misq checkpoint of this format would have its steps merged: uniform widths
    (misq's stacked solves then give q/k/v one layout). A mixed checkpoint's widths are allocated
    per projection, so its q/k/v rarely match; the random mixed layers here would, so they are not
    timed merged, which would flatter them."""
    return len(set(FORMATS[fmt][0])) == 1


def pack_model(model, fmt: str, merge: bool = False) -> tuple[int, int]:
    """Replace every linear of the decoder layers (dense, packed or merged) by a random packed one
    of format ``fmt``, the layers of one step (q/k/v, gate/up) sharing one column order as misq's
    solves give them; ``merge``: then merge those (misq.runtime.merge). Returns (GPU bytes,
    honest bytes) of the packed layers."""
    from misq.models.layout import SEQUENTIAL_STEPS
    from misq.runtime.merge import merge_shared_inputs

    widths, sp = FORMATS[fmt]
    honest_total = 0
    for block in model.model.layers:
        for step in SEQUENTIAL_STEPS:
            perm = None
            for name in step:
                mod = block.get_submodule(name)
                lin, honest = random_packed(mod.out_features, mod.in_features, widths, sp, perm=perm)
                perm = lin.perm
                block.set_submodule(name, lin)
                honest_total += honest
    if merge:
        merge_shared_inputs(model, SEQUENTIAL_STEPS)
    torch.cuda.empty_cache()
    layers = {id(m): m for m in model.model.layers.modules() if isinstance(m, PackedLinear)}
    return sum(m.weight_nbytes for m in layers.values()), honest_total


def _model_13b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).half().eval()


def prefill_model(layers: int, rows: tuple, rounds: int = 5, merged: bool = True) -> list[dict]:
    """Host-bound runs of a 13B-shaped model (``layers`` decoder layers, random weights), fp16
    against packed: a prompt's forward of M tokens, no cache, eager (as transformers runs a
    prompt; CUDA-event timed), and greedy decode with a static cache, eager (no CUDA graph).
    Unlike the per-linear prefill rows (CUDA-graph timed, so without the host's launch time),
    these include what the host spends launching each layer's kernels. The host's pace drifts
    within a run, so the two models take turns (``rounds`` of 3 forwards each) and each side's
    median counts. ``merged``: each format also with q/k/v and gate/up merged (misq.runtime.merge)."""
    fp16 = _model_13b(layers)
    model = copy.deepcopy(fp16)

    def ms(m, M: int) -> list[float]:
        ids = torch.randint(0, 32000, (1, M), device="cuda")
        times = []
        with torch.no_grad():
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                m(ids, use_cache=False)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
        return times

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    out = []
    for fmt, merge in [(f, m) for f in ("4bit_g128", "3bit_g128", "50pct_4bit_g128", "mixed_3_4_g128")
                       for m in ((False, True) if merged and mergeable_format(f) else (False,))]:
        pack_model(model, fmt, merge)
        fmt = fmt + (", q/k/v and gate/up merged" if merge else "")
        for M in rows:
            ms(fp16, M), ms(model, M)  # warm-up
            f, p = [], []
            for _ in range(rounds):
                f += ms(fp16, M)
                p += ms(model, M)
            r = {"model": f"13B-shaped, {layers} layers", "format": fmt, "rows": M, "fp16_ms": median(f),
                 "packed_ms": median(p), "slowdown_vs_fp16": median(p) / median(f)}
            print(json.dumps(r), flush=True)
            out.append(r)
        tf, tp = decode_tps(fp16, graph=False)[0], decode_tps(model, graph=False)[0]
        r = {"model": f"13B-shaped, {layers} layers", "format": fmt, "eager_decode": True, "fp16_tok_s": tf,
             "packed_tok_s": tp, "speedup_vs_fp16": tp / tf}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


class EmptyLinear(torch.nn.Module):
    """A linear that computes nothing: its output is torch.empty (no kernel). A model of these
    decodes at the pace of everything but its linears (norms, rotary, attention, the KV cache,
    lm_head, the step's overhead): the floor no linear kernel can go below."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], self.out_features)


E2E_FORMATS = ("3bit_g128", "50pct_4bit_g128", "mixed_3_4_g128")


def end_to_end(layers: int, compile_forward: bool = False, flips: tuple[str, ...] = (),
               formats: tuple[str, ...] = E2E_FORMATS, merged: bool = True, floor: bool = False,
               merged_only: bool = False) -> list[dict]:
    """Greedy decode tokens/s, fp16 against each packed format, in the same static-cache loop
    (decode_tps); ``flips``: each packed format (as last packed) also with each named launch_plan
    switch at its other setting (FLIPPABLE); ``merged``: each format also with q/k/v and
    gate/up merged (misq.runtime.merge, as misq.load does), in the same loop; ``floor``: last, the
    same model with every decoder linear an EmptyLinear (what is left when linears cost nothing);
    ``merged_only``: mergeable formats merged only."""

    model = _model_13b(layers)
    out = []
    loop = "torch.compile + " if compile_forward else ""
    t0 = time.time()
    tps, how = decode_tps(_compiled(model, compile_forward))
    how = loop + how
    print(f"fp16 model timed in {time.time() - t0:.0f}s", flush=True)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers." in n)
    out.append({"model": f"13B-shaped, {layers} layers, fp16", "tokens_per_s": tps, "loop": how,
                "decoder_weights_gpu_bytes": dense_bytes})
    print(json.dumps(out[-1]), flush=True)
    for fmt in formats:
        for merge in ((True,) if merged_only else (False, True)) if merged and mergeable_format(fmt) else (False,):
            total, honest_total = pack_model(model, fmt, merge)
            tps_p, how = decode_tps(_compiled(model, compile_forward))
            how = loop + how
            out.append({"model": f"13B-shaped, {layers} layers, packed {fmt}" + (", q/k/v and gate/up merged" if merge else ""),
                        "tokens_per_s": tps_p, "loop": how, "speedup_vs_fp16": tps_p / tps,
                        "decoder_weights_gpu_bytes": total, "honest_bytes": honest_total})
            print(json.dumps(out[-1]), flush=True)
        for name in flips:  # the switch's other setting, in the same loop
            with flipped(name) as now:
                tps_p, how = decode_tps(_compiled(model, compile_forward))
            out.append({"model": f"13B-shaped, {layers} layers, packed {fmt}" + (", merged" if merge else "")
                        + f", launch_plan.{name} = {now}", "tokens_per_s": tps_p, "loop": loop + how,
                        "speedup_vs_fp16": tps_p / tps})
            print(json.dumps(out[-1]), flush=True)
    if floor:
        from misq.models.layout import LINEAR_NAMES

        for block in model.model.layers:
            for name in LINEAR_NAMES:
                mod = block.get_submodule(name)
                block.set_submodule(name, EmptyLinear(mod.in_features, mod.out_features))
        torch.cuda.empty_cache()
        tps_0, how = decode_tps(_compiled(model, compile_forward))
        out.append({"model": f"13B-shaped, {layers} layers, every decoder linear empty (the floor)", "tokens_per_s": tps_0,
                    "loop": loop + how, "speedup_vs_fp16": tps_0 / tps,
                    "ms_per_token_without_linears": 1e3 / tps_0, "fp16_linears_ms_per_token": 1e3 / tps - 1e3 / tps_0})
        print(json.dumps(out[-1]), flush=True)
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
                    help="end to end: formats whose layers merge timed merged only (not also unmerged)")
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
                                             merged=not args.skip_merged)
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
