"""``_mma_mm``: the tensor-core kernel, for :func:`misq.runtime.decode_plan.decode_matmul`'s ``mma``
path (M = 2..16 rows padded to BM = 16, and M = 1 for widths of several pieces) and for
:func:`misq.runtime.decode_plan.prefill_matmul` (BM = 64 to 256 rows a program).

One launch covers one or two segments (widths): y [M, N] = x @ W^T, W never written to memory.
Per layout block a program loads all of its word rows (per piece [16, BN, H]); per chunk of TC
tiles (up to 8: 16 TC columns) it makes the decoder's fp16 weights, bit for bit, two per 32-bit
operation (triton_common.pk_halves), laid out in the kernel's column order (``_pk_chunk``: fp16
[BN, 16 TC], layout.kernel_order), and multiplies them, as the left operand in registers, with the
x tile [BM, 16 TC] on the tensor cores (wgmma), into acc float32 [BN, BM].

x (fp16, rows stride_xm apart) is read at positions of the kernel's column order: either already
gathered into it (GATHER false: the decode ``pregather`` path and prefill, one kernels.gather_columns by
layout.kernel_perm, since gathering 2-byte elements in the kernel cost 2-3x at M = 16), or gathered
here through q, layout.kernel_perm's slice for the segment (GATHER true). Program (pid, s): output
tile pid (BM rows fastest, then BN features); with two segments, split-K programs take about equal
numbers of columns. MODE as :mod:`misq.runtime.tile_kernel`'s (split-K workspace). Codes must be
under 1024: widths of at most 10 bits (launch_plan.mma_ok).
"""

from __future__ import annotations

from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from misq.runtime.triton_common import load_pieces, pk_halves, pk_scales, write_out

    @triton.jit
    def _pk_chunk(wA, wB, wC, wD, c, zz, ss, BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                  PC: tl.constexpr, PD: tl.constexpr, PMIN: tl.constexpr, TC: tl.constexpr):
        """fp16 [BLOCK_N, 16 TC]: pk_halves' weights in the kernel's order (layout.kernel_order)."""
        lo, hi = pk_halves(wA, wB, wC, wD, c, zz, ss, BITS, PA, PB, PC, PD, PMIN, TC)
        e = tl.permute(tl.join(lo, hi), (2, 0, 3, 1, 4))  # [BN, SA, HA, 16, 2]
        return tl.reshape(e, (e.shape[0], 16 * TC))

    @triton.jit
    def _mma_operands(x_ptr, q_ptr, stride_xm, offs_m, m_ok, s_ptr, z_ptr, g_ptr, blk, c, offs_k, n_cols, n_groups,
                      offs_n, n_ok, N, PA: tl.constexpr, PMIN: tl.constexpr, GROUP: tl.constexpr, TC: tl.constexpr,
                      EVEN: tl.constexpr, GATHER: tl.constexpr):
        """(xt fp16 [BM, 16 TC], zz, ss): chunk c of block blk's x tile and scale pairs (pk_scales)."""
        T: tl.constexpr = 32 // PMIN
        BK: tl.constexpr = 16 * TC
        pos = blk * (16 * T) + c * BK + offs_k
        if GATHER:
            idx = tl.load(q_ptr + pos)
        else:
            idx = pos
        if EVEN:  # no padding columns
            xm = m_ok[:, None]
        else:  # the block's column at each position k = (16 i + r) 2 + j: 16 (c TC/2 + i) + r + j 16 T/2
            col = blk * (16 * T) + 16 * (c * (TC // 2) + offs_k // 32) + (offs_k // 2) % 16 + (offs_k % 2) * (8 * T)
            xm = m_ok[:, None] & (col < n_cols)[None, :]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + idx[None, :], mask=xm, other=0.0)
        zz, ss = pk_scales(blk, c, s_ptr, z_ptr, g_ptr, n_cols, n_groups, offs_n, n_ok, N, GROUP, T, TC, PA // PMIN)
        return xt, zz, ss

    @triton.jit
    def _mma_dot(acc, wA, wB, wC, wD, xt, zz, ss, c, BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                 PC: tl.constexpr, PD: tl.constexpr, PMIN: tl.constexpr, TC: tl.constexpr):
        """acc += chunk c's weights (made from the block's words wA .. wD and zz, ss) @ xt^T."""
        e = _pk_chunk(wA, wB, wC, wD, c, zz, ss, BITS, PA, PB, PC, PD, PMIN, TC)
        return tl.dot(e, tl.trans(xt), acc)

    @triton.jit
    def _mma_segment(acc, x_ptr, q_ptr, stride_xm, offs_m, m_ok, wa, wb, wc, wd, s_ptr, z_ptr, g_ptr,
                     b_lo, b_hi, n_cols, n_groups, offs_n, n_ok, N,
                     BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, PC: tl.constexpr, PD: tl.constexpr,
                     GROUP: tl.constexpr, TC: tl.constexpr, EVEN: tl.constexpr, GATHER: tl.constexpr,
                     FLAT: tl.constexpr):
        """acc [BN, BM] += W[:, cols] @ x[:, cols]^T over layout blocks [b_lo, b_hi) of one segment,
        one tl.dot per chunk of TC tiles (W, the left operand, made in registers). Position p of
        the kernel order (layout.kernel_order) reads x's column q[p] (GATHER) or x's column p (x
        already permuted by layout.kernel_perm)."""
        PMIN: tl.constexpr = PD if PD > 0 else (PC if PC > 0 else (PB if PB > 0 else PA))
        T: tl.constexpr = 32 // PMIN
        BK: tl.constexpr = 16 * TC
        offs_k = tl.arange(0, BK)
        if FLAT:  # one loop step a chunk: software pipelining buffers one x tile a stage, not a block's
            for u in range(b_lo * (T // TC), b_hi * (T // TC)):
                blk = u // (T // TC)
                wA, wB, wC, wD = load_pieces(wa, wb, wc, wd, blk, 0, PA, PB, PC, PD, PMIN, True, offs_n, n_ok, N)
                xt, zz, ss = _mma_operands(x_ptr, q_ptr, stride_xm, offs_m, m_ok, s_ptr, z_ptr, g_ptr, blk,
                                           u % (T // TC), offs_k, n_cols, n_groups, offs_n, n_ok, N,
                                           PA, PMIN, GROUP, TC, EVEN, GATHER)
                acc = _mma_dot(acc, wA, wB, wC, wD, xt, zz, ss, u % (T // TC), BITS, PA, PB, PC, PD, PMIN, TC)
        else:  # a block's words loaded once, its chunks unrolled
            for blk in range(b_lo, b_hi):
                # chunk 0's x tile and scales before the words: Triton converts the words' layout
                # through shared memory right after their load, and no load issued after that
                # barrier overlaps it, so this order keeps the three round trips in flight together
                # (at 4 bits the whole block is one chunk). Prefetching chunk c + 1's operands during
                # chunk c as well was slower at 3 bits (BENCHMARKS.md, session 14).
                for c in tl.static_range(T // TC):
                    xt, zz, ss = _mma_operands(x_ptr, q_ptr, stride_xm, offs_m, m_ok, s_ptr, z_ptr, g_ptr, blk, c,
                                               offs_k, n_cols, n_groups, offs_n, n_ok, N, PA, PMIN, GROUP, TC, EVEN,
                                               GATHER)
                    if c == 0:
                        wA, wB, wC, wD = load_pieces(wa, wb, wc, wd, blk, 0, PA, PB, PC, PD, PMIN, True, offs_n, n_ok, N)
                    acc = _mma_dot(acc, wA, wB, wC, wD, xt, zz, ss, c, BITS, PA, PB, PC, PD, PMIN, TC)
        return acc

    @triton.jit
    def _mma_mm(out_ptr, ws_ptr, cnt_ptr, bias_ptr, M, N, stride_xm, stride_om, off2,
                x1, q1, a1, b1, c1, d1, s1, z1, g1, n1, k1, bps1,
                x2, q2, a2, b2, c2, d2, s2, z2, g2, n2, k2, bps2,
                BITS1: tl.constexpr, PA1: tl.constexpr, PB1: tl.constexpr, PC1: tl.constexpr, PD1: tl.constexpr,
                GROUP1: tl.constexpr, TC1: tl.constexpr, EVEN1: tl.constexpr,
                BITS2: tl.constexpr, PA2: tl.constexpr, PB2: tl.constexpr, PC2: tl.constexpr, PD2: tl.constexpr,
                GROUP2: tl.constexpr, TC2: tl.constexpr, EVEN2: tl.constexpr, NSEG: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, GATHER: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                GLU: tl.constexpr = False):
        """y[rows, cols] = x @ W^T over one or two segments (widths), on the tensor cores. Program
        (pid, s): output tile pid (BM rows of x fastest, then BN features); split s takes blocks
        [s bps1, (s + 1) bps1) of segment 1 and [(s - off2) bps2, ...) of segment 2 (off2: the
        programs of segment 1 when they split disjointly, 0 when each takes part of both). MODE as
        _decode_mm's (1 and 2 only with one BM tile of rows); GLU as write_out's."""
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        pid_m = pid % n_m
        pid_n = pid // n_m
        pid_s = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < M
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        PMIN1: tl.constexpr = PD1 if PD1 > 0 else (PC1 if PC1 > 0 else (PB1 if PB1 > 0 else PA1))
        lo = pid_s * bps1
        hi = tl.minimum(lo + bps1, tl.cdiv(n1, 16 * (32 // PMIN1)))
        acc = _mma_segment(acc, x1, q1, stride_xm, offs_m, m_ok, a1, b1, c1, d1, s1, z1, g1, lo, hi, n1, k1,
                           offs_n, n_ok, N, BITS1, PA1, PB1, PC1, PD1, GROUP1, TC1, EVEN1, GATHER, BM > 16)
        if NSEG == 2:
            PMIN2: tl.constexpr = PD2 if PD2 > 0 else (PC2 if PC2 > 0 else (PB2 if PB2 > 0 else PA2))
            lo = (pid_s - off2) * bps2
            hi = tl.minimum(lo + bps2, tl.cdiv(n2, 16 * (32 // PMIN2)))
            lo = tl.maximum(lo, 0)
            acc = _mma_segment(acc, x2, q2, stride_xm, offs_m, m_ok, a2, b2, c2, d2, s2, z2, g2, lo, hi, n2, k2,
                               offs_n, n_ok, N, BITS2, PA2, PB2, PC2, PD2, GROUP2, TC2, EVEN2, GATHER, BM > 16)
        write_out(tl.trans(acc), offs_m, m_ok, offs_n, n_ok, N, pid_n, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr,
                   HAS_BIAS, MODE, GLU)
