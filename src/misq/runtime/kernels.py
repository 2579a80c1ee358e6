"""Triton kernels over the runtime layout of :mod:`misq.runtime.layout`.

* :func:`segment_matmul` (decode, M <= 16 rows of input): one launch per width segment. Each
  program takes BLOCK_N output features and a split-K slice of the segment's columns, unpacks the
  power-of-two code pieces of a [BLOCK_K, BLOCK_N] tile in registers (one int32 load per
  32 // p codes), dequantizes ``(code - zero) * scale`` in float32 exactly as the checkpoint's
  decoder does, rounds to fp16 and multiplies on the tensor cores (the M rows padded to 16),
  then atomically adds its partial [M, BLOCK_N] sums into a float32 output shared by every
  segment. Split-K keeps all 132 SMs busy on a GEMV whose N alone gives ~80 programs.
* :func:`dequantize_into` (prefill, M > 16): writes the layer's weight, transposed, in the
  gathered column order, into a reused fp16 buffer [C, N], and the caller runs one cuBLAS matmul.
  Cost: one extra write and read of an fp16 copy of the layer (about 2 bytes a weight, ~40 us
  for 13824x5120 on an H200) and one buffer the size of the largest layer per device.

Pointers for pieces a width does not have get a dummy tensor; constexpr BITS prunes their code.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the runtime dequantizes layer by layer instead
    HAVE_TRITON = False

DECODE_MAX_ROWS = 16  # above this, dequantize into a buffer and use cuBLAS
# Launch settings (benchmarks/decode_speed.py --tune sweeps them on the device and sets these).
# Tuned on an H200 (BENCHMARKS.md, issue 14): 128/1056/4/2 beat 64/528/4/3 by 10-25% at batch 1.
_BLOCK_N = 128
_TARGET_PROGRAMS = 8 * 132  # split-K deep enough for ~8 programs per SM
_NUM_WARPS = 4
_NUM_STAGES = 2
_DEQUANT_BLOCK_N = 64  # prefill's dequantize kernel (not tuned)


if HAVE_TRITON:

    @triton.jit
    def _piece(ptr, k0, offs_n, n_ok, N, KPAD, P: tl.constexpr, SHIFT: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr):
        """[BLOCK_K, BLOCK_N] int32: the P-bit piece of the codes of columns k0.., shifted into place."""
        PER: tl.constexpr = 32 // P
        WK: tl.constexpr = BLOCK_K // PER
        offs_w = k0 // PER + tl.arange(0, WK)
        w = tl.load(ptr + offs_w[:, None] * N + offs_n[None, :],
                    mask=(offs_w[:, None] < KPAD // PER) & n_ok[None, :], other=0)
        shifts = tl.arange(0, PER) * P
        v = (w[:, None, :] >> shifts[None, :, None]) & ((1 << P) - 1)  # [WK, PER, BLOCK_N]
        return tl.reshape(v, (BLOCK_K, BLOCK_N)) << SHIFT

    @triton.jit
    def _tile(w8, w4, w2, w1, s_ptr, z_ptr, g_ptr, k0, offs_n, n_ok, N, K, KPAD,
              BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """The fp16 weight tile [BLOCK_K, BLOCK_N] (input columns k0.., output features offs_n)."""
        code = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
        if BITS & 8:
            code = code | _piece(w8, k0, offs_n, n_ok, N, KPAD, 8, BITS & 7, BLOCK_K, BLOCK_N)
        if BITS & 4:
            code = code | _piece(w4, k0, offs_n, n_ok, N, KPAD, 4, BITS & 3, BLOCK_K, BLOCK_N)
        if BITS & 2:
            code = code | _piece(w2, k0, offs_n, n_ok, N, KPAD, 2, BITS & 1, BLOCK_K, BLOCK_N)
        if BITS & 1:
            code = code | _piece(w1, k0, offs_n, n_ok, N, KPAD, 1, 0, BLOCK_K, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if GROUP > 0:  # the whole tile lies in one scale group: one row vector of scales
            g = k0 // GROUP
            m = n_ok & (k0 < K)
            s = tl.load(s_ptr + g * N + offs_n, mask=m, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=m, other=0).to(tl.float32)[None, :]
        else:  # groups of uneven lengths: each column's group from gidx
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
            m = k_ok[:, None] & n_ok[None, :]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0).to(tl.float32)
        # (code - zero) * scale in float32, then fp16: bit for bit the checkpoint decoder's weight
        return ((code.to(tl.float32) - z) * s).to(tl.float16)

    @triton.jit
    def _segment_mm(x_ptr, y_ptr, w8, w4, w2, w1, s_ptr, z_ptr, g_ptr, M, N, K, KPAD, stride_xm, stride_ym,
                    K_SPLIT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_SPLIT
        for dk in range(0, K_SPLIT, BLOCK_K):  # tiles past K load nothing (masked) and add 0
            k0 = k_lo + dk
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            w = _tile(w8, w4, w2, w1, s_ptr, z_ptr, g_ptr, k0, offs_n, n_ok, N, K, KPAD, BITS, GROUP, BLOCK_K, BLOCK_N)
            acc += tl.dot(x, w)
        tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _segment_dequant(out_ptr, w8, w4, w2, w1, s_ptr, z_ptr, g_ptr, N, K, KPAD,
                         BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        k0 = tl.program_id(0) * BLOCK_K
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _tile(w8, w4, w2, w1, s_ptr, z_ptr, g_ptr, k0, offs_n, n_ok, N, K, KPAD, BITS, GROUP, BLOCK_K, BLOCK_N)
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=(offs_k < K)[:, None] & n_ok[None, :])


def _blocks(group_len: int) -> tuple[int, int]:
    """(BLOCK_K, GROUP): the largest K tile that stays inside one scale group, and the group
    length for the kernel (0: uneven groups, read each column's group from gidx)."""
    for bk in (128, 64, 32):
        if group_len and group_len % bk == 0:
            return bk, group_len
    return 64, 0


def _pointers(seg) -> list[Tensor]:
    return [seg.words.get(p, seg.gidx) for p in (8, 4, 2, 1)]


def segment_matmul(xp: Tensor, segments: list, rows: int) -> Tensor:
    """xp fp16 [M, C] (input gathered by the layer's perm, M <= 16) -> float32 [M, rows]: the
    sum over quantized segments of xp[:, segment] @ W_segment^T (16-bit columns not included)."""
    M = xp.shape[0]
    y = torch.zeros(M, rows, dtype=torch.float32, device=xp.device)
    n_blocks = triton.cdiv(rows, _BLOCK_N)
    for seg in segments:
        block_k, group = _blocks(seg.group_len)
        k_tiles = triton.cdiv(seg.n, block_k)
        split = max(1, min(k_tiles, _TARGET_PROGRAMS // n_blocks))
        k_split = triton.cdiv(k_tiles, split) * block_k
        grid = (n_blocks, triton.cdiv(seg.n, k_split))
        kpad = triton.cdiv(seg.n, 32) * 32
        _segment_mm[grid](xp[:, seg.start:], y, *_pointers(seg), seg.scales, seg.zeros, seg.gidx, M, rows, seg.n, kpad,
                          xp.stride(0), y.stride(0), K_SPLIT=k_split, BITS=seg.bits, GROUP=group, BLOCK_M=16,
                          BLOCK_N=_BLOCK_N, BLOCK_K=block_k, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES)
    return y


def dequantize_into(out: Tensor, segments: list, rows: int) -> None:
    """Write every quantized segment's weight, transposed, into out fp16 [C, rows] at its rows."""
    for seg in segments:
        block_k, group = _blocks(seg.group_len)
        grid = (triton.cdiv(seg.n, block_k), triton.cdiv(rows, _DEQUANT_BLOCK_N))
        kpad = triton.cdiv(seg.n, 32) * 32
        _segment_dequant[grid](out[seg.start:], *_pointers(seg), seg.scales, seg.zeros, seg.gidx, rows, seg.n, kpad,
                               BITS=seg.bits, GROUP=group, BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=block_k, num_warps=4)
