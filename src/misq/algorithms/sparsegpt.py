"""SparseGPT: one-shot pruning with joint quantization by the optimal-brain-surgeon update.

Given a linear layer's weight W [R, C] and the Hessian of its reconstruction loss,
H = 2/n Σ x xᵀ [C, C] (x the layer's input over n calibration tokens), columns are processed
left to right in blocks of ``blocksize``. In each block a pruning mask is chosen by the
saliency w² / [H⁻¹]_jj² (unstructured: the smallest ``sparsity`` fraction of the block; N:M:
the N smallest of every M consecutive columns), each column is pruned and quantized, and its
error is spread over the not-yet-processed columns through the Cholesky factor of H⁻¹
(Frantar & Alistarh, 2023). Quantization uses :mod:`misq.algorithms.quantizer`'s per-(row,
group) grids, so every column can have its own width.

The algorithm is row-independent: rows share H, so several layers fed the same input (q, k, v;
gate, up) are solved as one stacked matrix, with the unstructured mask still chosen per layer
(``row_segments``). This gives the same result as separate solves, in one pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from misq.algorithms.coordinate_descent import GridFn, coordinate_descent
from misq.algorithms.output_error import solver_rel_errors
from misq.algorithms.pruning_mask import KeepFn, unstructured_keep
from misq.algorithms.quantizer import FP_BITS, QuantGrid, StackedGrid, find_grid, maxq_of, quantize
from misq.algorithms.scale_refit import refit_row_scales
from misq.errors import NumericalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolverOptions:
    """How the solver computes; every choice gives the same result up to fp32 rounding.

    hinv_method:    U = chol(H⁻¹) by "reverse" (H = V Vᵀ, V upper, the Cholesky factor of H in
                    reversed order, so U = V⁻¹) or "inverse" (chol, cholesky_inverse, chol: the
                    reference's sequence, ~2.5× slower).
    fast_rel_error: on CUDA, the reported errors' denominators tr(W H Wᵀ) are one TF32 GEMM
                    (about 1e-4 relative; the numerators come from the sweep's own errors,
                    :func:`misq.algorithms.output_error.solver_rel_errors`); False: fp32.
    fused:          for the driver: take the Triton block sweep where it runs
                    (:func:`misq.algorithms.fused.get_block_fn`); ``solve`` takes ``block_fn``.
    record_descent: on CUDA, coordinate-descent passes after the second replay a CUDA graph of
                    it (bit for bit the same; the host stops being the limit) where the device
                    has room for the graph's own memory; the driver turns it off under
                    --offload-activations, whose point is the smallest GPU.
    """

    hinv_method: Literal["reverse", "inverse"] = "reverse"
    fast_rel_error: bool = True
    fused: bool = True
    record_descent: bool = True


DEFAULT_OPTIONS = SolverOptions()


@dataclass
class SolveResult:
    """What a solve produced for the stacked weight W [R, C].

    weight:    [R, C] float32, pruned (exact zeros) and quantized
    keep:      [R, C] bool, True where a weight survived pruning
    rel_error: per row segment, ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs
    damp:      the damping fraction that made H positive definite
    seconds:   wall time of the solve
    """

    weight: Tensor
    keep: Tensor
    rel_error: list[float]
    damp: float
    seconds: float
    sparsity: list[float] = field(default_factory=list)
    group_scale: Tensor | None = None  # [R, K] grids of the solve's grid_groups, in their order
    group_zero: Tensor | None = None
    error_terms: list[tuple[float, float]] = field(default_factory=list)  # per segment: (tr(ΔW H ΔWᵀ), tr(W H Wᵀ))


def damped_inverse_cholesky(H: Tensor, percdamp: float, max_tries: int = 6, *,
                            method: Literal["reverse", "inverse"] = DEFAULT_OPTIONS.hinv_method) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ ×10 until H is PD.

    H: [C, C], modified in place. ``method``: see :attr:`SolverOptions.hinv_method`.
    Returns (U [C, C] upper triangular, λ used).
    """
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    if not torch.isfinite(mean_diag):
        raise NumericalError("the Hessian holds NaN/Inf: the layer's calibration inputs are not finite")
    damp, added = percdamp, 0.0
    for _attempt in range(max_tries):
        H[diag, diag] += damp * mean_diag - added
        added = damp * mean_diag
        U = _upper_cholesky_of_inverse(H, method)
        if U is not None:
            return U, damp
        log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise NumericalError(f"the Hessian is not positive definite even with damping {damp / 10:.3g} of its mean diagonal "
                         f"after {max_tries} tries: use more calibration windows (--nsamples) or a larger --percdamp")


def _upper_cholesky_of_inverse(H: Tensor, method: Literal["reverse", "inverse"]) -> Tensor | None:
    """Upper U [C, C] with Uᵀ U = H⁻¹ for H [C, C], or None when H is not positive definite.

    "reverse": H = V Vᵀ with V upper, so H⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹. "inverse": chol(H),
    cholesky_inverse, chol again. Both give the same unique factor up to fp32 rounding.
    """
    if method not in ("reverse", "inverse"):
        raise ValueError(f"unknown inverse-Cholesky method {method!r}")
    if method == "reverse":
        Hr = H.flip(0, 1)
        M, info = torch.linalg.cholesky_ex(Hr)
        del Hr
        if info != 0:
            return None
        V = M.flip(0, 1)
        del M
        U = torch.empty_like(V)
        _invert_upper_into(V, U)
        return U
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    return U if info == 0 else None


def _invert_upper_into(V: Tensor, out: Tensor, leaf: int = 1024) -> None:
    """out = V⁻¹ for upper-triangular V, by halves: [[A, B], [0, D]]⁻¹ = [[A⁻¹, −A⁻¹·B·D⁻¹], [0, D⁻¹]].

    The off-diagonal blocks are fp32 GEMMs (≈ ⅔ n³ flops, against 2 n³ for a triangular solve
    with n right-hand sides); the leaves are triangular solves.
    """
    n = V.shape[0]
    if n <= leaf:
        eye = torch.eye(n, device=V.device, dtype=V.dtype)
        out.copy_(torch.linalg.solve_triangular(V, eye, upper=True))
        return
    k = max(128, (n // 2) // 128 * 128)
    _invert_upper_into(V[:k, :k], out[:k, :k], leaf)
    _invert_upper_into(V[k:, k:], out[k:, k:], leaf)
    out[k:, :k].zero_()
    torch.mm(out[:k, :k] @ V[:k, k:], out[k:, k:], out=out[:k, k:])
    out[:k, k:].neg_()


BlockFn = Callable[..., tuple[Tensor, Tensor]]


def block_loop(W1: Tensor, Hinv1: Tensor, keep1: Tensor, scale1: Tensor, zero1: Tensor, maxq1: Tensor,
               prunen: int = 0, prunem: int = 0) -> tuple[Tensor, Tensor]:
    """The column-by-column OBS sweep inside one block (the straightforward, reference path).

    W1 [R, B] (modified in place), Hinv1 [B, B] upper Cholesky block, keep1 [R, B] bool
    (modified in place for N:M), scale1/zero1/maxq1 [R, B] (maxq inf = not quantized).
    Returns Q1 [R, B] (the final weights) and Err1 [R, B] (the scaled errors to propagate).
    """
    B = W1.shape[1]
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    hdiag = torch.diag(Hinv1)
    for i in range(B):
        if prunen and i % prunem == 0:
            sal = W1[:, i : i + prunem] ** 2 / hdiag[i : i + prunem].reshape(1, -1) ** 2
            pruned = torch.topk(sal, prunen, dim=1, largest=False)[1]
            keep1[:, i : i + prunem].scatter_(1, pruned, False)
        w = W1[:, i]
        q = quantize(w * keep1[:, i], scale1[:, i], zero1[:, i], maxq1[:, i])
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1


def column_params(grids: list[QuantGrid]) -> StackedGrid:
    """The grids of layers stacked by rows (R = Σ rows), for :func:`solve`."""
    return StackedGrid(list(grids))


@torch.no_grad()
def solve(
    W: Tensor,
    H: Tensor,
    qparams: StackedGrid | None,
    *,
    sparsity: float | Sequence[float] = 0.0,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    row_segments: list[int] | None = None,
    block_fn: BlockFn | None = None,
    options: SolverOptions = DEFAULT_OPTIONS,
    order: Tensor | None = None,
    grid_groups: Sequence[tuple[int, int, int]] | None = None,
    grid_mse: bool = False,
    keep_fn: KeepFn | None = None,
    refit: bool = True,
    refine_passes: int = 0,
) -> SolveResult:
    """Prune and quantize W [R, C] against H [C, C] (left as it was: the solve works on its own copy).

    ``qparams``: the layers' grids (:func:`column_params`), expanded to per-weight (scale, zero,
    maxq) one block of columns at a time; None means no quantization. ``row_segments`` lists the row counts of stacked
    layers (default: one segment of R rows). ``sparsity``: one unstructured fraction, or one per
    row segment (equal values give exactly the single-value result). ``block_fn`` replaces :func:`block_loop` with a
    fused kernel of the same signature (e.g. on CUDA). ``options``: how to compute (not what).
    ``keep_fn(W1 [R, B], hdiag [B]) -> keep [R, B]`` replaces the unstructured rule of each block
    (:class:`misq.algorithms.pruning_mask.RowSplitKeep`: W holds one process's rows of a split matrix).

    ``order`` [C]: solve the columns in this order (GPTQ's act-order, or misq's width segments;
    :mod:`misq.algorithms.column_layout`); the result is in the original order again.
    ``grid_groups``: (start, end, bits) in solve positions, each a scale group whose grid is
    found when the solver reaches its first column, from the weights as they are then (after
    the earlier columns' error updates; pruned weights of the block excluded), as GPTQ does
    with ``groupsize``. Their grids come back in ``group_scale``/``group_zero``; they must cover
    every column, and ``qparams`` must then be None. Blocks are cut at every group start.

    ``refit``: after the sweep, every row whose grid is one scale for the whole row (one group,
    quantized) gets the scale that minimises its output error for the codes the sweep chose
    (:mod:`misq.algorithms.scale_refit`). **The new scales are written into ``qparams``' grids,
    in place**, so the grids the caller holds (and stores) describe the returned weights; pass
    fresh grids to each solve.

    ``refine_passes``: after the sweep (before the refit), this many passes of coordinate descent
    over the kept weights, mask and grids fixed (:mod:`misq.algorithms.coordinate_descent`), on
    the damped H; with a ``block_fn`` (the caller wants fused kernels) its blocks are fused too.
    H's diagonal is damped in place for the descent and restored bit for bit.
    """
    t0 = time.perf_counter()
    R, C = W.shape
    segments = row_segments or [R]
    assert sum(segments) == R, "row_segments must add up to the rows of W"
    # Memory: H [C, C] is the largest buffer (3 GiB fp32 for a 70B down_proj). The caller's H is
    # kept unmodified for the reported error, and only one working copy (damped, permuted) is
    # made, in a single gather; per-weight grids exist only for the block being swept. The
    # caller's W (its own dtype) is the reported error's reference, and the one fp32 working
    # copy is made in solve order directly.
    W0 = W
    H_orig = H
    dead = torch.diag(H) == 0
    if order is not None:  # solve in this order: permute everything once, undo at the end
        order = order.to(W.device)
        H = H[order.unsqueeze(1), order.unsqueeze(0)]
        dead_solve = dead[order]
        W = W0[:, order].to(torch.float32)
    else:
        H = H.clone()
        dead_solve = dead
        W = W0.to(torch.float32, copy=True)
    if not torch.isfinite(W).all():
        raise NumericalError("the weight holds NaN/Inf before compression")
    H[dead_solve, dead_solve] = 1
    W[:, dead_solve] = 0
    mean_diag = torch.diag(H).mean()  # λ = damp · this: the reported error takes the damping back out
    Hinv, damp = damped_inverse_cholesky(H, percdamp, method=options.hinv_method)
    del H

    group_at = {s: (e, b) for s, e, b in (grid_groups or ())}
    if group_at and (qparams is not None or 0 not in group_at):
        raise ValueError("grid_groups must start at column 0 and exclude qparams")
    starts = sorted(set(range(0, C, blocksize)) | set(group_at))
    group_scale: list[Tensor] = []
    group_zero: list[Tensor] = []
    keep = torch.ones_like(W, dtype=torch.bool)
    err_sq = torch.zeros(R, device=W.device)  # Σ over columns of the scaled errors², per row: the output error
    run_block = block_fn or block_loop
    # The grid of the scale group being solved, as per-row columns [R, 1] (no quantization: 1, 0, inf).
    cur_s, cur_z = torch.ones(R, 1, device=W.device), torch.zeros(R, 1, device=W.device)
    cur_q = torch.full((R, 1), float("inf"), device=W.device)
    for i1, i2 in zip(starts, [*starts[1:], C]):
        i2 = min(i2, i1 + blocksize)  # blocks are cut at group starts, so a block lies in one group
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            hdiag = torch.diag(Hinv1)
            keep1 = unstructured_keep(W1, hdiag, sparsity, segments) if keep_fn is None else keep_fn(W1, hdiag)
        if i1 in group_at:
            end, bits = group_at[i1]
            s, z = _group_grid(W[:, i1:end], keep1, bits, grid_mse)
            cur_s, cur_z = s.unsqueeze(1), z.unsqueeze(1)
            cur_q = torch.full((R, 1), float(2**bits - 1) if bits < FP_BITS else float("inf"), device=W.device)
            group_scale.append(s)
            group_zero.append(z)
        if qparams is not None:
            block_grid = qparams.columns(slice(i1, i2) if order is None else order[i1:i2], W.device)
        else:  # stride-0 views: the block kernels read them through their strides
            block_grid = tuple(t.expand(R, i2 - i1) for t in (cur_s, cur_z, cur_q))
        Q1, Err1 = run_block(W1, Hinv1, keep1, *block_grid, prunen, prunem)
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        err_sq += Err1.square().sum(dim=1)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    del Hinv, cur_s, cur_z, cur_q
    if order is not None:
        W = torch.empty_like(W).index_copy_(1, order, W)
        keep = torch.empty_like(keep).index_copy_(1, order, keep)
    if refine_passes:
        # In the original column order, on the caller's H (its diagonal damped for the descent and
        # restored), so the descent holds no second [C, C] matrix: its peak stays under the sweep's.
        # The change it reports is the change of ‖E‖² (the damped objective), which the reported
        # error below reads; dead columns are held at 0 (their weights do not reach the output).
        grid = _original_order_grid(qparams, order, grid_groups, group_scale, group_zero, R, W.device)
        err_sq += coordinate_descent(W, W0, H_orig, keep & ~dead if bool(dead.any()) else keep, grid,
                                     damp=float(damp * mean_diag), passes=refine_passes, blocksize=blocksize,
                                     fused=block_fn is not None, record=options.record_descent)
    if not torch.isfinite(W).all():
        raise NumericalError("the solved weight holds NaN/Inf")
    slices, start = [], 0
    for rows in segments:
        slices.append(slice(start, start + rows))
        start += rows
    terms: list[tuple[float, float]] = []
    rel = solver_rel_errors(W0, W, H_orig, err_sq, damp * mean_diag, ~dead, slices, fast=options.fast_rel_error, terms=terms)
    delta = refit_row_scales(W0, W, keep, H_orig, qparams, fast=options.fast_rel_error) if refit and qparams is not None else None
    if delta is not None:  # each refit row's error moved by exactly its delta (scale_refit)
        terms = [(max(num + float(delta[sl].sum()), 0.0), den) for (num, den), sl in zip(terms, slices)]
        rel = [num / den if den > 0 else 0.0 for num, den in terms]
    spars = [1.0 - keep[sl].float().mean().item() for sl in slices]
    result = SolveResult(weight=W, keep=keep, rel_error=rel, damp=damp, seconds=time.perf_counter() - t0, sparsity=spars,
                         error_terms=terms)
    if group_scale:
        result.group_scale = torch.stack(group_scale, dim=1)
        result.group_zero = torch.stack(group_zero, dim=1)
    return result


def _original_order_grid(qparams: StackedGrid | None, order: Tensor | None,
                         grid_groups: Sequence[tuple[int, int, int]] | None, group_scale: list[Tensor],
                         group_zero: list[Tensor], R: int, device: torch.device) -> GridFn:
    """(scale, zero, maxq) [R, n] of original columns [i1, i2), from whichever grids the solve used."""
    if qparams is not None:
        return lambda i1, i2: qparams.columns(slice(i1, i2), device)
    if grid_groups:  # groups are runs of solve positions (in start order, as group_scale): map columns to them
        runs = sorted(grid_groups)
        col_group = torch.repeat_interleave(torch.arange(len(runs), device=device),
                                            torch.tensor([e - s for s, e, _b in runs], device=device))
        if order is not None:
            col_group = torch.empty_like(col_group).index_copy_(0, order, col_group)
        maxq = maxq_of(torch.tensor([b for _s, _e, b in runs], device=device))[col_group]
        S, Z = torch.stack(group_scale, dim=1), torch.stack(group_zero, dim=1)
        return lambda i1, i2: (S[:, col_group[i1:i2]], Z[:, col_group[i1:i2]], maxq[i1:i2].expand(R, -1))
    return lambda i1, i2: (torch.ones(R, i2 - i1, device=device), torch.zeros(R, i2 - i1, device=device),
                           torch.full((R, i2 - i1), float("inf"), device=device))


def _group_grid(Wg: Tensor, keep1: Tensor, bits: int, mse: bool) -> tuple[Tensor, Tensor]:
    """(scale [R], zero [R]) of one scale group's weights ``Wg`` [R, n] as the solver reaches it.

    The columns inside the current block that the block's mask prunes do not count (they will
    be exact zeros, and 0 is always on the grid); columns past the block count as they are.
    """
    inside = min(keep1.shape[1], Wg.shape[1])
    if not bool(keep1[:, :inside].all()):
        Wg = Wg.clone()
        Wg[:, :inside] *= keep1[:, :inside]
    cols = torch.zeros(Wg.shape[1], dtype=torch.long, device=Wg.device)
    grid = find_grid(Wg, cols, torch.tensor([bits], device=Wg.device), mse=mse)
    return grid.scale[:, 0], grid.zero[:, 0]

