#!/usr/bin/env python3
"""The Hessian product H ← β·H + α·xᵀx on 13B shapes: cuBLAS over all of H against misq's Triton
kernel over its lower triangle (:mod:`misq.algorithms.fused_hessian`), per launch configuration,
and one product of four windows against four of one (the fp32 epilogue's traffic).

CUDA only; ms per call from ``triton.testing.do_bench``. Writes ``hessian_speed.json`` under --out.

    PYTHONPATH=src python3 benchmarks/hessian_speed.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

CONFIGS = [(128, 32, 4, 4), (128, 32, 4, 3), (128, 32, 4, 5), (128, 32, 4, 6), (128, 32, 8, 4), (128, 64, 4, 4),
           (128, 64, 4, 3), (128, 64, 8, 4), (128, 64, 8, 3), (128, 16, 4, 4), (64, 32, 4, 4), (64, 64, 4, 4),
           (128, 128, 8, 2), (256, 64, 8, 3)]


def time_shape(C: int, N: int) -> dict[str, float | str]:
    """ms per call of every variant for inputs x [N, C] fp16 into H [C, C] fp32."""
    from triton.testing import do_bench

    from misq.algorithms import fused_hessian

    H = torch.zeros(C, C, device="cuda")
    x = torch.randn(N, C, device="cuda", dtype=torch.float16)
    parts = list(x.split(2048))
    buf = torch.empty_like(x)

    def full(rows: torch.Tensor) -> None:
        torch.addmm(H, rows.t(), rows, out_dtype=torch.float32, beta=0.5, alpha=0.1, out=H)

    def per_window() -> None:
        for p in parts:
            full(p)

    def gathered() -> None:  # the accumulator's way: windows copied into one buffer, one product
        for i, p in enumerate(parts):
            buf[i * 2048:(i + 1) * 2048].copy_(p)
        full(buf)

    res: dict[str, float | str] = {f"cublas C={C} N={N}": do_bench(lambda: full(x), warmup=5, rep=40)}
    if N > 2048 and N % 2048 == 0:
        res[f"cublas C={C} {N // 2048} x 2048"] = do_bench(per_window, warmup=5, rep=40)
        res[f"cublas C={C} copy + 1 x {N}"] = do_bench(gathered, warmup=5, rep=40)
    default = fused_hessian.SYRK_CONFIG
    try:
        for cfg in CONFIGS:
            fused_hessian.SYRK_CONFIG = cfg
            try:
                res[f"lower {cfg} C={C} N={N}"] = do_bench(lambda: fused_hessian.syrk_lower_(H, x, 0.1, 0.5),
                                                           warmup=5, rep=40)
            except Exception as err:  # a config that does not fit (shared memory, registers)
                res[f"lower {cfg} C={C} N={N}"] = repr(err)[:120]
    finally:
        fused_hessian.SYRK_CONFIG = default
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--columns", default="5120,13824", help="input widths C (13B: hidden, FFN)")
    ap.add_argument("--rows", default="2048,8192", help="input rows N per product (one window, four)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res: dict[str, float | str] = {}
    for C in (int(c) for c in args.columns.split(",")):
        for N in (int(n) for n in args.rows.split(",")):
            res.update(time_shape(C, N))
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hessian_speed.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "ms": res}, indent=1))


if __name__ == "__main__":
    main()
