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

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from misq.algorithms.quantizer import quantize
from misq.algorithms.tf32 import tf32_matmul

log = logging.getLogger(__name__)

GridFn = Callable[[int, int], tuple[Tensor, Tensor, Tensor]]


@torch.no_grad()
def coordinate_descent(W: Tensor, W0: Tensor, H: Tensor, keep: Tensor, grid: GridFn, *, damp: float = 0.0, passes: int = 1,
                       blocksize: int = 128, fused: bool = True, chunk_elems: int = 1 << 26,
                       record: bool = True) -> Tensor:
    """Lower tr((W − W0)(H + damp·I)(W − W0)ᵀ) over W's grid points, in place; returns the change per row [R] (≤ 0).

    W [R, C] fp32, the sweep's weights (every kept weight on its grid, the others 0); W0 [R, C]
    the weights before the solve (any float dtype), H [C, C] the undamped Hessian, keep [R, C]
    bool (False: the weight stays 0). ``grid(i1, i2)`` gives (scale, zero, maxq), each [R, i2 − i1],
    of columns [i1, i2) (maxq inf: not quantized, the weight takes its continuous optimum).
    ``damp`` is added to H's diagonal for the descent and taken off again (the diagonal is
    restored bit for bit). Rows are independent, so they are taken ``chunk_elems // C`` at a time:
    the descent's own memory, P = (W − W0)(H + damp·I) [rows, C] fp32, stays bounded. ``fused``: on
    CUDA each block is one Triton launch (:mod:`misq.algorithms.fused_descent`), else the eager loop.
    ``record``: on CUDA, from the third pass on replay a CUDA graph of the second (:func:`_record`)
    where the device has room for it; the same weights bit for bit.
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
            change[sl] = _descend(W[sl], W0[sl], H, keep[sl], rows_grid, passes, blocksize, fused, record)
    finally:
        H.diagonal().copy_(diag)
    return change


def _rows_of(grid: GridFn, sl: slice) -> GridFn:
    return lambda i1, i2: tuple(t[sl] for t in grid(i1, i2))


def _descend(W: Tensor, W0: Tensor, H: Tensor, keep: Tensor, grid: GridFn, passes: int, blocksize: int,
             fused: bool, record: bool) -> Tensor:
    """:func:`coordinate_descent` on rows W [r, C] (a view, updated in place) against H (damped)."""
    from misq.algorithms.fused_descent import fused_descent_block  # Triton only loads where it runs

    R, C = W.shape
    hdiag = torch.diag(H)
    live = (hdiag > 0).tolist()  # once, not a device sync per column in the eager loop
    with tf32_matmul(False):
        diff = W - W0.to(W.dtype)
        P = diff @ H  # [r, C]: half the gradient of f, kept current as W moves
        before = torch.sum(P * diff, dim=1)
        del diff

    def one_pass() -> None:
        for i1 in range(0, C, blocksize):
            i2 = min(i1 + blocksize, C)
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
            _update_outside(P, D, H, i1, i2)

    graph, tried = None, False
    for k in range(passes):
        if record and not tried and k >= 1 and passes - k >= 2 and _room_to_record(P):
            # A pass is the same few hundred launches each time on the same buffers, and the host
            # could not keep up with them (one 128-column block's GPU work is 0.1-0.5 ms on an
            # H200): record the second pass once (the first ran eagerly, so every kernel is
            # compiled and cuBLAS is set up) and replay it for the rest.
            tried = True
            graph = _record(one_pass, W.device)
        if graph is not None:
            graph.replay()
        else:
            one_pass()
    del graph
    diff = W - W0.to(W.dtype)
    return torch.sum(P * diff, dim=1) - before


def _room_to_record(P: Tensor) -> bool:
    """Whether a CUDA graph of a pass over P's rows [r, C] fits: its temporaries get a memory pool of
    their own, which the allocator's cached blocks cannot serve. A 70B-shaped layer's recorded passes
    reserved 5.9 GiB more than relaunched ones (BENCHMARKS.md, session 16): ask for 4 P's and 2 GiB free."""
    if not P.is_cuda:
        return False
    free, _total = torch.cuda.mem_get_info(P.device)
    return free >= 4 * P.numel() * P.element_size() + (2 << 30)


def _record(fn: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph | None:
    """``fn``'s launches recorded (not run) as a CUDA graph. Recorded on a side stream, as CUDA
    requires, with torch's lower-level calls: ``torch.cuda.graph`` would also empty the allocator's
    cache at every solve. Its temporaries live in the graph's own memory pool, freed with it;
    "thread_local" lets other threads (the driver's prefetch of the next layer) use CUDA meanwhile.
    None (and nothing ran) where recording fails: the caller then relaunches as before."""
    graph = torch.cuda.CUDAGraph()
    side = _side_stream(torch.device(device).index or 0)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                fn()
            finally:
                graph.capture_end()
    except RuntimeError as err:  # recorded launches never ran, so W and P are as they were
        log.warning("coordinate descent: could not record a pass as a CUDA graph (%s); relaunching",
                    str(err).splitlines()[0][:120])
        return None
    finally:
        torch.cuda.current_stream(device).wait_stream(side)
    return graph


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    """One recording stream per GPU, its cuBLAS workspace made here, outside any recording. cuBLAS
    keeps a workspace per stream for the process's life (64 MiB on an H200): with a new stream per
    recording, a 13B-shaped layer's peak grew by 0.19-0.25 GiB every layer (session 16), most likely that."""
    side = torch.cuda.Stream(index)
    with torch.cuda.stream(side):
        a = torch.ones(64, 64, device=f"cuda:{index}")
        a @ a  # the workspace is the stream's, whatever the product's precision
    side.synchronize()
    return side


# On CUDA the update outside the block is one 3xTF32 GEMM (split_tf32) instead of an fp32 one.
SPLIT_TF32 = True


def _update_outside(P: Tensor, D: Tensor, H: Tensor, i1: int, i2: int) -> None:
    """P[:, outside the block] += D [R, B] @ H[block, outside]: the block's moves, to fp32 accuracy."""
    A, Hb, tf32 = D, H[i1:i2], False
    if SPLIT_TF32 and P.is_cuda:
        A, Hb = split_tf32(D, Hb)
        tf32 = True
    with tf32_matmul(tf32):
        if i1 > 0:
            P[:, :i1].addmm_(A, Hb[:, :i1])
        if i2 < P.shape[1]:
            P[:, i2:].addmm_(A, Hb[:, i2:])


def split_tf32(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 A [R, K], B [K, C] -> A3 [R, 3K], B3 [3K, C] with A3 @ B3 = A_hi B_hi + A_hi B_lo + A_lo B_hi,
    A_hi the TF32 head of A (mantissa cut to 10 bits, so the tensor cores take it exactly) and
    A_lo = A - A_hi: the product to about 2^-21 relative on TF32 tensor cores (A_lo B_lo, about
    2^-22, is left out), against 2^-10 for plain TF32. One GEMM with three times the inner length
    instead of three: the descent's update has K = 128, where P's read and write, not the
    multiply-adds, set the time, so P is traversed once. (fp32 on an H200 ran at about 37 of its
    67 TFLOP/s here; session 9.)"""
    a_hi, b_hi = _tf32_head(A), _tf32_head(B)
    return torch.cat([a_hi, a_hi, A - a_hi], 1), torch.cat([b_hi, B - b_hi, b_hi], 0)


def _tf32_head(X: Tensor) -> Tensor:
    """X fp32 with the 13 low mantissa bits cleared (exactly representable in TF32)."""
    return (X.contiguous().view(torch.int32) & -8192).view(torch.float32)
