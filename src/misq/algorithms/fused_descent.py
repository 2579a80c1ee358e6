"""A fused Triton kernel for one block of :func:`misq.algorithms.coordinate_descent.coordinate_descent`.

Inside a block of B ≤ 256 columns the descent is row-independent: every row r does, for
j = 0 .. B-1,

    target = w[r, j] − p[r, j] / H[j, j]          (p = (W − W0) H, restricted to the block)
    q      = quantize(target) · keep[r, j]        (maxq inf: q = target · keep)
    d      = q − w[r, j];   w[r, j] = q;   p[r, :] += d · H[j, :]

so one program owns a tile of rows and holds its slice of P in registers for the whole block:
one launch instead of ~8 small launches per column on the eager path (a 13B layer's pass: 6.7 s
eager on an H200). The columns outside the block are updated by the caller with one GEMM, as in
the eager loop.

The tile's layout is what makes the kernel fast. Given P's column stride as the constant 1,
Triton lays a tile out along the contiguous columns: each row of an [8, 128] tile spreads over
all 128 threads of a program, one column each, and every thread then runs every row's chain of
per-column work (two IEEE divisions, the rounding, five loads): 830 instructions a thread a step
for 2 rows a warp (sm_90 SASS). With the stride left a run-time value (``do_not_specialize``)
the tile is laid out along its rows: one warp takes 8 rows, 4 lanes a row and 32 columns a lane,
and a step costs 386 instructions a thread for 8 rows, about 8.6 times fewer a row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from misq.algorithms.fused import HAVE_TRITON, block_kernel_runs, div_rn, launch_config, rint

# (rows per program, warps) by padded block width: one warp a program, 4 lanes a row at 8 rows
# (benchmarks/refine_speed.py --launch, one H200).
DESCENT_CONFIGS = {16: (8, 1), 32: (8, 1), 64: (8, 1), 128: (8, 1), 256: (8, 1)}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["s_pc"])
    def _descent_kernel(
        W, s_wr, s_wc,  # [R, B] fp32: the weights (column j read at step j, written back after it)
        P, s_pr, s_pc,  # [R, B] fp32: P = (W − W0) H restricted to the block (held in registers)
        D, s_dr, s_dc,  # [R, B] fp32: the moves (out)
        H, s_hr, s_hc,  # [B, B] fp32, the damped Hessian's diagonal block
        K, s_kr, s_kc,  # [R, B] uint8 keep mask
        S, s_sr, s_sc,  # scale [R, B] (any strides: per-row grids come in as stride-0 views)
        Z, s_zr, s_zc,  # zero [R, B]
        MQ, s_mr, s_mc,  # maxq [R, B] (inf: not quantized)
        R, B,
        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_B)
        rmask = rows < R
        cmask = cols < B
        m2 = rmask[:, None] & cmask[None, :]
        p = tl.load(P + rows[:, None] * s_pr + cols[None, :] * s_pc, mask=m2, other=0.0)  # [BLOCK_R, BLOCK_B]
        # Step j's operands are loaded one step ahead (software prefetch), so their memory latency
        # hides behind step j - 1's dependent chain; W's column j is read from memory, not
        # extracted from registers: nothing writes it before step j.
        h_n = tl.load(H + cols * s_hc, mask=cmask, other=0.0)
        hjj_n = tl.load(H)
        wc_n = tl.load(W + rows * s_wr, mask=rmask, other=0.0)
        sc_n = tl.load(S + rows * s_sr, mask=rmask, other=1.0)
        zc_n = tl.load(Z + rows * s_zr, mask=rmask, other=0.0)
        mq_n = tl.load(MQ + rows * s_mr, mask=rmask, other=1.0)
        kc_n = tl.load(K + rows * s_kr, mask=rmask, other=0)
        for j in range(B):
            h, hjj, wc, sc, zc, mq, kc = h_n, hjj_n, wc_n, sc_n, zc_n, mq_n, kc_n
            nxt = j + 1
            ok = rmask & (nxt < B)
            h_n = tl.load(H + nxt * s_hr + cols * s_hc, mask=cmask & (nxt < B), other=0.0)
            hjj_n = tl.load(H + nxt * (s_hr + s_hc), mask=nxt < B, other=0.0)
            wc_n = tl.load(W + rows * s_wr + nxt * s_wc, mask=ok, other=0.0)
            sc_n = tl.load(S + rows * s_sr + nxt * s_sc, mask=ok, other=1.0)
            zc_n = tl.load(Z + rows * s_zr + nxt * s_zc, mask=ok, other=0.0)
            mq_n = tl.load(MQ + rows * s_mr + nxt * s_mc, mask=ok, other=1.0)
            kc_n = tl.load(K + rows * s_kr + nxt * s_kc, mask=ok, other=0)
            pc = tl.sum(tl.where(cols[None, :] == j, p, 0.0), axis=1)
            target = wc - div_rn(pc, tl.maximum(hjj, 1e-30) + tl.zeros_like(pc))
            code = tl.minimum(tl.maximum(rint(div_rn(target, sc)) + zc, 0.0), mq)
            qv = tl.where(mq > 1.0e38, target, sc * (code - zc)) * kc.to(tl.float32)
            dv = tl.where(hjj > 0.0, qv - wc, 0.0)
            tl.store(W + rows * s_wr + j * s_wc, wc + dv, mask=rmask)
            tl.store(D + rows * s_dr + j * s_dc, dv, mask=rmask)
            p = p + dv[:, None] * h[None, :]
        tl.store(P + rows[:, None] * s_pr + cols[None, :] * s_pc, p, mask=m2)


def fused_descent_block(W1: Tensor, P1: Tensor, Hb: Tensor, keep1: Tensor, scale1: Tensor, zero1: Tensor,
                        maxq1: Tensor, *, launch: tuple[int, int] | None = None) -> Tensor | None:
    """One block of coordinate descent in one launch: W1, P1 [R, B] updated in place; returns the
    moves D [R, B] (for the caller's update of the other columns), or None where the kernel
    cannot run (no Triton, not CUDA, wider than 256 columns, not fp32): the caller then takes the
    eager loop. scale1, zero1, maxq1 broadcast to [R, B] (stride-0 views are read as they are, not
    copied). ``launch`` = (rows per program, warps) overrides DESCENT_CONFIGS (benchmarks only)."""
    R, B = W1.shape
    if not block_kernel_runs(W1) or W1.dtype != torch.float32 or P1.dtype != torch.float32:
        return None
    S, Z, MQ = (t.float() for t in torch.broadcast_tensors(scale1, zero1, maxq1))  # no copy when already fp32
    Hb = Hb.float()
    keep8 = keep1.view(torch.uint8) if keep1.dtype == torch.bool else keep1.to(torch.uint8)
    D = torch.empty((R, B), device=W1.device, dtype=torch.float32)
    block_b, block_r, warps = launch_config(B, launch, DESCENT_CONFIGS)
    _descent_kernel[(triton.cdiv(R, block_r),)](
        W1, W1.stride(0), W1.stride(1),
        P1, P1.stride(0), P1.stride(1),
        D, D.stride(0), D.stride(1),
        Hb, Hb.stride(0), Hb.stride(1),
        keep8, keep8.stride(0), keep8.stride(1),
        S, S.stride(0), S.stride(1),
        Z, Z.stride(0), Z.stride(1),
        MQ, MQ.stride(0), MQ.stride(1),
        R, B, BLOCK_R=block_r, BLOCK_B=block_b, num_warps=warps, enable_fp_fusion=False,
    )
    return D
