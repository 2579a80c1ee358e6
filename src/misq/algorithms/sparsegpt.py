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
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from misq.algorithms.quantizer import QuantGrid, quantize
from misq.errors import NumericalError

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over calibration tokens, in float32 (or float64 on request).

    ``add(x)`` takes x [..., C] in any float dtype; n counts *sequences* (the leading dim), as
    the reference does, which only rescales H (the damping is relative, so it cancels).
    """

    def __init__(self, columns: int, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        n = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1])
        beta = self.nsamples / (self.nsamples + n)
        self.nsamples += n
        scale = math.sqrt(2.0 / self.nsamples)
        if _HAS_OUT_DTYPE and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.H.dtype == torch.float32:
            # Tensor-core product with fp32 accumulation *and* fp32 output: the products of
            # fp16 inputs are exact in fp32, so this matches upcasting first, several times faster.
            if _HAS_ADDMM_OUT_DTYPE:
                # One GEMM, H = beta·H + alpha·xᵀx in its epilogue: no [C, C] temporary, no extra passes.
                torch.addmm(self.H, x.t(), x, out_dtype=torch.float32, beta=beta, alpha=scale * scale, out=self.H)
            else:
                self.H *= beta
                self.H.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=scale * scale)
        else:
            self.H *= beta
            xs = x.to(self.H.dtype)
            self.H.addmm_(xs.t(), xs, alpha=scale * scale)

    def free(self) -> Tensor:
        H, self.H = self.H, None
        return H


def _probe_out_dtype() -> bool:
    try:
        if not torch.cuda.is_available():
            return False
        a = torch.ones(2, 2, device="cuda", dtype=torch.float16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:  # older torch: no out_dtype overload
        return False


def _probe_addmm_out_dtype() -> bool:
    """Does ``torch.addmm(H, a, b, out_dtype=float32, out=H)`` work (in place, right values)?"""
    if not _HAS_OUT_DTYPE:
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(96, 40, device="cuda", dtype=torch.float16, generator=g)
        H = torch.randn(40, 40, device="cuda", generator=g)
        ref = 0.75 * H + 0.125 * (a.float().t() @ a.float())
        out = torch.addmm(H, a.t(), a, out_dtype=torch.float32, beta=0.75, alpha=0.125, out=H)
        return out.data_ptr() == H.data_ptr() and bool(torch.allclose(H, ref, rtol=1e-5, atol=1e-5))
    except Exception:  # older torch: no out_dtype overload of addmm
        return False


_HAS_OUT_DTYPE = _probe_out_dtype()
_HAS_ADDMM_OUT_DTYPE = _probe_addmm_out_dtype()


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


def damped_inverse_cholesky(H: Tensor, percdamp: float, max_tries: int = 6) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ ×10 until H is PD.

    H: [C, C], modified in place. Returns (U [C, C] upper triangular, λ used).
    """
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    if not torch.isfinite(mean_diag):
        raise NumericalError("the Hessian holds NaN/Inf: the layer's calibration inputs are not finite")
    damp, added = percdamp, 0.0
    for attempt in range(max_tries):
        H[diag, diag] += damp * mean_diag - added
        added = damp * mean_diag
        U = _upper_cholesky_of_inverse(H)
        if U is not None:
            return U, damp
        log.warning("Hessian not positive definite with damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise NumericalError(f"the Hessian is not positive definite even with damping {damp / 10:.3g} of its mean diagonal "
                         f"after {max_tries} tries: use more calibration windows (--nsamples) or a larger --percdamp")


# How U = chol(H⁻¹) (upper) is computed. "reverse": H = V Vᵀ with V upper (the Cholesky factor of
# H in reversed order), so H⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹: one factorization and one triangular
# solve. "inverse": chol(H), cholesky_inverse, chol again (the reference's sequence). Both give
# the same unique factor up to fp32 rounding.
HINV_METHOD = "reverse"


def _upper_cholesky_of_inverse(H: Tensor) -> Tensor | None:
    """Upper U with Uᵀ U = H⁻¹, or None when H is not positive definite."""
    if HINV_METHOD == "reverse":
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


def _unstructured_keep(W1: Tensor, hdiag: Tensor, sparsity: float, segments: list[int]) -> Tensor:
    """[R, B] keep-mask: per row segment, prune the ``sparsity`` fraction with lowest saliency.

    Matches the reference exactly: threshold = the sorted saliency at index ⌊n·sparsity⌋,
    prune everything ≤ threshold.
    """
    sal = W1**2 / hdiag.reshape(1, -1) ** 2
    if sparsity <= 0:
        return torch.ones_like(W1, dtype=torch.bool)
    if len(set(segments)) == 1:
        # Equal segments (q/k/v, gate/up): one batched sort, same thresholds.
        parts = sal.reshape(len(segments), -1)
        thresh = torch.sort(parts, dim=1)[0][:, int(parts.shape[1] * sparsity)]
        return (parts > thresh.unsqueeze(1)).reshape(W1.shape)
    keep = torch.ones_like(W1, dtype=torch.bool)
    start = 0
    for rows in segments:
        part = sal[start : start + rows]
        thresh = torch.sort(part.flatten())[0][int(part.numel() * sparsity)]
        keep[start : start + rows] = part > thresh
        start += rows
    return keep


def column_params(grids: list[QuantGrid]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-weight (scale, zero, maxq), each [R, C], for layers stacked by rows (R = Σ rows)."""
    parts = [g.column_grid() for g in grids]
    scale = torch.cat([p[0] for p in parts])
    zero = torch.cat([p[1] for p in parts])
    maxq = torch.cat([p[2].unsqueeze(0).expand_as(p[0]) for p in parts])
    return scale, zero, maxq


@torch.no_grad()
def solve(
    W: Tensor,
    H: Tensor,
    qparams: tuple[Tensor, Tensor, Tensor] | None,
    *,
    sparsity: float = 0.0,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    row_segments: list[int] | None = None,
    block_fn: BlockFn | None = None,
) -> SolveResult:
    """Prune and quantize W [R, C] against H [C, C] (H is consumed: modified in place).

    ``qparams`` = (scale, zero, maxq), each [R, C] (see :func:`column_params`); None means no
    quantization. ``row_segments`` lists the row counts of stacked
    layers (default: one segment of R rows). ``block_fn`` replaces :func:`block_loop` with a
    fused kernel of the same signature (e.g. on CUDA).
    """
    t0 = time.perf_counter()
    R, C = W.shape
    segments = row_segments or [R]
    assert sum(segments) == R, "row_segments must add up to the rows of W"
    W0 = W.to(torch.float32)
    W = W0.clone()
    if not torch.isfinite(W).all():
        raise NumericalError("the weight holds NaN/Inf before compression")
    H_orig = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp = damped_inverse_cholesky(H, percdamp)
    del H

    if qparams is not None:
        scale, zero, maxq = (t.to(device=W.device, dtype=torch.float32) for t in qparams)
    else:
        scale = torch.ones_like(W)
        zero = torch.zeros_like(W)
        maxq = torch.full_like(W, float("inf"))
    keep = torch.ones_like(W, dtype=torch.bool)
    run_block = block_fn or block_loop
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            keep1 = _unstructured_keep(W1, torch.diag(Hinv1), sparsity, segments)
        Q1, Err1 = run_block(W1, Hinv1, keep1, scale[:, i1:i2], zero[:, i1:i2], maxq[:, i1:i2], prunen, prunem)
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    del Hinv, scale, zero, maxq
    if not torch.isfinite(W).all():
        raise NumericalError("the solved weight holds NaN/Inf")
    slices, start = [], 0
    for rows in segments:
        slices.append(slice(start, start + rows))
        start += rows
    rel = _segment_rel_errors(W0, W, H_orig, slices)
    spars = [1.0 - keep[sl].float().mean().item() for sl in slices]
    return SolveResult(weight=W, keep=keep, rel_error=rel, damp=damp, seconds=time.perf_counter() - t0, sparsity=spars)


# On CUDA the reported errors use fp32-accurate products built from TF32 tensor-core GEMMs
# (A·B ≈ A_hi·B_hi + A_hi·B_lo + A_lo·B_hi, A_hi = A's top 10 mantissa bits): about 1e-6
# relative, like fp32, at several times fp32's speed. False: plain fp32 GEMMs everywhere.
FAST_REL_ERROR = True


def _tf32_hi(x: Tensor) -> Tensor:
    """x with its 13 low mantissa bits cleared: exactly representable in TF32."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


@contextmanager
def _tf32_matmul():
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):  # torch >= 2.9; never mix with the legacy flag
        prev = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:  # pragma: no cover - older torch
        prev = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = prev


def _quadratic_form_3xtf32(X: Tensor, H_hi: Tensor, H_lo: Tensor) -> Tensor:
    """tr(X H Xᵀ) for X [r, C] with H = H_hi + H_lo, as a 0-dim fp32 tensor."""
    X_hi = _tf32_hi(X)
    X_lo = X - X_hi
    with _tf32_matmul():
        Y = X_hi @ H_hi
        Y.addmm_(X_hi, H_lo).addmm_(X_lo, H_hi)
    return torch.sum(Y * X)


def _segment_rel_errors(W0: Tensor, W: Tensor, H: Tensor, slices: list[slice]) -> list[float]:
    """relative_output_error of each row segment; H (solve's own copy) may be overwritten."""
    if not (FAST_REL_ERROR and W.is_cuda):
        return [relative_output_error(W0[sl], W[sl], H) for sl in slices]
    H_hi = _tf32_hi(H)
    H_lo = H.sub_(H_hi)
    out = []
    for sl in slices:
        num = _quadratic_form_3xtf32(W0[sl] - W[sl], H_hi, H_lo)
        den = _quadratic_form_3xtf32(W0[sl], H_hi, H_lo)
        out.append(float(num / den) if den > 0 else 0.0)
    return out


def relative_output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for W, Ŵ [R, C] and H ∝ X Xᵀ [C, C]."""
    dW = W - W_hat
    num = torch.sum((dW @ H) * dW)
    den = torch.sum((W @ H) * W)
    return float(num / den) if den > 0 else 0.0
