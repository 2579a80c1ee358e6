"""H += xᵀx over the upper block triangle only: a Hessian is symmetric, so half its GEMM is redundant.

For a layer input x [N, C], H = xᵀx costs 2·N·C² flops; the blocks on and above the diagonal
of a k×k tiling hold all of it, (k + 1)/2k of the work (62% at k = 4). The driver accumulates
the Hessians of a 13B layer over 128 × 2048 tokens in about 0.24 s at the GPU's fp16 matrix
rate, a fifth of the layer, so this is the one way left to make them cheaper. The lower tiles
are filled once, at the end (:func:`mirror_upper`).

Each tile is one GEMM straight into its view of H (cuBLAS takes the leading dimension), with
the running-mean scaling in its epilogue, like the whole-matrix update it replaces; tiles are
multiples of 128 columns and large (≈2560) so that each GEMM still runs at full rate.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

TILE = 2560  # columns per tile, roughly: k = round(C / TILE) tiles, so C = 5120 -> 2, 13824 -> 5
MIN_COLUMNS = 4096  # below this the whole GEMM is cheap, and one launch beats k(k+1)/2


def tile_edges(columns: int, tile: int = TILE) -> list[int]:
    """Tile boundaries [0, ..., columns] (interior ones at multiples of 128)."""
    k = max(1, round(columns / tile))
    step = math.ceil(columns / k / 128) * 128
    return [*range(0, columns, step), columns]


def _pairs(edges: list[int]) -> list[tuple[slice, slice]]:
    """(rows, cols) of every tile on or above the diagonal."""
    spans = [slice(a, b) for a, b in itertools.pairwise(edges)]
    return [(spans[i], spans[j]) for i in range(len(spans)) for j in range(i, len(spans))]


def add_upper(H: Tensor, x: Tensor, beta: float, alpha: float, edges: list[int]) -> None:
    """H ← beta·H + alpha·xᵀx on the tiles on and above the diagonal of ``edges``; H [C, C]
    (fp32), x [N, C] (fp16/bf16 on CUDA: fp32 accumulation and output; else H's dtype)."""
    mixed = x.dtype != H.dtype
    for rows, cols in _pairs(edges):
        view = H[rows, cols]
        if mixed:
            torch.addmm(view, x[:, rows].t(), x[:, cols], out_dtype=H.dtype, beta=beta, alpha=alpha, out=view)
        else:
            view.addmm_(x[:, rows].t(), x[:, cols], beta=beta, alpha=alpha)


def mirror_upper(H: Tensor, edges: list[int]) -> Tensor:
    """Fill the tiles below the diagonal from those above it (in place); returns H."""
    for rows, cols in _pairs(edges):
        if rows != cols:
            H[cols, rows].copy_(H[rows, cols].t())
    return H


@functools.cache
def view_out_supported() -> bool:
    """Does ``torch.addmm(view, a, b, out_dtype=float32, out=view)`` on fp16 CUDA inputs write a
    strided view of a larger fp32 matrix in place, leaving the rest alone? (Probed at first use.)"""
    try:
        if not torch.cuda.is_available():
            return False
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(96, 64, device="cuda", dtype=torch.float16, generator=g)
        H = torch.randn(64, 64, device="cuda", generator=g)
        ref = H.clone()
        ref[8:40, 24:56] = 0.5 * ref[8:40, 24:56] + 0.25 * (a[:, 8:40].float().t() @ a[:, 24:56].float())
        view = H[8:40, 24:56]
        out = torch.addmm(view, a[:, 8:40].t(), a[:, 24:56], out_dtype=torch.float32, beta=0.5, alpha=0.25, out=view)
        return out.data_ptr() == view.data_ptr() and bool(torch.allclose(H, ref, rtol=1e-5, atol=1e-5))
    except Exception:
        return False
