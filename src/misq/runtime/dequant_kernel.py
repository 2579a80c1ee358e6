"""``_segment_dequant``: prefill's dequantize kernel, for
:func:`misq.runtime.kernels.dequantizer`: one segment's weight, transposed, into out fp16
[C, N] (the layer's reused buffer) at the rows of its columns' original order (``rows_ptr``: the
segment's slice of the layer's perm), so the caller's one cuBLAS matmul takes x as it is, with no
gather of its columns. Each stored row is N contiguous fp16 values, so the scattered rows cost the
writes nothing.

Program (blk, pid_n): one layout block (16 T columns) and BN features, a chunk of TC tiles at a
time. Widths of at most 10 bits (PK) make the weights two per 32-bit operation
(triton_common.pk_halves: [TC/2 / HA, 16, BN, HA] pairs of columns 16 T/2 apart); wider ones
code by code: ``_chunk_codes`` ORs the pieces' bits into int32 codes [16 TC, BN] in the columns'
own order and ``_chunk_w`` scales them in float32 (the exponent trick) and rounds to fp16. Either
way the weights are the decoder's, bit for bit.
"""

from __future__ import annotations

from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from misq.runtime.triton_common import MAGIC, exact_w, load_pieces, pk_halves, pk_scales

    @triton.jit
    def _piece_chunk(w, c: tl.constexpr, P: tl.constexpr, PMIN: tl.constexpr, BITS: tl.constexpr, TC: tl.constexpr):
        """One piece's bits, in place, of the codes of tiles [c TC, (c + 1) TC) of a block, from
        all the piece's word rows of the block (w [16, BLOCK_N, H]): int32 [16 TC, BLOCK_N] whose row
        16 t + r is the block's column 16 (c TC + t) + r (the columns' own order). Tile
        c TC + t = h + H s sits in word row h * 16 + r, slot s."""
        H: tl.constexpr = P // PMIN
        S: tl.constexpr = TC // H
        BN: tl.constexpr = w.shape[1]
        sh = (c * S + tl.arange(0, S)) * P
        v = (w[None, :, :, :] >> sh[:, None, None, None]) & ((1 << P) - 1)  # [S, 16, BN, H]
        return tl.reshape(tl.permute(v, (0, 3, 1, 2)), (16 * TC, BN)) << (BITS & (P - 1))

    @triton.jit
    def _chunk_codes(wA, wB, wC, wD, c: tl.constexpr, BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                     PC: tl.constexpr, PD: tl.constexpr, PMIN: tl.constexpr, TC: tl.constexpr):
        """int32 [16 TC, BLOCK_N]: the codes of chunk c (TC tiles) of a block, pieces ORed together."""
        code = _piece_chunk(wA, c, PA, PMIN, BITS, TC)
        if PB > 0:
            code = code | _piece_chunk(wB, c, PB, PMIN, BITS, TC)
        if PC > 0:
            code = code | _piece_chunk(wC, c, PC, PMIN, BITS, TC)
        if PD > 0:
            code = code | _piece_chunk(wD, c, PD, PMIN, BITS, TC)
        return code

    @triton.jit
    def _chunk_w(code, k0, k, k_ok, s_ptr, z_ptr, g_ptr, n_groups, offs_n, n_ok, N, GROUP: tl.constexpr,
                 BK: tl.constexpr):
        """fp16 [BK, BLOCK_N] for the columns k (k0: the first): (code - zero) * scale in float32
        rounded to fp16, the decoder's weight bit for bit. One scale row when the chunk lies in one
        group; else each column's group (computed for uniform groups, else read from gidx)."""
        if GROUP > 0 and GROUP % BK == 0:
            g = k0 // GROUP
            gm = n_ok & (g < n_groups)
            s = tl.load(s_ptr + g * N + offs_n, mask=gm, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=gm, other=0).to(tl.int32)[None, :]
            zm = (z | MAGIC).to(tl.float32, bitcast=True)
            w = (((code | MAGIC).to(tl.float32, bitcast=True) - zm) * s).to(tl.float16)
        else:
            if GROUP > 0:
                g = k // GROUP
            else:
                g = tl.load(g_ptr + k, mask=k_ok, other=0)
            w = exact_w(code, g, k_ok, s_ptr, z_ptr, offs_n, n_ok, N)
        return w

    @triton.jit
    def _segment_dequant(out_ptr, rows_ptr, wa, wb, wc, wd, s_ptr, z_ptr, g_ptr, N, n_cols, n_groups,
                         BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, PC: tl.constexpr, PD: tl.constexpr,
                         GROUP: tl.constexpr, BN: tl.constexpr, TC: tl.constexpr, PK: tl.constexpr):
        """out[rows[k], n] = the weight of the segment's column k, feature n (fp16, as the
        decoder's), for one layout block (program axis 0) and BN features (axis 1), a chunk of TC
        tiles at a time: PK (codes under 1024), two weights per 32-bit operation (pk_halves); else
        code by code."""
        PMIN: tl.constexpr = PD if PD > 0 else (PC if PC > 0 else (PB if PB > 0 else PA))
        T: tl.constexpr = 32 // PMIN
        HA: tl.constexpr = PA // PMIN
        BK: tl.constexpr = 16 * TC
        blk = tl.program_id(0)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        wA, wB, wC, wD = load_pieces(wa, wb, wc, wd, blk, 0, PA, PB, PC, PD, PMIN, True, offs_n, n_ok, N)
        for c in tl.static_range(T // TC):
            if PK:
                zz, ss = pk_scales(blk, c, s_ptr, z_ptr, g_ptr, n_cols, n_groups, offs_n, n_ok, N, GROUP, T, TC, HA)
                lo, hi = pk_halves(wA, wB, wC, wD, c, zz, ss, BITS, PA, PB, PC, PD, PMIN, TC)
                t = c * (TC // 2) + tl.arange(0, TC // 2 // HA)[:, None] * HA + tl.arange(0, HA)[None, :]  # [SA, HA]
                k = (blk * (16 * T) + 16 * t)[:, None, None, :] + tl.arange(0, 16)[None, :, None, None]  # [SA, 16, 1, HA]
                nn = offs_n[None, None, :, None]
                m = n_ok[None, None, :, None]
                k_lo = tl.load(rows_ptr + k, mask=k < n_cols, other=0)
                k_hi = tl.load(rows_ptr + k + 8 * T, mask=k + 8 * T < n_cols, other=0)
                tl.store(out_ptr + k_lo * N + nn, lo, mask=m & (k < n_cols))
                tl.store(out_ptr + k_hi * N + nn, hi, mask=m & (k + 8 * T < n_cols))
            else:
                k0 = blk * (16 * T) + c * BK
                k = k0 + tl.arange(0, BK)
                k_ok = k < n_cols
                code = _chunk_codes(wA, wB, wC, wD, c, BITS, PA, PB, PC, PD, PMIN, TC)
                w = _chunk_w(code, k0, k, k_ok, s_ptr, z_ptr, g_ptr, n_groups, offs_n, n_ok, N, GROUP, BK)
                dest = tl.load(rows_ptr + k, mask=k_ok, other=0)
                tl.store(out_ptr + dest[:, None] * N + offs_n[None, :], w, mask=k_ok[:, None] & n_ok[None, :])
