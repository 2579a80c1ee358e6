"""A fused Triton replacement for :func:`misq.algorithms.sparsegpt.block_loop` (CUDA only).

SparseGPT's sweep inside a block of B ≤ 256 columns is row-independent: every row r does, for
i = 0 .. B-1,

    (N:M only, every M columns) prune the N lowest w²/[H⁻¹]_jj² of columns i .. i+M-1
    q      = quantize(w[r, i] · keep[r, i])              (maxq inf: q = w · keep)
    err    = (w[r, i] − q) / H⁻¹[i, i]
    w[r, i:] −= err · H⁻¹[i, i:]

so one Triton program owns a tile of rows, holds the whole [rows, B] block in registers and
sweeps the B columns in one launch, instead of ~15 small launches per column on the eager path.
The arithmetic is the eager path's, operation by operation, in fp32: IEEE division
(``div.rn.f32``), round-half-to-even (``cvt.rni``, like ``torch.round``), and no fused
multiply-add (``enable_fp_fusion=False``), so the results are normally bit-identical to
:func:`block_loop`; N:M masks are chosen in-kernel, ties broken towards the lower column.

:func:`get_block_fn` returns :func:`fused_block_loop` when Triton and CUDA are there (and
``enabled``: the driver passes ``SolverOptions.fused``); the driver passes it to
``solve(block_fn=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

try:  # Triton is optional: CPU-only installs have none.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:
    triton = None
    tl = None
    HAVE_TRITON = False

MAX_BLOCK = 256  # wider blocks fall back to the eager loop (registers)
# Rows per program and warps, by padded block width; tuned on an H200 (see BENCHMARKS.md).
BLOCK_CONFIGS = {16: (8, 1), 32: (8, 1), 64: (8, 1), 128: (8, 1), 256: (8, 1)}


# Triton's CPU interpreter (TRITON_INTERPRET=1, for debugging the kernel without a GPU) has no
# inline PTX: plain numpy-float32 division and a magic-number round-half-to-even stand in.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAVE_TRITON and INTERPRET:

    @triton.jit
    def div_rn(a, b):
        return a / b

    @triton.jit
    def rint(x):
        # exact for |x| < 2**22, far beyond any code here
        return tl.where(tl.abs(x) < 4194304.0, (x + 12582912.0) - 12582912.0, x)

elif HAVE_TRITON:

    @triton.jit
    def div_rn(a, b):
        # IEEE round-to-nearest division, as ATen's a / b (Triton's `/` may be approximate).
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def rint(x):
        # Round half to even, as torch.round.
        return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


if HAVE_TRITON:

    # s_wc is not specialized (Triton would make a stride of 1 a constant): a tile whose columns it
    # cannot see as contiguous is laid out with rows across lanes, so each row's per-column work is
    # done by 4 lanes, not by all 32 (fused_descent.py says why and what it saves).
    @triton.jit(do_not_specialize=["s_wc"])
    def _block_kernel(
        W, s_wr, s_wc,  # [R, B] fp32, in/out (the final sweep state, as block_loop leaves it)
        Hinv, s_hr, s_hc,  # [B, B] fp32, upper Cholesky block of H^-1
        K, s_kr, s_kc,  # [R, B] uint8 keep mask (bool storage); written back for N:M
        S, s_sr, s_sc,  # scale [R, B]
        Z, s_zr, s_zc,  # zero [R, B]
        MQ, s_mr, s_mc,  # maxq [R, B] (inf: not quantized)
        Q, E, s_or, s_oc,  # outputs Q1, Err1 [R, B] (same strides)
        R, B,
        PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_B)
        rmask = rows < R
        cmask = cols < B
        m2 = rmask[:, None] & cmask[None, :]
        w = tl.load(W + rows[:, None] * s_wr + cols[None, :] * s_wc, mask=m2, other=0.0)
        if PRUNE_M > 0:
            keep_t = tl.load(K + rows[:, None] * s_kr + cols[None, :] * s_kc, mask=m2, other=0).to(tl.int32)
            hd = tl.load(Hinv + cols * (s_hr + s_hc), mask=cmask, other=1.0)
            hd2 = tl.broadcast_to((hd * hd)[None, :], [BLOCK_R, BLOCK_B])
        # Column i's per-row parameters, H^-1 row and diagonal element are loaded one iteration
        # ahead (software prefetch), so their latency hides behind the previous column's dependent
        # chain.
        sc_n = tl.load(S + rows * s_sr, mask=rmask, other=1.0)
        zc_n = tl.load(Z + rows * s_zr, mask=rmask, other=0.0)
        mq_n = tl.load(MQ + rows * s_mr, mask=rmask, other=1.0)
        kc_n = tl.load(K + rows * s_kr, mask=rmask, other=0).to(tl.int32)
        h_n = tl.load(Hinv + cols * s_hc, mask=cmask, other=0.0)
        d_n = tl.load(Hinv)
        for i in range(B):
            sc, zc, mq, kc_l, h, d = sc_n, zc_n, mq_n, kc_n, h_n, d_n
            nxt = i + 1
            more = nxt < B
            sc_n = tl.load(S + rows * s_sr + nxt * s_sc, mask=rmask & more, other=1.0)
            zc_n = tl.load(Z + rows * s_zr + nxt * s_zc, mask=rmask & more, other=0.0)
            mq_n = tl.load(MQ + rows * s_mr + nxt * s_mc, mask=rmask & more, other=1.0)
            if PRUNE_M == 0:
                kc_n = tl.load(K + rows * s_kr + nxt * s_kc, mask=rmask & more, other=0).to(tl.int32)
            h_n = tl.load(Hinv + nxt * s_hr + cols * s_hc, mask=cmask & (cols >= nxt) & more, other=0.0)
            d_n = tl.load(Hinv + nxt * (s_hr + s_hc), mask=more, other=1.0)
            sel = cols[None, :] == i
            if PRUNE_M > 0:
                if i % PRUNE_M == 0:
                    # Rank each column of the group by saliency (ties: lower column first) and
                    # drop the PRUNE_N lowest, as block_loop's topk(largest=False).
                    sal = div_rn(w * w, hd2)
                    grp = (cols >= i) & (cols < i + PRUNE_M) & cmask
                    rank = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
                    for k in tl.static_range(PRUNE_M):
                        sk = tl.sum(tl.where(cols[None, :] == i + k, sal, 0.0), axis=1)
                        before = (sk[:, None] < sal) | ((sk[:, None] == sal) & (i + k < cols[None, :]))
                        rank += (before & (i + k < B)).to(tl.int32)
                    keep_t = tl.where(grp[None, :] & (rank < PRUNE_N), 0, keep_t)
                kc = tl.sum(tl.where(sel, keep_t, 0), axis=1)
            else:
                kc = kc_l
            wc = tl.sum(tl.where(sel, w, 0.0), axis=1)
            wk = wc * kc.to(tl.float32)
            code = rint(div_rn(wk, sc)) + zc
            code = tl.minimum(tl.maximum(code, 0.0), mq)
            qv = tl.where(mq > 1.0e38, wk, sc * (code - zc))
            err = div_rn(wc - qv, d + tl.zeros_like(wc))
            w = w - err[:, None] * h[None, :]
            # column i's outputs go straight to memory (nothing reads them back here)
            tl.store(Q + rows * s_or + i * s_oc, qv, mask=rmask)
            tl.store(E + rows * s_or + i * s_oc, err, mask=rmask)
        tl.store(W + rows[:, None] * s_wr + cols[None, :] * s_wc, w, mask=m2)
        if PRUNE_M > 0:
            tl.store(K + rows[:, None] * s_kr + cols[None, :] * s_kc, keep_t.to(tl.uint8), mask=m2)


def block_kernel_runs(W1: Tensor) -> bool:
    """Whether a block kernel can take W1 [R, B] (Triton, CUDA or the interpreter, 1..256 columns)."""
    R, B = W1.shape
    return HAVE_TRITON and (W1.is_cuda or INTERPRET) and 0 < B <= MAX_BLOCK and R > 0


def launch_config(B: int, launch: tuple[int, int] | None = None,
                  table: dict[int, tuple[int, int]] | None = None) -> tuple[int, int, int]:
    """(padded block width, rows per program, warps) for a block of B columns: ``launch``, else
    ``table`` (by padded width; default BLOCK_CONFIGS, the sweep's)."""
    block_b = max(16, triton.next_power_of_2(B))
    rows, warps = launch or (BLOCK_CONFIGS if table is None else table)[block_b]
    return block_b, rows, warps


def fused_block_loop(W1: Tensor, Hinv1: Tensor, keep1: Tensor, scale1: Tensor, zero1: Tensor, maxq1: Tensor,
                     prunen: int = 0, prunem: int = 0, *, launch: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Drop-in for :func:`~misq.algorithms.sparsegpt.block_loop`, one Triton launch per block.

    Same arguments, same in-place effects (W1 [R, B] ends in the sweep's final state; keep1
    [R, B] gets the N:M masks) and the same (Q1, Err1), each [R, B]. Falls back to
    ``block_loop`` off CUDA, without Triton, or for blocks wider than 256 columns.
    ``launch`` = (rows per program, warps) overrides the tuned table (for benchmarks only).
    """
    from misq.algorithms.sparsegpt import block_loop

    R, B = W1.shape
    if not block_kernel_runs(W1):
        return block_loop(W1, Hinv1, keep1, scale1, zero1, maxq1, prunen, prunem)
    if W1.dtype != torch.float32:
        raise TypeError(f"fused_block_loop needs float32 weights, got {W1.dtype}")
    Hinv1, scale1, zero1, maxq1 = (t if t.dtype == torch.float32 else t.float() for t in (Hinv1, scale1, zero1, maxq1))
    if maxq1.dim() == 1:  # a per-column maxq [B] (older call sites)
        maxq1 = maxq1.unsqueeze(0).expand(R, B)
    keep8 = keep1.view(torch.uint8) if keep1.dtype == torch.bool else keep1
    Q1 = torch.empty((R, B), device=W1.device, dtype=torch.float32)
    Err1 = torch.empty((R, B), device=W1.device, dtype=torch.float32)
    nm = bool(prunen and prunem)
    block_b, block_r, warps = launch_config(B, launch)
    grid = (triton.cdiv(R, block_r),)
    _block_kernel[grid](
        W1, W1.stride(0), W1.stride(1),
        Hinv1, Hinv1.stride(0), Hinv1.stride(1),
        keep8, keep8.stride(0), keep8.stride(1),
        scale1, scale1.stride(0), scale1.stride(1),
        zero1, zero1.stride(0), zero1.stride(1),
        maxq1, maxq1.stride(0), maxq1.stride(1),
        Q1, Err1, Q1.stride(0), Q1.stride(1),
        R, B,
        PRUNE_N=int(prunen) if nm else 0, PRUNE_M=int(prunem) if nm else 0,
        BLOCK_R=block_r, BLOCK_B=block_b,
        num_warps=warps, enable_fp_fusion=False,
    )
    return Q1, Err1


def get_block_fn(device: torch.device | str, *, enabled: bool = True) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """The fused block sweep for ``device`` when it can run there (CUDA + Triton) and is
    ``enabled``, else None (``solve`` then uses the eager :func:`block_loop`)."""
    if not enabled:
        return None
    if not HAVE_TRITON or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return fused_block_loop
