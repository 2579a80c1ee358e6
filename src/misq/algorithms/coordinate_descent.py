"""After the sweep: cyclic coordinate descent on the kept weights, mask and grids fixed.

The GPTQ/SparseGPT sweep is greedy: column j is rounded (or pruned) once, and its error is
pushed onto the columns after it only. Given the mask and grids it chose, the same objective

    f(W) = tr((W − W0) H (W − W0)ᵀ)        (H the solve's damped Hessian, rows independent)

can still be lowered one weight at a time (QuantEase, Behdin et al. 2023): with the others
fixed, f is a parabola in w[r, j], least at w − P[r, j] / H[j, j] with P = (W − W0) H, and the
grid point nearest to that is the best feasible value (pruned weights stay exactly 0). Each
step never raises f, so a sweep over all columns lowers the layer's error monotonically. Columns
are taken in blocks as the solver's sweep: inside a block P is updated one column at a time,
so a pass costs about what the solve's sweep costs (R·C² multiply-adds).

The other columns' P is updated lazily, in superblocks of S columns (default 1024). Updating
all of P [R, C] after every 128-column block re-reads and re-writes P once per block: those
GEMMs are bound by P's memory traffic, not their multiply-adds (~71 ms a pass of update GEMMs
for a 13B layer on an H200, session 10 profile). Inside a superblock [s1, s2) a block's moves
D [R, B] update only the superblock's other columns; at its end its moves Dsb [R, S] update the
columns outside it in one GEMM a side. P traffic a pass drops from (C/B)·R·C to
(C/B)·R·S + (C/S)·R·C (about 3x less at C = 5120), in the same Gauss-Seidel order: a block, when
visited, sees every move made before it, so the weights equal the block-by-block scheme's up to
fp32 summation order. On CUDA these GEMMs, and forming P itself (fp32 on CUDA cores: ~90 ms a
13B layer, same profile), run as 3xTF32 on tensor cores (:func:`split_tf32`), fp32-accurate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from misq.algorithms.quantizer import quantize
from misq.algorithms.tf32 import tf32_matmul

GridFn = Callable[[int, int], tuple[Tensor, Tensor, Tensor]]

SUPERBLOCK = 1024  # columns a superblock (see above): near sqrt(B·C) for C = 5120 .. 13824


@torch.no_grad()
def coordinate_descent(W: Tensor, W0: Tensor, H: Tensor, keep: Tensor, grid: GridFn, *, damp: float = 0.0, passes: int = 1,
                       blocksize: int = 128, fused: bool = True, chunk_elems: int = 1 << 26,
                       superblock: int = SUPERBLOCK) -> Tensor:
    """Lower tr((W − W0)(H + damp·I)(W − W0)ᵀ) over W's grid points, in place; returns the change per row [R] (≤ 0).

    W [R, C] fp32, the sweep's weights (every kept weight on its grid, the others 0); W0 [R, C]
    the weights before the solve (any float dtype), H [C, C] the undamped Hessian, keep [R, C]
    bool (False: the weight stays 0). ``grid(i1, i2)`` gives (scale, zero, maxq), each [R, i2 − i1],
    of columns [i1, i2) (maxq inf: not quantized, the weight takes its continuous optimum).
    ``damp`` is added to H's diagonal for the descent and taken off again (the diagonal is
    restored bit for bit). Rows are independent, so they are taken ``chunk_elems // C`` at a time:
    the descent's own memory, P = (W − W0)(H + damp·I) [rows, C] fp32, stays bounded; on CUDA the
    3xTF32 split of a superblock's moves, [rows, 3·max(S, 1024)], adds at most 3·max(S, 1024)/C of
    P, and H's split at most _SPLIT_ELEMS fp32. ``superblock`` S is rounded down to a multiple of
    ``blocksize``; S ≤ blocksize updates all other columns after every block. ``fused``: on CUDA
    each block is one Triton launch (:mod:`misq.algorithms.fused_descent`), else the eager loop.
    """
    R, C = W.shape
    change = torch.zeros(R, device=W.device, dtype=W.dtype)
    diag = H.diagonal().clone()
    H.diagonal().add_(damp)
    try:
        step = max(1, chunk_elems // max(C, 1))
        for r0 in range(0, R, step):
            sl = slice(r0, min(R, r0 + step))
            rows_grid = _rows_of(grid, sl)
            change[sl] = _descend(W[sl], W0[sl], H, keep[sl], rows_grid, passes, blocksize, fused, superblock)
    finally:
        H.diagonal().copy_(diag)
    return change


def _rows_of(grid: GridFn, sl: slice) -> GridFn:
    return lambda i1, i2: tuple(t[sl] for t in grid(i1, i2))


def _descend(W: Tensor, W0: Tensor, H: Tensor, keep: Tensor, grid: GridFn, passes: int, blocksize: int,
             fused: bool, superblock: int = SUPERBLOCK) -> Tensor:
    """:func:`coordinate_descent` on rows W [r, C] (a view, updated in place) against H (damped)."""
    from misq.algorithms.fused_descent import fused_descent_block  # Triton only loads where it runs

    R, C = W.shape
    S = max(blocksize, superblock // blocksize * blocksize)
    hdiag = torch.diag(H)
    live = (hdiag > 0).tolist()  # once, not a device sync per column in the eager loop
    diff = W - W0.to(W.dtype)
    P = _times_h(diff, H)  # [r, C]: half the gradient of f, kept current as W moves
    before = torch.sum(P * diff, dim=1)
    del diff
    for _ in range(passes):
        for s1 in range(0, C, S):
            s2 = min(s1 + S, C)
            Dsb = torch.empty(R, s2 - s1, device=W.device, dtype=W.dtype) if s2 - s1 > blocksize else None
            for i1 in range(s1, s2, blocksize):
                i2 = min(i1 + blocksize, s2)
                scale, zero, maxq = grid(i1, i2)
                Hb = H[i1:i2, i1:i2]
                D = fused_descent_block(W[:, i1:i2], P[:, i1:i2], Hb, keep[:, i1:i2], scale, zero, maxq) if fused else None
                if D is None:
                    D = torch.zeros(R, i2 - i1, device=W.device, dtype=W.dtype)
                    for jj in range(i2 - i1):
                        j = i1 + jj
                        if not live[j]:
                            continue
                        target = W[:, j] - P[:, j] / hdiag[j]
                        q = quantize(target, scale[:, jj], zero[:, jj], maxq[:, jj]) * keep[:, j]
                        d = q - W[:, j]
                        W[:, j] = q
                        D[:, jj] = d
                        P[:, i1:i2].addr_(d, Hb[jj])
                if Dsb is None:  # the superblock is this one block
                    Dsb = D
                else:  # the superblock's other columns now; the columns outside it at its end
                    _add_product(P, D, H[i1:i2], [(s1, i1), (i2, s2)])
                    Dsb[:, i1 - s1:i2 - s1] = D
            _add_product(P, Dsb, H[s1:s2], [(0, s1), (s2, C)])
    diff = W - W0.to(W.dtype)
    return torch.sum(P * diff, dim=1) - before


# On CUDA the descent's GEMMs (P itself, the updates of P) are 3xTF32 (split_tf32) instead of fp32.
SPLIT_TF32 = True
# Elements of H's 3xTF32 split made at a time: 256 MB fp32, whatever C (the split of a K-row
# slice of H is [3K, cols]; at K = 1024 and C = 28672 that is two column chunks, not one of 352 MB).
_SPLIT_ELEMS = 1 << 26
_P_ROWS = 1024  # P = diff @ H on CUDA: H taken 1024 rows (diff's columns) at a time


def _times_h(diff: Tensor, H: Tensor) -> Tensor:
    """P = diff [R, C] @ H [C, C]: on CUDA 3xTF32 over H's rows _P_ROWS at a time (diff's split is
    [R, 3·_P_ROWS], H's at most _SPLIT_ELEMS), elsewhere one fp32 GEMM."""
    if not _split(diff):
        with tf32_matmul(False):
            return diff @ H
    R, C = diff.shape
    P = torch.zeros(R, C, device=diff.device, dtype=diff.dtype)
    for k1 in range(0, C, _P_ROWS):
        k2 = min(k1 + _P_ROWS, C)
        _add_product(P, diff[:, k1:k2], H[k1:k2], [(0, C)])
    return P


def _add_product(P: Tensor, A: Tensor, Hk: Tensor, spans: list[tuple[int, int]]) -> None:
    """P[:, c1:c2] += A [R, K] @ Hk[:, c1:c2] for each (c1, c2) in ``spans``, Hk [K, C] the rows of H
    that A's columns stand for: on CUDA one 3xTF32 GEMM a span (fp32-accurate; A split once, Hk a
    chunk of at most _SPLIT_ELEMS at a time), elsewhere fp32."""
    spans = [(c1, c2) for c1, c2 in spans if c2 > c1]
    if not spans:
        return
    if not _split(P):
        with tf32_matmul(False):
            for c1, c2 in spans:
                P[:, c1:c2].addmm_(A, Hk[:, c1:c2])
        return
    A3 = _split_lhs(A)
    cols = max(1, _SPLIT_ELEMS // A3.shape[1])
    with tf32_matmul(True):
        for c1, c2 in spans:
            for j1 in range(c1, c2, cols):
                j2 = min(j1 + cols, c2)
                P[:, j1:j2].addmm_(A3, _split_rhs(Hk[:, j1:j2]))


def _split(X: Tensor) -> bool:
    return SPLIT_TF32 and X.is_cuda and X.dtype == torch.float32


def split_tf32(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 A [R, K], B [K, C] -> A3 [R, 3K], B3 [3K, C] with A3 @ B3 = A_hi B_hi + A_hi B_lo + A_lo B_hi,
    A_hi the TF32 head of A (mantissa cut to 10 bits, so the tensor cores take it exactly) and
    A_lo = A - A_hi: the product to about 2^-21 relative on TF32 tensor cores (A_lo B_lo, about
    2^-22, is left out), against 2^-10 for plain TF32. One GEMM with three times the inner length
    instead of three: the descent's update has K = 128, where P's read and write, not the
    multiply-adds, set the time, so P is traversed once. (fp32 on an H200 ran at about 37 of its
    67 TFLOP/s here; session 9.)"""
    return _split_lhs(A), _split_rhs(B)


def _split_lhs(A: Tensor) -> Tensor:
    """A [R, K] -> [A_hi, A_hi, A_lo] [R, 3K] (see :func:`split_tf32`)."""
    a_hi = _tf32_head(A)
    return torch.cat([a_hi, a_hi, A - a_hi], 1)


def _split_rhs(B: Tensor) -> Tensor:
    """B [K, C] -> [B_hi; B_lo; B_hi] [3K, C] (see :func:`split_tf32`)."""
    b_hi = _tf32_head(B)
    return torch.cat([b_hi, B - b_hi, b_hi], 0)


def _tf32_head(X: Tensor) -> Tensor:
    """X fp32 with the 13 low mantissa bits cleared (exactly representable in TF32)."""
    return (X.contiguous().view(torch.int32) & -8192).view(torch.float32)
