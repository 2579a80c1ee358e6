"""``_gather_cols``: ``out[m, j] = x[m, idx[j]]``, the column gather the decode paths run before
their kernels (x into the stored column order, or into the tensor-core kernel's order,
layout.kernel_perm), for :func:`misq.runtime.kernels.gather_columns`. (Prefill needs none: its
dequantize kernel writes the weights in x's own column order.)

Why not ``torch.index_select``: on an H200 its kernel took 6.3-6.7 µs for one to sixteen rows of
5120 columns (ncu, session 9): it launches about ten blocks that each walk their elements one after
another, so the time is a chain of dependent loads, against a 16-20 µs kernel that follows it.
Here each program takes BLOCK columns of one row, so the index and x loads of all of them are in
flight at once.
"""

from __future__ import annotations

from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_cols(x_ptr, idx_ptr, out_ptr, n_out, stride_xm, stride_om, BLOCK: tl.constexpr):
        """Program (column block, row): out[row, cols] = x[row, idx[cols]] (x's columns unit-strided)."""
        row = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_out
        idx = tl.load(idx_ptr + cols, mask=ok, other=0)
        v = tl.load(x_ptr + row * stride_xm + idx, mask=ok, other=0.0)
        tl.store(out_ptr + row * stride_om + cols, v, mask=ok)

    @triton.jit
    def _gather_scaled(x_ptr, idx_ptr, out_ptr, n_out, P: tl.constexpr, BLOCK: tl.constexpr):
        """One row, for the batch-1 CUDA-core kernel's pre-gathered input (tile_kernel XPREP):
        out float32 [n_out], out[j] = x[idx[j]] * 2**-q(j), q the bit position at which the
        kernel leaves column j's P-bit code in its word (layout block of 16 * 32 / P columns,
        slot s = (j % block) // 16 at bit P s, or P s - 16 for slots read from the high half,
        see tile_kernel: the code ends below bit 23). Scaling here saves the kernel a convert and a
        multiply per x value."""
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_out
        idx = tl.load(idx_ptr + cols, mask=ok, other=0)
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        sh = P * ((cols % (16 * (32 // P))) // 16)
        q = tl.where(sh + P <= 23, sh, sh - 16)
        scale = ((127 - q) << 23).to(tl.float32, bitcast=True)  # 2**-q, exactly
        tl.store(out_ptr + cols, x * scale, mask=ok)
