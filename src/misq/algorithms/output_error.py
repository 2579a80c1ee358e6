"""How far a compressed layer's output moved: ‖(W − Ŵ)X‖² / ‖WX‖² from the Hessian H ∝ X Xᵀ.

The solver reports this per stacked layer (row segment), its numerators read off the sweep's
own errors (:func:`solver_rel_errors`); :func:`relative_output_error` is the direct formula,
one [R, C] x [C, C] product per trace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from misq.algorithms.tf32 import tf32_matmul


def solver_rel_errors(W0: Tensor, W: Tensor, H: Tensor, err_sq: Tensor, damp: Tensor | float, live: Tensor,
                      slices: list[slice], *, fast: bool = True,
                      terms: list[tuple[float, float]] | None = None) -> list[float]:
    """The relative output error of each row segment ``slices`` of W0 against W, with the
    numerators read off the solver's own errors.

    The GPTQ/SparseGPT sweep leaves W0ₛ = Ŵ + E·U, with E [R, C] its scaled errors and U the
    upper Cholesky factor of Hₛ⁻¹, Hₛ = H + λI + D (D: 1 on the dead columns, which the solver
    zeroes in W0ₛ). Since U Hₛ Uᵀ = I, tr(ΔWₛ Hₛ ΔWₛᵀ) = ‖E‖² exactly, so the undamped
    numerator is ‖E‖² − λ‖ΔW‖² over the live columns (dead ones add nothing through H): no
    [R, C] x [C, C] product, a third of a 13B layer's error cost. The denominators tr(W0 H W0ᵀ)
    remain one product per segment; with ``fast`` on CUDA a single TF32 GEMM (a normaliser:
    about 1e-4 relative, where the numerators are fp32-exact).

    W0 [R, C] (any float dtype), W [R, C] the solved fp32 weights, H [C, C] undamped (read
    only), err_sq [R] Σ_j E[r, j]², damp λ (absolute), live [C] bool (diag(H) ≠ 0).
    """
    sums = []
    for sl in slices:
        w0 = W0[sl].float()
        moved = torch.sub(w0[:, live], W[sl][:, live]).square_().sum()
        num = torch.clamp_min(err_sq[sl].sum() - damp * moved, 0.0)
        with tf32_matmul(fast and w0.is_cuda):
            den = torch.sum((w0 @ H) * w0)
        sums.append((num, den))
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
