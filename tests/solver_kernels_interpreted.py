"""The solver's Triton kernels run by Triton's CPU interpreter, against their eager loops: the
block sweep (:func:`misq.algorithms.fused.fused_block_loop` against ``sparsegpt.block_loop``) and
the coordinate-descent block (:mod:`misq.algorithms.fused_descent`, through
``coordinate_descent(fused=True)`` against ``fused=False``), checked without a GPU (CI).

tests/test_fused.py and tests/test_coordinate_descent.py check the same on a GPU, but are skipped
wherever there is none. Under the interpreter the kernels' IEEE division and round-half-to-even
are plain numpy float32 operations (misq.algorithms.fused), so the sweep must match the eager loop
bit for bit, as it does compiled. The interpreter must be chosen before triton and misq's kernel
modules are imported, so this runs as a script in a process of its own
(tests/test_solver_kernels_interpreted.py starts it)::

    python tests/solver_kernels_interpreted.py OUT.json

OUT.json: ``{"meta": {...}, "cases": {case id: {...what differs..., "error": exception or null}}}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# (block columns, N, M, quantized): unstructured 4-bit, 2:4 with in-kernel masks, unquantized
# (maxq inf), and a block narrower than its power-of-two padding
SWEEPS = [(128, 0, 0, True), (64, 2, 4, True), (40, 0, 0, False), (96, 0, 0, True)]
# (block columns, bits; 16: unquantized), over 2 blocks and a partial third
DESCENTS = [(64, 3), (40, 16)]
ROWS = 37  # rows: not a multiple of any launch's rows per program


def sweep_ids() -> list[str]:
    return [f"sweep-b{b}-{f'{n}of{m}' if m else 'unstructured'}-{'q4' if q else 'fp'}" for b, n, m, q in SWEEPS]


def descent_ids() -> list[str]:
    return [f"descent-b{b}-{'fp' if bits == 16 else f'q{bits}'}" for b, bits in DESCENTS]


def _sweep(B: int, n: int, m: int, quantized: bool) -> dict[str, Any]:
    """fused_block_loop against block_loop on one random block: how many of Q, Err, W and the keep
    mask differ (all must be 0)."""
    import torch

    from misq.algorithms.fused import fused_block_loop
    from misq.algorithms.sparsegpt import block_loop

    g = torch.Generator().manual_seed(B + n)
    X = torch.randn(4 * B, B, generator=g)
    H = X.T @ X / X.shape[0]
    H.diagonal().add_(0.1)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = torch.randn(ROWS, B, generator=g)
    keep = torch.ones(ROWS, B, dtype=torch.bool) if m else torch.rand(ROWS, B, generator=g) > 0.3
    scale = (W.abs().amax(1, keepdim=True) / 7).expand(ROWS, B)
    zero = torch.full((ROWS, B), 8.0)
    maxq = torch.full((ROWS, B), 15.0 if quantized else float("inf"))
    W1, W2, k1, k2 = W.clone(), W.clone(), keep.clone(), keep.clone()
    Q1, E1 = block_loop(W1, Hinv, k1, scale, zero, maxq, n, m)
    Q2, E2 = fused_block_loop(W2, Hinv, k2, scale, zero, maxq, n, m)
    return {"q_differ": int((Q1 != Q2).sum()), "err_differ": int((E1 != E2).sum()),
            "w_differ": int((W1 != W2).sum()), "keep_differ": int((k1 != k2).sum())}


def _descent(B: int, bits: int) -> dict[str, Any]:
    """coordinate_descent with the Triton block against the eager loop, one pass from a SparseGPT
    sweep's result: the weights that differ, and both error changes (which must agree)."""
    import torch

    from misq.algorithms.coordinate_descent import coordinate_descent
    from misq.algorithms.quantizer import find_grid
    from misq.algorithms.sparsegpt import column_params, solve

    g = torch.Generator().manual_seed(B + bits)
    C = 2 * B + 17
    X = torch.randn(4 * C, C, generator=g)
    H = X.T @ X / X.shape[0]
    H.diagonal().add_(0.01 * H.diagonal().mean())
    W = torch.randn(ROWS, C, generator=g)
    if bits < 16:
        grid = find_grid(W, torch.zeros(C, dtype=torch.long), torch.tensor([bits]))
        res = solve(W, H, column_params([grid]), sparsity=0.5, blocksize=B, refit=False)

        def cols(i1: int, i2: int):
            s, z, mq = grid.column_grid(i1, i2)
            return s, z, mq.unsqueeze(0).expand(ROWS, -1)  # stride-0 rows: the kernel reads them as they are
    else:
        res = solve(W, H, None, sparsity=0.5, blocksize=B, refit=False)

        def cols(i1: int, i2: int):
            return (torch.ones(ROWS, i2 - i1), torch.zeros(ROWS, i2 - i1), torch.full((ROWS, i2 - i1), float("inf")))
    eager, fast = res.weight.clone(), res.weight.clone()
    ce = coordinate_descent(eager, W, H, res.keep, cols, passes=1, blocksize=B, fused=False)
    cf = coordinate_descent(fast, W, H, res.keep, cols, passes=1, blocksize=B, fused=True)
    return {"w_differ_share": float((eager != fast).float().mean()), "w_max_abs_diff": float((eager - fast).abs().max()),
            "change_eager": float(ce.sum()), "change_fused": float(cf.sum()),
            "pruned_nonzero": int((fast[~res.keep] != 0).sum())}


def main(argv: list[str]) -> int:
    from kernels_interpreted import select_interpreter  # tests/ is on sys.path (this script's folder)

    shimmed = select_interpreter()
    from misq.algorithms import fused

    results: dict[str, dict[str, Any]] = {}
    runs = [(i, _sweep, a) for i, a in zip(sweep_ids(), SWEEPS, strict=True)]
    runs += [(i, _descent, a) for i, a in zip(descent_ids(), DESCENTS, strict=True)]
    for case_id, fn, args in runs:
        try:
            results[case_id] = {**fn(*args), "error": None}
        except Exception as exc:  # reported per case: the test names it
            results[case_id] = {"error": "".join(traceback.format_exception_only(type(exc), exc)).strip()
                                + "\n" + traceback.format_exc(limit=-3)}
    meta = {"interpreted": os.environ.get("TRITON_INTERPRET") == "1" and fused.INTERPRET,
            "kernel_type": type(fused._block_kernel).__name__, "index_shim": shimmed}
    Path(argv[0]).write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
