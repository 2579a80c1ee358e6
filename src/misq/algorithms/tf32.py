"""fp32-accurate matrix products from TF32 tensor cores (the "3xTF32" split), for CUDA.

A TF32 product keeps 10 mantissa bits of each operand. Splitting each fp32 operand into a
TF32-exact high part and a remainder, A = A_hi + A_lo, and dropping only the lo·lo term,

    A·B ≈ A_hi·B_hi + A_hi·B_lo + A_lo·B_hi,

gives about 1e-6 relative error (plain fp32: 6e-8) at several times fp32's speed on the GPU.
The reported errors' direct products use it (:mod:`misq.algorithms.output_error`). The
solver's lazy block updates stay plain fp32: as 3xTF32 GEMMs they were no faster on an H200
(1.22 against 1.16 s per 13B layer, session 6).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def tf32_hi(x: Tensor) -> Tensor:
    """x (fp32) with its 13 low mantissa bits cleared: exactly representable in TF32."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


@contextmanager
def tf32_matmul() -> Iterator[None]:
    """fp32 GEMMs inside the block may use TF32 tensor cores; the previous setting comes back after."""
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


def quadratic_form_3xtf32(X: Tensor, H_hi: Tensor, H_lo: Tensor) -> Tensor:
    """tr(X H Xᵀ) for X [r, C] with H = H_hi + H_lo (H_hi = :func:`tf32_hi` of H), 0-dim fp32."""
    X_hi = tf32_hi(X)
    X_lo = X - X_hi
    with tf32_matmul():
        Y = X_hi @ H_hi
        Y.addmm_(X_hi, H_lo).addmm_(X_lo, H_hi)
    return torch.sum(Y * X)
