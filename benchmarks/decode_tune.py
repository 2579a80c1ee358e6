"""decode_speed.py --tune: the packed kernels' launch settings swept per (batch bucket, bits, N,
K) and the fastest kept in misq.runtime.launch_plan.TUNED; the kernels compiled first in
parallel processes (Triton's cache is on disk); an earlier run's settings read back (--tuned-from)."""

from __future__ import annotations

import json
import time

import torch
from decode_layers import FORMATS, bench, bench_cold, random_packed, with_copies


def candidates(M: int, gather_only: bool = False) -> list:
    """Launch settings --tune sweeps at M rows. At M = 1: the fp16
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
                # registers capped so that more programs fit an SM at once (the large 4-bit default's
                # 14 programs of 2 warps at 72; 3 bits: 5 programs of 4 warps at 96; session 23)
                *(Config("h2", 64, t, w, 2, pregather=True, pdl=H2_PDL, maxnreg=r) for t, w, r in
                  ((1584, 2, 72), (1848, 2, 72), (2112, 2, 64), (660, 4, 96), (1320, 4, 96), (2112, 4, 96))),
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
