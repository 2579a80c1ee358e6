"""The Hessian of a linear layer's reconstruction loss, accumulated over calibration tokens.

H = 2/n Σ x xᵀ [C, C] for the layer's inputs x [..., C], the quantity SparseGPT and GPTQ solve
against (:mod:`misq.algorithms.sparsegpt`). On CUDA with fp16/bf16 inputs it is one tensor-core
GEMM per batch with fp32 accumulation and output, probed at first use.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


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
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.H.dtype == torch.float32 and mm_out_dtype_supported():
            # Tensor-core product with fp32 accumulation *and* fp32 output: the products of
            # fp16 inputs are exact in fp32, so this matches upcasting first, several times faster.
            if addmm_out_dtype_supported():
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
