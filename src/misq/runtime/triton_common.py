"""The Triton side every kernel of the packed runtime shares (:mod:`misq.runtime.tile_kernel`,
:mod:`misq.runtime.mma_kernel`, :mod:`misq.runtime.dequant_kernel`): whether Triton is there,
reading a layout block's code words, and making the decoder's fp16 weights two per 32-bit
operation. Shapes follow :mod:`misq.runtime.layout`: per piece of a width, int32 words
[n_blocks * 16 H, N] (H = the piece's bits // the width's smallest piece's), scales fp16
[n_groups, N], zeros uint8 [n_groups, N], gidx int32 [n_cols]; BLOCK_N features a program.

* ``HAVE_TRITON``: False on CPU-only installs, where no kernel is defined and the runtime
  dequantizes layer by layer instead (so ``import misq.runtime`` needs no Triton). Triton's CPU
  interpreter (``TRITON_INTERPRET=1``) has no inline PTX: plain fp16 operations stand in for
  ``_f16x2_sub_mul``'s.
* ``load_pieces``: every kernel loads a block's code pieces through it (int32 [16, BLOCK_N] word
  rows of one tile run, or all of a block's rows, [16, BLOCK_N, H]). A width has one to four pieces
  (layout.pieces: PA >= PB >= PC >= PD bits, 0 for a piece it does not have); pointers for absent
  pieces get a dummy tensor (kernels.pieces_args) and the constexpr piece widths prune their code.
* ``pk_halves`` / ``pk_scales``: the weights ``(code - zero) * scale`` of a chunk of up to 8
  tiles, bit for bit, two per 32-bit operation: a column and the one 16 T/2 columns on sit 16 bits
  apart in the same words, so one funnel shift and one mask per piece, OR 0x6400 makes fp16
  1024 + code, then one ``sub.f16x2`` of 1024 + zero and one ``mul.f16x2`` by the scale (codes
  under 1024: widths of at most 10 bits, launch_plan.mma_ok). The tensor-core and dequantize kernels
  use them.
* ``MAGIC``: float32 bits of 2**23, for the exponent trick (``code | MAGIC`` is 2**23 + code as a
  float32) the per-tile and dequantize kernels turn codes into float32 with.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the runtime dequantizes layer by layer instead
    HAVE_TRITON = False

# Triton's CPU interpreter (TRITON_INTERPRET=1) has no inline PTX: plain fp16 ops stand in
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAVE_TRITON:
    MAGIC = tl.constexpr(0x4B000000)  # float32 bits of 2**23: (MAGIC | v) is 2**23 + v for v < 2**23

    @triton.jit
    def _rows16(ptr, row0, offs_n, n_ok, N):
        """int32 [16, BLOCK_N]: word rows row0 .. row0 + 15."""
        rows = row0 + tl.arange(0, 16)
        return tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)

    @triton.jit
    def _piece_rows(ptr, blk, h, H: tl.constexpr, WHOLE: tl.constexpr, offs_n, n_ok, N):
        """Word rows of one piece (H = its p // p_min) of layout block blk: int32 [16, BLOCK_N],
        the 16 rows (blk * H + h % H) * 16 + r that hold tile run h; or, WHOLE, all 16 H rows of
        the block, [16, BLOCK_N, H] (assembled from [16, BLOCK_N] loads, so that H stays within
        each thread's registers)."""
        if WHOLE:
            r0 = blk * (16 * H)
            w0 = _rows16(ptr, r0, offs_n, n_ok, N)
            if H == 1:
                w = w0[:, :, None]
            else:
                w1 = _rows16(ptr, r0 + 16, offs_n, n_ok, N)
                if H == 2:
                    w = tl.join(w0, w1)
                else:
                    w23 = tl.join(_rows16(ptr, r0 + 32, offs_n, n_ok, N), _rows16(ptr, r0 + 48, offs_n, n_ok, N))
                    w4 = tl.join(tl.join(w0, w1), w23)  # [16, BN, 2, 2]: row group 2 j0 + j1 at [..., j1, j0]
                    if H == 4:
                        w = tl.reshape(tl.permute(w4, (0, 1, 3, 2)), (16, w0.shape[1], 4))
                    else:
                        w67 = tl.join(_rows16(ptr, r0 + 96, offs_n, n_ok, N), _rows16(ptr, r0 + 112, offs_n, n_ok, N))
                        w8 = tl.join(w4, tl.join(tl.join(_rows16(ptr, r0 + 64, offs_n, n_ok, N),
                                                         _rows16(ptr, r0 + 80, offs_n, n_ok, N)), w67))
                        w = tl.reshape(tl.permute(w8, (0, 1, 4, 3, 2)), (16, w0.shape[1], 8))
        else:
            w = _rows16(ptr, (blk * H + h % H) * 16, offs_n, n_ok, N)
        return w

    @triton.jit
    def load_pieces(wa, wb, wc, wd, blk, h, PA: tl.constexpr, PB: tl.constexpr, PC: tl.constexpr,
                     PD: tl.constexpr, PMIN: tl.constexpr, WHOLE: tl.constexpr, offs_n, n_ok, N):
        """Every piece's word rows of block blk (see _piece_rows): (wA, wB, wC, wD); the pieces a
        width does not have repeat wA and are never read."""
        wA = _piece_rows(wa, blk, h, PA // PMIN, WHOLE, offs_n, n_ok, N)
        wB = wA
        wC = wA
        wD = wA
        if PB > 0:
            wB = _piece_rows(wb, blk, h, PB // PMIN, WHOLE, offs_n, n_ok, N)
        if PC > 0:
            wC = _piece_rows(wc, blk, h, PC // PMIN, WHOLE, offs_n, n_ok, N)
        if PD > 0:
            wD = _piece_rows(wd, blk, h, PD // PMIN, WHOLE, offs_n, n_ok, N)
        return wA, wB, wC, wD

    if _INTERPRET:

        @triton.jit
        def _f16x2_sub_mul(t, zz, ss):
            """(low, high) fp16 halves of (t - zz) * ss, t, zz, ss each two fp16 in an int32."""
            a_lo = (t & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            a_hi = ((t >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            z_lo = (zz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            z_hi = ((zz >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            s_lo = (ss & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            s_hi = ((ss >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            return (a_lo - z_lo) * s_lo, (a_hi - z_hi) * s_hi
    else:

        @triton.jit
        def _f16x2_sub_mul(t, zz, ss):
            """(low, high) fp16 halves of (t - zz) * ss, t, zz, ss each two fp16 in an int32: one
            sub.f16x2 and one mul.f16x2 (round to nearest, no contraction) per pair."""
            return tl.inline_asm_elementwise(
                "{ .reg .b32 u; sub.rn.f16x2 u, $2, $3; mul.rn.f16x2 u, u, $4; mov.b32 {$0, $1}, u; }",
                "=h,=h,r,r,r", [t, zz, ss], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)

    @triton.jit
    def _pk_piece(w, c, P: tl.constexpr, PMIN: tl.constexpr, HA: tl.constexpr, BITS: tl.constexpr,
                  TC: tl.constexpr):
        """One piece's bits of chunk c's code pairs, in place, from all the piece's word rows of the
        block (w [16, BLOCK_N, H]): int32 [TC/2 / HA, 16, BLOCK_N, HA] (HA: piece A's H), element
        (s, r, n, h) for tile t = c TC/2 + s HA + h: in its low and high 16 bits, the codes of
        column 16 t + r and of column 16 (t + T/2) + r (slot t // H and slot t // H + 16 / P of
        word row t % H: 16 bits apart), rotated (one funnel shift) into place; other bits are
        left for the caller's mask."""
        H: tl.constexpr = P // PMIN
        TH: tl.constexpr = TC // 2
        SA: tl.constexpr = TH // HA
        POS: tl.constexpr = BITS & (P - 1)  # the piece's bit position in the code
        wu = w.to(tl.uint32, bitcast=True)
        if H < HA:  # word row t % H = h % H: repeat the H rows HA / H times
            wu = tl.reshape(tl.broadcast_to(wu[:, :, None, :], (16, w.shape[1], HA // H, H)), (16, w.shape[1], HA))
        t = c * TH + tl.arange(0, SA)[:, None] * HA + tl.arange(0, HA)[None, :]  # [SA, HA]
        k = ((t // H) * P - POS) & 31  # rotate right by k
        wu = wu[None, :, :, :]
        v = (wu >> k[:, None, None, :]) | (wu << ((32 - k) & 31)[:, None, None, :])  # [SA, 16, BN, HA]
        return v.to(tl.int32, bitcast=True)

    @triton.jit
    def pk_halves(wA, wB, wC, wD, c, zz, ss, BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr,
                   PC: tl.constexpr, PD: tl.constexpr, PMIN: tl.constexpr, TC: tl.constexpr):
        """(lo, hi) fp16 [TC/2 / HA, 16, BLOCK_N, HA]: the decoder's weights (code - zero) * scale
        of chunk c, bit for bit, at _pk_piece's element order (lo: column 16 t + r, hi: 16 T/2
        columns on), two per 32-bit operation: codes ORed into 0x6400 are fp16 1024 + code, minus
        zz (fp16 1024 + zero, twice) is exact, times ss (the scales, twice) rounds as the decoder
        does. zz, ss: int32 broadcastable to that shape (pk_scales)."""
        HA: tl.constexpr = PA // PMIN
        # (v & mask) | t per piece: one LOP3 each
        t = (_pk_piece(wA, c, PA, PMIN, HA, BITS, TC) & ((((1 << PA) - 1) << (BITS & (PA - 1))) * 0x10001)) | 0x64006400
        if PB > 0:
            t = t | (_pk_piece(wB, c, PB, PMIN, HA, BITS, TC) & ((((1 << PB) - 1) << (BITS & (PB - 1))) * 0x10001))
        if PC > 0:
            t = t | (_pk_piece(wC, c, PC, PMIN, HA, BITS, TC) & ((((1 << PC) - 1) << (BITS & (PC - 1))) * 0x10001))
        if PD > 0:
            t = t | (_pk_piece(wD, c, PD, PMIN, HA, BITS, TC) & ((((1 << PD) - 1) << (BITS & (PD - 1))) * 0x10001))
        return _f16x2_sub_mul(t, tl.broadcast_to(zz, t.shape), tl.broadcast_to(ss, t.shape))

    @triton.jit
    def pk_scales(blk, c, s_ptr, z_ptr, g_ptr, n_cols, n_groups, offs_n, n_ok, N,
                   GROUP: tl.constexpr, T: tl.constexpr, TC: tl.constexpr, HA: tl.constexpr):
        """(zz, ss) for chunk c of block blk: int32 pairs (low: column 16 t + r, high: its partner
        16 T/2 columns on) of fp16 1024 + zero and of the scale, indexed as _pk_piece's result
        [TC/2 / HA, 16, BN, HA]: [1, 1, BN, 1] when each half of the chunk lies in one group,
        [., 1, BN, HA] for groups of whole tiles, else [., 16, BN, HA] (each column's group read
        from gidx)."""
        TH: tl.constexpr = TC // 2
        B: tl.constexpr = 16 * T
        nn = offs_n[None, None, :, None]
        if GROUP > 0 and GROUP % (16 * TH) == 0:  # each half of the chunk lies in one group
            col = blk * B + 16 * c * TH
            g_lo = col // GROUP
            g_hi = (col + 8 * T) // GROUP
            m_lo = (n_ok & (g_lo < n_groups))[None, None, :, None]
            m_hi = (n_ok & (g_hi < n_groups))[None, None, :, None]
            p_lo = g_lo * N + nn
            p_hi = g_hi * N + nn
        else:
            t = c * TH + tl.arange(0, TH // HA)[:, None] * HA + tl.arange(0, HA)[None, :]  # [SA, HA]
            col = (blk * B + 16 * t)[:, None, None, :]  # [SA, 1, 1, HA]
            if GROUP > 0 and GROUP % 16 == 0:
                g_lo = col // GROUP
                g_hi = (col + 8 * T) // GROUP
            else:
                col = col + tl.arange(0, 16)[None, :, None, None]  # [SA, 16, 1, HA]
                g_lo = tl.load(g_ptr + col, mask=col < n_cols, other=0)
                g_hi = tl.load(g_ptr + col + 8 * T, mask=col + 8 * T < n_cols, other=0)
            nm = n_ok[None, None, :, None]
            m_lo = (g_lo < n_groups) & (col < n_cols) & nm
            m_hi = (g_hi < n_groups) & (col + 8 * T < n_cols) & nm
            p_lo = g_lo * N + nn
            p_hi = g_hi * N + nn
        z_lo = tl.load(z_ptr + p_lo, mask=m_lo, other=0).to(tl.int32) | 0x6400
        s_lo = tl.load(s_ptr + p_lo, mask=m_lo, other=0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        if GROUP > 0 and GROUP % B == 0:  # one group for the whole block
            zz = z_lo * 0x10001
            ss = s_lo * 0x10001
        else:
            z_hi = tl.load(z_ptr + p_hi, mask=m_hi, other=0).to(tl.int32) | 0x6400
            s_hi = tl.load(s_ptr + p_hi, mask=m_hi, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
            zz = z_lo | (z_hi << 16)
            ss = s_lo | (s_hi << 16)
        return zz, ss

    @triton.jit
    def store_output(y, om, mo, offs_n, n_ok, N, pid_n, out_ptr, stride_om, GLU: tl.constexpr):
        """Store the finished y [rows, BN] (fp32, bias added) as fp16: features ``offs_n`` (BN from
        pid_n * BN) of output rows ``om`` (valid: ``mo``). GLU: the N features are a gate/up pair
        each (gate 2i, up 2i + 1: misq.runtime.merge.merge_gated), and the output is SiLU(gate) * up
        [rows, N / 2], features pid_n * BN / 2 on; from the float32 sums, so it differs from SiLU
        and the product of the fp16-rounded gate and up by their rounding."""
        if GLU:
            H: tl.constexpr = y.shape[1] // 2
            gate, up = tl.split(tl.reshape(y, (y.shape[0], H, 2)))
            oc = pid_n * H + tl.arange(0, H)
            tl.store(out_ptr + om[:, None] * stride_om + oc[None, :],
                     (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mo[:, None] & (oc < N // 2)[None, :])
        else:
            tl.store(out_ptr + om[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=mo[:, None] & n_ok[None, :])

    @triton.jit
    def write_out(y, om, mo, offs_n, n_ok, N, pid_n, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr,
                  HAS_BIAS: tl.constexpr, MODE: tl.constexpr, GLU: tl.constexpr = False):
        """Store y [rows, BN] (fp32) for output rows ``om`` (valid: ``mo``) and features ``offs_n``.

        MODE 0: y (+ bias) is the output. MODE 1/2 (split-K): y is added into the fp32 workspace
        [M, N]; in MODE 2 the last program of column block ``pid_n`` reads the sums back (leaving
        zeros for the next call), adds the bias and writes the output, so no second launch is needed.
        GLU: the output is SiLU(gate) * up of the feature pairs (store_output).
        """
        msk = mo[:, None] & n_ok[None, :]
        if MODE == 0:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            store_output(y, om, mo, offs_n, n_ok, N, pid_n, out_ptr, stride_om, GLU)
        else:
            wsp = ws_ptr + om[:, None] * N + offs_n[None, :]
            tl.atomic_add(wsp, y, mask=msk, sem="relaxed")
            if MODE == 2:
                tl.debug_barrier()
                done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
                if done == tl.num_programs(1) - 1:
                    # read the sums and leave zeros: relaxed, as the counter's acquire above (one thread,
                    # then the barrier) already orders every program's adds before these reads; an
                    # acq_rel exchange put a GPU-wide fence before each of a thread's exchanges
                    bits = tl.atomic_xchg(wsp.to(tl.pointer_type(tl.int32)), tl.zeros(y.shape, tl.int32), mask=msk,
                                          sem="relaxed")
                    tot = bits.to(tl.float32, bitcast=True)
                    if HAS_BIAS:
                        tot += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    store_output(tot, om, mo, offs_n, n_ok, N, pid_n, out_ptr, stride_om, GLU)
                    tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")  # the kernel's end orders it for the next call

    @triton.jit
    def exact_w(code, g, k_ok, s_ptr, z_ptr, offs_n, n_ok, N):
        """fp16 [n, BLOCK_N]: (code - zero) * scale in float32, rounded to fp16 (the decoder's
        weight, bit for bit), for columns k (valid: ``k_ok`` [n]) of groups ``g`` [n]."""
        m = k_ok[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0).to(tl.int32)
        zm = (z | MAGIC).to(tl.float32, bitcast=True)
        return (((code | MAGIC).to(tl.float32, bitcast=True) - zm) * s).to(tl.float16)
