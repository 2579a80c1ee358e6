"""How far a compressed layer's output moved: ‖(W − Ŵ)X‖² / ‖WX‖² from the Hessian H ∝ X Xᵀ.

The solver reports this per stacked layer (row segment). tr(ΔW H ΔWᵀ) is one [R, C] x [C, C]
GEMM per segment, a visible share of a 13B solve in fp32, so on CUDA it can use fp32-accurate
products built from TF32 tensor-core GEMMs (``fast``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

# With SolverOptions.fast_rel_error, on CUDA the reported errors use fp32-accurate products
# built from TF32 tensor-core GEMMs (A·B ≈ A_hi·B_hi + A_hi·B_lo + A_lo·B_hi, A_hi = A's top 10
# mantissa bits): about 1e-6 relative, like fp32, at several times fp32's speed.


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


def segment_rel_errors(W0: Tensor, W: Tensor, H: Tensor, slices: list[slice], *,
                        fast: bool = True,
                        terms: list[tuple[float, float]] | None = None) -> list[float]:
    """relative_output_error of each row segment of W0 (any float dtype), W [R, C] against H [C, C] (solve's own
    copy, may be overwritten); ``fast``: 3×TF32 products on CUDA. ``terms``: each segment's
    (numerator, denominator) are appended to it (row slices of one segment add up)."""
    if not (fast and W.is_cuda):
        sums = [_error_sums(W0[sl].float(), W[sl], H) for sl in slices]
    else:
        H_hi = _tf32_hi(H)
        H_lo = H.sub_(H_hi)
        sums = [(_quadratic_form_3xtf32(W0[sl].float() - W[sl], H_hi, H_lo), _quadratic_form_3xtf32(W0[sl].float(), H_hi, H_lo))
                for sl in slices]
    if terms is not None:
        terms.extend((float(num), float(den)) for num, den in sums)
    return [_ratio(num, den) for num, den in sums]


def relative_output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for W, Ŵ [R, C] and H ∝ X Xᵀ [C, C]."""
    return _ratio(*_error_sums(W, W_hat, H))


def _error_sums(W: Tensor, W_hat: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """(tr(ΔW H ΔWᵀ), tr(W H Wᵀ)), 0-dim, for W, Ŵ [R, C] and H [C, C]."""
    dW = W - W_hat
    return torch.sum((dW @ H) * dW), torch.sum((W @ H) * W)


def _ratio(num: Tensor, den: Tensor) -> float:
    return float(num / den) if den > 0 else 0.0
