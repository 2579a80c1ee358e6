"""fp32 matrix products on TF32 tensor cores, for the few places where ~1e-3 relative is enough.

A TF32 product keeps 10 mantissa bits of each operand: several times fp32's speed on the GPU,
about 1e-3 relative per product. misq takes it only for numbers that need no more: the reported
errors' normaliser tr(W H Wᵀ) (:mod:`misq.algorithms.output_error`) and the least-squares scales
that the checkpoint stores in fp16 anyway (:mod:`misq.algorithms.scale_refit`). The solver's
own products stay fp32 (as 3xTF32 GEMMs its lazy block updates were no faster on an H200:
1.22 against 1.16 s per 13B layer, session 6); the coordinate descent's update outside each block
runs as one 3xTF32 GEMM (:func:`misq.algorithms.coordinate_descent.split_tf32`, fp32-accurate,
3% of a 13B layer faster, session 9).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def tf32_matmul(enabled: bool = True) -> Iterator[None]:
    """fp32 GEMMs inside the block may use TF32 tensor cores (when ``enabled``); the previous
    setting comes back after."""
    m = torch.backends.cuda.matmul
    if not enabled:
        yield
    elif hasattr(m, "fp32_precision"):  # torch >= 2.9; never mix with the legacy flag
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
