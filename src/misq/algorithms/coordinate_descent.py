"""After the sweep: cyclic coordinate descent on the kept weights, mask and grids fixed.

The GPTQ/SparseGPT sweep is greedy: column j is rounded (or pruned) once, and its error is
pushed onto the columns after it only. Given the mask and grids it chose, the same objective

    f(W) = tr((W − W0) H (W − W0)ᵀ)        (H the solve's damped Hessian, rows independent)

can still be lowered one weight at a time (QuantEase, Behdin et al. 2023): with the others
fixed, f is a parabola in w[r, j], least at w − P[r, j] / H[j, j] with P = (W − W0) H, and the
grid point nearest to that is the best feasible value (pruned weights stay exactly 0). Each
step never raises f, so a sweep over all columns lowers the layer's error monotonically. Columns
are taken in blocks as the solver's sweep: inside a block P is updated one column at a time,
and the columns outside it by one GEMM per block, so a pass costs about what the solve's sweep
costs (R·C² multiply-adds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from misq.algorithms.quantizer import quantize
from misq.algorithms.tf32 import tf32_matmul

GridFn = Callable[[int, int], tuple[Tensor, Tensor, Tensor]]


@torch.no_grad()
def coordinate_descent(W: Tensor, W0: Tensor, H: Tensor, keep: Tensor, grid: GridFn, *, passes: int = 1,
                       blocksize: int = 128, fused: bool = True) -> Tensor:
    """Lower tr((W − W0) H (W − W0)ᵀ) over W's grid points, in place; returns the change per row [R] (≤ 0).

    W [R, C] fp32, the sweep's weights (every kept weight on its grid, pruned ones 0); W0 [R, C]
    the weights before the solve, H [C, C] the damped Hessian, keep [R, C] bool, all in the
    solve's column order. ``grid(i1, i2)`` gives (scale, zero, maxq), each [R, i2 − i1], of those
    columns (maxq inf: not quantized, the weight takes its continuous optimum). ``fused``: on CUDA
    each block is one Triton launch (:mod:`misq.algorithms.fused_descent`), else the eager loop.
    """
    from misq.algorithms.fused_descent import fused_descent_block  # Triton only loads where it runs

    R, C = W.shape
    hdiag = torch.diag(H)
    with tf32_matmul(False):
        P = (W - W0.to(W.dtype)) @ H  # [R, C]: half the gradient of f, kept current as W moves
        before = torch.sum(P * (W - W0.to(W.dtype)), dim=1)
    for _ in range(passes):
        for i1 in range(0, C, blocksize):
            i2 = min(i1 + blocksize, C)
            scale, zero, maxq = grid(i1, i2)
            Hb = H[i1:i2, i1:i2]
            D = fused_descent_block(W[:, i1:i2], P[:, i1:i2], Hb, keep[:, i1:i2], scale, zero, maxq) if fused else None
            if D is not None:
                _update_outside(P, D, H, i1, i2)
                continue
            D = torch.zeros(R, i2 - i1, device=W.device, dtype=W.dtype)
            for jj in range(i2 - i1):
                j = i1 + jj
                if hdiag[j] <= 0:
                    continue
                target = W[:, j] - P[:, j] / hdiag[j]
                q = quantize(target, scale[:, jj], zero[:, jj], maxq[:, jj]) * keep[:, j]
                d = q - W[:, j]
                W[:, j] = q
                D[:, jj] = d
                P[:, i1:i2].addr_(d, Hb[jj])
            _update_outside(P, D, H, i1, i2)
    after = torch.sum(P * (W - W0.to(W.dtype)), dim=1)
    return after - before


def _update_outside(P: Tensor, D: Tensor, H: Tensor, i1: int, i2: int) -> None:
    """P[:, outside the block] += D [R, B] @ H[block, outside]: the block's moves, in fp32."""
    with tf32_matmul(False):
        if i1 > 0:
            P[:, :i1].addmm_(D, H[i1:i2, :i1])
        if i2 < P.shape[1]:
            P[:, i2:].addmm_(D, H[i1:i2, i2:])
