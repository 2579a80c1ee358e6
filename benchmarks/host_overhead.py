"""Host time a call of the packed runtime's paths and their parts, against fp16 ``F.linear`` (issue 14).

Why: a prompt through a packed model is as fast as the host can launch its kernels, not as the GPU
runs them, when the layers are small or the prompt short (BENCHMARKS.md, session 12: about 30 µs a
Triton launch on the H200 machine's host). Each row calls its function many times without waiting
for the GPU, on a layer small enough (1024 x 1024, 32 rows of x) that the GPU keeps up, so the time
a call is the host's; a cProfile of the prefill call follows, by internal time.

    PYTHONPATH=src python3 benchmarks/host_overhead.py --out host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch
import torch.nn.functional as F
from decode_layers import FORMATS, random_packed

from misq.runtime import kernels


def host_us(fn, calls: int = 300) -> tuple[float, float]:
    """(µs a call until the host returns, µs a call until the GPU is done as well)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1e6 * (time.perf_counter() - t) / calls


def profile(fn, calls: int = 200, lines: int = 14) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def time_format(fmt: str, R: int = 1024, C: int = 1024) -> dict:
    """Host time of each path and part for one random packed [R, C] layer of format ``fmt``."""
    lin = random_packed(R, C, *FORMATS[fmt])[0]
    Wd = torch.randn(R, C, device="cuda", dtype=torch.float16)
    x = torch.randn(32, C, device="cuda", dtype=torch.float16)
    x1 = x[:1].contiguous()
    wt = torch.empty(C, R, device="cuda", dtype=torch.float16)
    segs = lin.segments
    rows = {
        "F.linear fp16, 32 rows": lambda: F.linear(x, Wd),
        "packed forward, 32 rows (prefill)": lambda: lin(x),
        "packed _prefill_dequant": lambda: lin._prefill_dequant(x),
        "dequantize_into": lambda: kernels.dequantize_into(wt, lin.perm, segs, R),
        "matmul x @ wt": lambda: x @ wt,
        "lin.segments": lambda: lin.segments,
        "packed forward, 1 row (decode)": lambda: lin(x1),
        "gather_columns": lambda: kernels.gather_columns(x, lin.perm),
        "torch.empty": lambda: torch.empty(32, R, device="cuda", dtype=torch.float16),
    }
    step = lin.decode_plan(1).steps[0]
    if getattr(step, "pregather", False):  # the h2 path's x gather alone, as the layer binds it
        buf = torch.empty(step.scratch, dtype=torch.int32, device="cuda")
        rows["gather_pairs (batch-1 x)"] = lambda: step.gather(x1, None, buf, buf.view(torch.float32))
    out: dict = {"rows": {}}
    for name, fn in rows.items():
        h, a = host_us(fn)
        out["rows"][name] = {"host_us": h, "until_gpu_done_us": a}
        print(f"{fmt:<15} {name:<36} host {h:7.1f} µs a call (GPU done: {a:7.1f})", flush=True)
    out["profile"] = profile(lambda: lin._prefill_dequant(x))
    print(out["profile"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="host_overhead.json")
    ap.add_argument("--formats", default="4bit_g128,mixed_3_4_g128")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "layer": [1024, 1024], "rows_of_x": 32,
           "formats": {fmt: time_format(fmt) for fmt in args.formats.split(",")}}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
