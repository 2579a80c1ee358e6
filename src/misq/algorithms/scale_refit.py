"""After the sweep: each row's scale refit by least squares to the codes it chose.

SparseGPT/GPTQ fix a row's grid (scale s, zero z) before the sweep, from the weights as they
were; the codes the sweep then picks give Ŵ = s·v, v = (q − z)·keep. For those codes the row's
output error ‖(w0 − s·v)X‖² = w0Hw0 − 2s·b + s²·a, with a = vHvᵀ and b = vHw0ᵀ, is a
parabola in s, least at s* = b/a: a scale chosen for the codes rather than for the original
range, which pruning and the error updates have moved (1-3% of the kept weights end clipped).
s* is rounded to fp16 (what the checkpoint stores) and kept only where it lowers the row's
error; zeros and codes are unchanged, so the grid keeps its width and its size on disk.

Measured (H200, fp16, 50% + 3-bit per row, c4 uncut; BENCHMARKS.md, `benchmarks/frontier.py`):
llama-9m goes from 132.03 / 160.75 / 277.36 to 131.46 / 160.14 / 273.11 (wikitext2 / c4 / PTB),
below the SparseGPT reference's 133.10 / 160.61 / 284.19; stories260K's 35 layer errors drop
3.2% on average (CPU). Grids with several scale groups are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from misq.algorithms.quantizer import FP_BITS, StackedGrid
from misq.algorithms.tf32 import tf32_matmul


@torch.no_grad()
def refit_row_scales(W0: Tensor, W: Tensor, keep: Tensor, H: Tensor, qparams: StackedGrid, *,
                     fast: bool = True) -> Tensor | None:
    """Refit the scale of every row whose grid is one quantized group (in place).

    W0 [R, C] the solve's input, W [R, C] the solved fp32 weights (original column order;
    refit rows are rewritten), keep [R, C] bool, H [C, C] undamped (read only), qparams the
    stacked layers' grids: each one-group grid's ``scale`` is overwritten with the new fp16-exact
    values, so the grids the caller holds describe the returned weights. ``fast``: on CUDA the
    product v·H is one TF32 GEMM (s* is stored in fp16 anyway).

    Returns the change of each row's output error tr(ΔW H ΔWᵀ) [R] (≤ 0; 0 where the scale
    stayed), or None when no grid has one group.
    """
    delta = torch.zeros(W.shape[0], device=W.device)
    start, found = 0, False
    for g in qparams.grids:
        sl = slice(start, start + g.scale.shape[0])
        start = sl.stop
        if g.n_groups != 1 or int(g.bits[0]) >= FP_BITS:
            continue
        found = True
        s0 = g.scale[:, 0].to(W.device, torch.float32)
        v = torch.round(W[sl] / s0.unsqueeze(1)) * keep[sl]  # the sweep's weights are exactly s0·(q − z)
        with tf32_matmul(fast and W.is_cuda):
            Hv = v @ H
        a = torch.sum(Hv * v, dim=1)
        b = torch.sum(Hv * W0[sl].float(), dim=1)
        del Hv
        ok = a > 0
        s_new = torch.where(ok, b / torch.where(ok, a, torch.ones_like(a)), s0)
        s_new = torch.where(s_new > 0, s_new.to(torch.float16).to(torch.float32), s_new)  # as the file stores it
        change = (s_new * s_new * a - 2 * s_new * b) - (s0 * s0 * a - 2 * s0 * b)
        better = ok & (s_new > 0) & torch.isfinite(s_new) & (change < 0)
        s = torch.where(better, s_new, s0)
        W[sl] = torch.where(better.unsqueeze(1), s.unsqueeze(1) * v, W[sl])
        g.scale[:, 0] = s.to(g.scale.device, g.scale.dtype)
        delta[sl] = torch.where(better, change, torch.zeros_like(change))
    return delta if found else None
