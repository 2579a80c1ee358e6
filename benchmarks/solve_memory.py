#!/usr/bin/env python3
"""Peak memory of one solve (``misq.algorithms.sparsegpt.solve``) of a layer shape, on the CPU or a GPU.

The largest buffers of a layer-by-layer compression live in the solve: the Hessian [C, C] and
its inverse factor in fp32, the weight [R, C] and its grids. This measures them for one shape
in a fresh process (``--device cuda``: ``torch.cuda.max_memory_allocated``; ``--device cpu``:
the process's peak RSS), above what the inputs (W, H) already take, for misq's default grids
(act-order, groups of 128, found as the solver reaches them). Usage:

    python benchmarks/solve_memory.py --rows 8192 --cols 28672 --device cuda   # a 70B down_proj
    python benchmarks/solve_memory.py --rows 2048 --cols 7168                   # the same at 1/4 per side, CPU
"""

from __future__ import annotations

import argparse
import json
import resource

import torch

from misq.algorithms.column_layout import layout_for
from misq.algorithms.sparsegpt import solve

GIB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groupsize", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    R, C = args.rows, args.cols
    X = torch.randn(2 * C, C, device=dev, generator=g)
    H = X.T @ X / X.shape[0]
    del X
    W = torch.randn(R, C, device=dev, generator=g) * 0.02
    lay = layout_for(torch.zeros(C, dtype=torch.long), torch.tensor([args.bits]), hessian_diag=torch.diag(H),
                     act_order=True, groupsize=args.groupsize)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = solve(W, H, None, sparsity=args.sparsity, order=lay.perm.to(dev), grid_groups=lay.scale_groups())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out = {"rows": R, "cols": C, "device": str(dev), "H_gib": C * C * 4 / GIB, "W_fp32_gib": R * C * 4 / GIB,
           "solve_peak_above_inputs_gib": peak / GIB, "in_units_of_H": peak / (C * C * 4),
           "rel_error": res.rel_error[0]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
