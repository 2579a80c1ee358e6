"""The Hessian of a linear layer's reconstruction loss, accumulated over calibration tokens.

H = 2/n Σ x xᵀ [C, C] for the layer's inputs x [..., C], the quantity SparseGPT and GPTQ solve
against (:mod:`misq.algorithms.sparsegpt`). On CUDA with fp16/bf16 inputs it is tensor-core
work with fp32 accumulation and output: a Triton kernel over H's lower triangle where Triton
runs, else one cuBLAS GEMM per batch (probed at first use).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from misq.algorithms.fused_hessian import mirror_lower_, syrk_lower_, syrk_runs


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over calibration tokens, in float32 (or float64 on request).

    ``add(x)`` takes x [..., C] in any float dtype; n counts *sequences* (the leading dim), as
    the reference does, which only rescales H (the damping is relative, so it cancels).

    ``lower_only``: on CUDA with Triton, products fill only H's lower triangle
    (:mod:`misq.algorithms.fused_hessian`: half the work) and :meth:`free` mirrors it.
    ``batch_rows``: on the tensor-core path, inputs are gathered into one [batch_rows, C] buffer
    and multiplied together. Each GEMM reads and writes all of H [C, C] in fp32 in its epilogue;
    at one 2048-token window per product that traffic costs about a third as much as the
    product itself, whatever C is (8 bytes per C² against 2·2048 flops per C²), so four windows
    per product save about a fifth of the Hessians' time. 0: one product per ``add``.
    """

    def __init__(self, columns: int, device: torch.device | str, dtype: torch.dtype = torch.float32, *,
                 batch_rows: int = 0, lower_only: bool = True):
        self.H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.nsamples = 0
        self.batch_rows = batch_rows
        self.lower_only = lower_only
        self._mirror = False  # H's upper triangle is stale (the lower-triangle kernel ran)
        self._buf: Tensor | None = None  # [batch_rows, C], inputs waiting for their product
        self._rows = 0  # rows of _buf in use
        self._seqs = 0  # sequences they hold

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        n = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1])
        if not (self.batch_rows and self._tensor_cores(x) and x.shape[0] < self.batch_rows):
            self._flush()
            self._product(x, n)
            return
        if self._buf is not None and (self._buf.dtype != x.dtype or self._rows + x.shape[0] > self.batch_rows):
            self._flush()
        if self._buf is None or self._buf.dtype != x.dtype:
            self._buf = torch.empty(self.batch_rows, x.shape[1], device=x.device, dtype=x.dtype)
        self._buf[self._rows : self._rows + x.shape[0]].copy_(x)
        self._rows += x.shape[0]
        self._seqs += n

    def _flush(self) -> None:
        if self._rows:
            self._product(self._buf[: self._rows], self._seqs)
            self._rows = self._seqs = 0

    def _tensor_cores(self, x: Tensor) -> bool:
        return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.H.dtype == torch.float32
                and mm_out_dtype_supported())

    def _product(self, x: Tensor, n: int) -> None:
        """H ← (nsamples·H + 2·x xᵀ) / (nsamples + n) for x [rows, C] holding n sequences."""
        beta = self.nsamples / (self.nsamples + n)
        self.nsamples += n
        scale = math.sqrt(2.0 / self.nsamples)
        if self.lower_only and syrk_runs(x, self.H):
            # H is symmetric: only the tiles on and below the diagonal, half the tensor-core work
            # (the upper triangle is mirrored once, in free()). Same exact fp32 products.
            syrk_lower_(self.H, x, scale * scale, beta)
            self._mirror = True
        elif self._tensor_cores(x):
            self._make_whole()  # a mix of paths (not the driver's): H whole before a full GEMM
            # Tensor-core product with fp32 accumulation *and* fp32 output: the products of
            # fp16 inputs are exact in fp32, so this matches upcasting first, several times faster.
            if addmm_out_dtype_supported():
                # One GEMM, H = beta·H + alpha·xᵀx in its epilogue: no [C, C] temporary, no extra passes.
                torch.addmm(self.H, x.t(), x, out_dtype=torch.float32, beta=beta, alpha=scale * scale, out=self.H)
            else:
                self.H *= beta
                self.H.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=scale * scale)
        else:
            self._make_whole()
            self.H *= beta
            xs = x.to(self.H.dtype)
            self.H.addmm_(xs.t(), xs, alpha=scale * scale)

    def free(self) -> Tensor:
        """H [C, C], with any buffered inputs added; the accumulator lets go of it."""
        self._flush()
        self._make_whole()
        H, self.H, self._buf = self.H, None, None
        return H

    def _make_whole(self) -> None:
        """Copy the lower triangle onto the upper one if the lower-triangle kernel left it stale."""
        if self._mirror:
            mirror_lower_(self.H)
            self._mirror = False


# The probes run at first use, not at import: importing must not touch (or initialize) CUDA,
# and under torchrun the probe then runs on the rank's own device, after set_device.
@functools.cache
def mm_out_dtype_supported() -> bool:
    """Does ``torch.mm(a, b, out_dtype=float32)`` on fp16 CUDA inputs give an fp32 result?"""
    try:
        if not torch.cuda.is_available():
            return False
        a = torch.ones(2, 2, device="cuda", dtype=torch.float16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:
        return False


@functools.cache
def addmm_out_dtype_supported() -> bool:
    """Does ``torch.addmm(H, a, b, out_dtype=float32, out=H)`` work (in place, right values)?"""
    if not mm_out_dtype_supported():
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(96, 40, device="cuda", dtype=torch.float16, generator=g)
        H = torch.randn(40, 40, device="cuda", generator=g)
        ref = 0.75 * H + 0.125 * (a.float().t() @ a.float())
        out = torch.addmm(H, a.t(), a, out_dtype=torch.float32, beta=0.75, alpha=0.125, out=H)
        return out.data_ptr() == H.data_ptr() and bool(torch.allclose(H, ref, rtol=1e-5, atol=1e-5))
    except Exception:
        return False
