"""H ← β·H + α·XᵀX over H's lower triangle only, in one Triton kernel (CUDA only).

H is symmetric, yet a GEMM computes both of its triangles: on a 13B-shaped layer the Hessians
are a quarter of the compression time (0.24 s of ~1.1 s on an H200), all of it tensor-core
work at cuBLAS's rate. This kernel launches one program per tile on or below the diagonal
(nt(nt+1)/2 of nt² tiles), each a [BLOCK, BLOCK] fp32 accumulation of fp16/bf16 products
(exact in fp32, as cuBLAS's fp32-output GEMM), scaled into H in its epilogue. The tiles above
the diagonal are left as they were; :func:`mirror_lower_` copies the lower triangle onto them
once all inputs are in (one pass over H).

:func:`syrk_runs` says where the kernel applies; :class:`misq.algorithms.hessian.HessianAccumulator`
falls back to cuBLAS elsewhere.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from misq.algorithms.fused import HAVE_TRITON, INTERPRET

# Tile of H, depth of each K step, warps, pipeline stages: chosen on an H200 (BENCHMARKS.md).
SYRK_CONFIG = (128, 32, 4, 4)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _syrk_lower_kernel(
        X, s_xn, s_xc,  # [N, C] fp16/bf16
        H, s_hr, s_hc,  # [C, C] fp32, updated in place on and below the diagonal
        TI, TJ,  # [T] int32: tile row and column of each program, TI ≥ TJ
        N, C, alpha, beta,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ti = tl.load(TI + pid)
        tj = tl.load(TJ + pid)
        rows = ti * BLOCK + tl.arange(0, BLOCK)
        cols = tj * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for kb in range(0, tl.cdiv(N, BLOCK_K)):
            kk = (kb * BLOCK_K + ks).to(tl.int64)
            kmask = kk[:, None] < N
            a = tl.load(X + kk[:, None] * s_xn + rows[None, :] * s_xc, mask=kmask & (rows[None, :] < C), other=0.0)
            b = tl.load(X + kk[:, None] * s_xn + cols[None, :] * s_xc, mask=kmask & (cols[None, :] < C), other=0.0)
            acc = tl.dot(tl.trans(a), b, acc)
        at = H + rows[:, None].to(tl.int64) * s_hr + cols[None, :] * s_hc
        m = (rows[:, None] < C) & (cols[None, :] < C)
        out = alpha * acc
        if SCALE_H:
            out += beta * tl.load(at, mask=m, other=0.0)
        tl.store(at, out, mask=m)

    @triton.jit
    def _mirror_kernel(H, s_hr, s_hc, TI, TJ, C, BLOCK: tl.constexpr):
        # Tile (ti, tj), ti ≥ tj: its transpose goes to (tj, ti); a diagonal tile takes its own
        # lower half's transpose above its diagonal. Only entries above the diagonal are written.
        pid = tl.program_id(0)
        ti = tl.load(TI + pid)
        tj = tl.load(TJ + pid)
        r = tj * BLOCK + tl.arange(0, BLOCK)  # rows of the destination (upper) tile
        c = ti * BLOCK + tl.arange(0, BLOCK)
        m = (r[:, None] < C) & (c[None, :] < C) & (r[:, None] < c[None, :])
        src = H + c[None, :].to(tl.int64) * s_hr + r[:, None] * s_hc  # H[c, r], below the diagonal
        tl.store(H + r[:, None].to(tl.int64) * s_hr + c[None, :] * s_hc, tl.load(src, mask=m, other=0.0), mask=m)


def syrk_runs(x: Tensor, H: Tensor) -> bool:
    """Can :func:`syrk_lower_` update H [C, C] fp32 from x [N, C]? (Triton, CUDA, fp16/bf16.)"""
    return (HAVE_TRITON and not INTERPRET and x.is_cuda and H.is_cuda and H.dtype == torch.float32
            and x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 2)


@functools.cache
def _tiles(nt: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(TI, TJ) [nt(nt+1)/2] int32: the lower triangle's tiles, row by row (on ``device``)."""
    ti, tj = torch.tril_indices(nt, nt)
    return ti.to(device=device, dtype=torch.int32), tj.to(device=device, dtype=torch.int32)


def syrk_lower_(H: Tensor, x: Tensor, alpha: float, beta: float) -> None:
    """H ← β·H + α·xᵀx on and below the diagonal of H [C, C] fp32, x [N, C]; above it H is left
    as it was (beta = 0: the old values are not read, so H may hold anything there)."""
    N, C = x.shape
    block, block_k, warps, stages = SYRK_CONFIG
    ti, tj = _tiles(triton.cdiv(C, block), H.device)
    _syrk_lower_kernel[(ti.numel(),)](
        x, x.stride(0), x.stride(1), H, H.stride(0), H.stride(1), ti, tj, N, C, float(alpha), float(beta),
        BLOCK=block, BLOCK_K=block_k, SCALE_H=beta != 0.0, num_warps=warps, num_stages=stages,
    )


def mirror_lower_(H: Tensor) -> None:
    """Copy H [C, C]'s lower triangle onto its upper one, in place: H becomes symmetric."""
    C = H.shape[0]
    block = 64
    ti, tj = _tiles(triton.cdiv(C, block), H.device)
    _mirror_kernel[(ti.numel(),)](H, H.stride(0), H.stride(1), ti, tj, C, BLOCK=block, num_warps=4)
