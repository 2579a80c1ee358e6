"""``_decode_h2``: the batch-1 decode kernel for 3- and 4-bit segments on the CUDA cores' packed
fp16 pipes, two weights an instruction, for :func:`misq.runtime.decode_plan.decode_matmul`'s ``h2`` path.

Why: the float32 kernel (tile_kernel, ``fma``) issues about 5.3 instructions a weight and is
bound by instruction issue on an H200 (ncu, BENCHMARKS.md session 9), far from the memory floor.

4 bits: two 32-bit words of eight codes each (layout.py: the code of tile t of word row r at bits
4 t; rows r and r + 8 of a block, same output features) cost about 30 instructions:

* ``(w & 0x000F000F) | 0x64006400`` is the fp16 pair (1024 + c0, 1024 + c4); with the mask
  0x00F000F0 it is (1024 + 16 c1, 1024 + 16 c5); the same on ``w >> 8`` for tiles 2, 6, 3, 7.
  One LOP3 per pair of codes.
* plus the pair -(1024 + z), or times 1/16 plus -(64 + z): exactly ``c - z`` (small integers
  are exact in fp16). One HADD2 / HFMA2 per pair.
* times x's pair and summed, eight pairs over the two words, in fp16 (HMUL2 + 7 HFMA2); then the
  two halves are converted and added in float32, and that sum times the group's scale is added
  to the float32 accumulator.

3 bits (a 2-bit and a 1-bit piece, blocks of 512 columns): per word row, the 2-bit words of tile
runs h = 0, 1 and the 1-bit word, shifted once per half block so that both pieces of a code pair
land at mantissa bits q .. q + 2 (q = 0, 2, 4, 6): two LOP3 a pair, then one HFMA2 (times 2**-q,
plus -(2**(10 - q) + z)) for ``c - z`` and one for the product. Tiles t and t + 16 pair up; their
groups differ, so each half keeps its own scale.

sm_90 SASS of the loop (benchmarks/kernel_sass.py): at the defaults 2.70 instructions a weight at
4 bits (BLOCK_N 64, 2 warps) and 3.58 at 3 bits (4 warps), against 5.3 for the float32 kernel.
On an H200 (ncu, BENCHMARKS.md session 23) the 4-bit loop waits on its global loads for about half
of its cycles, with 4-5 warps a scheduler and its occupancy bounded by registers. So fewer
instructions help only where they shorten that wait: the block's group found without a division
was 5-9% faster (session 22), but 6% fewer instructions through a twice longer fp16 chain were
not. Software pipelining through shared memory (session 22) and asking L2 for the next block's
lines (session 23) were slower; more programs an SM at once were faster on the large layers
(launch_plan.default_config caps their registers).
Each product ``(c - z) * x`` and each eight-term sum is rounded to fp16 (relative 2**-11 each,
random in sign), where the float32 kernel is exact until its output: the outputs stay within the
fp16 tolerance the tests hold every path to (tests/test_runtime_gpu.py). To keep those sums
finite, each layout block's x is scaled by a power of two so that |x| < 256 (the block's 2**k
goes back in with the scale; k = 0 unless some |x| >= 256), which bounds an eight-term sum by
8 * 15 * 256 < 65504.

x comes in as fp16 pairs, each layout block scaled by a power of two (:mod:`misq.runtime.half2_gather`):
gathered first by one small launch for all of the layer's h2 segments, or (FUSED) by each program
for its own blocks, one launch fewer for 6-18% more instructions (on an H200 2-10% faster on
5120 x 5120 layers and 4-8% slower on the MLP shapes, so the runtime's default gathers first;
BENCHMARKS.md, session 11). Scale groups must be multiples of 128 columns, or one group for the
segment (launch_plan.h2_ok).

A mixed 3/4-bit layer runs both widths in one launch (NSEG 2): its split-K programs are divided
between the segments, each program compiled for both widths and taking one, and the split-K
workspace's last program adds them all. Two launches, each with its partial last wave and its own
gather, cost more (BENCHMARKS.md, session 12).

Each block is two steps: what it reads from memory (``_words4``, ``_words3``: words, scales and
zeros) and its math (``_math4``, ``_math3``: x's pairs, mostly from L2, and the products). Split so,
the sm_90 loop is 369 instead of 381 instructions a block at 4 bits and 78 instead of 93 registers;
on an H200, with weights from memory, 4-bit layers ran 1.07-1.10x and 3-bit 5120 x 5120 1.21x
faster, and a 13B-shaped model decoded 3-6% faster (BENCHMARKS.md, session 19). Under PDL a
program issues its first block's reads before it waits for x's gather, which they do not depend
on: 1.12-1.17x faster on mixed 3/4 layers, up to 1.07x on uniform ones. Reading every block
during the one before (two blocks in flight, 123 registers) was 3-27% slower and is not kept
(its diff: benchmarks/results/session19/scripts/). Nor is it with scales and zeros in the words'
layout, which kept two blocks in flight at 88 registers without spills: every grid tried was
slower than the default's best, by 2-7% on each 13B 4-bit shape (BENCHMARKS.md, session 26;
the code is in git history at 46c38db).

Under Triton's CPU interpreter (no inline PTX) ``_words_dot`` and ``_pairs3_dot`` run the same
steps as plain fp16 operations (a multiply and an add, two roundings, where the PTX fuses them).
"""

from __future__ import annotations

from misq.runtime.half2_ptx import pairs3_dot_ptx, words4_dot_ptx
from misq.runtime.triton_common import _INTERPRET, HAVE_TRITON

GROUP_COLS = 128  # scale groups must be multiples of this (the 3-bit kernel's runs of 8 tiles)


if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_wait

    from misq.runtime.half2_gather import _coop_pairs3, _coop_pairs4, _xpair
    from misq.runtime.triton_common import write_out

    PTX_WORDS4 = tl.constexpr(words4_dot_ptx())
    PTX_PAIRS3 = tl.constexpr(pairs3_dot_ptx())

    if _INTERPRET:

        @triton.jit
        def _halves(u):
            """int32 -> (low, high) fp16 halves."""
            lo = (u & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            hi = ((u >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            return lo, hi

        @triton.jit
        def _word_sum(h_lo, h_hi, w, x0, x1, x2, x3, za, zb):
            """The fp16 running sums (low, high) plus one word's four products each (PTX below)."""
            w8 = w >> 8
            a_lo, a_hi = _halves((w & 0x000F000F) | 0x64006400)
            b_lo, b_hi = _halves((w & 0x00F000F0) | 0x64006400)
            c_lo, c_hi = _halves((w8 & 0x000F000F) | 0x64006400)
            d_lo, d_hi = _halves((w8 & 0x00F000F0) | 0x64006400)
            za_lo, za_hi = _halves(za)
            zb_lo, zb_hi = _halves(zb)
            x0_lo, x0_hi = _halves(x0)
            x1_lo, x1_hi = _halves(x1)
            x2_lo, x2_hi = _halves(x2)
            x3_lo, x3_hi = _halves(x3)
            sixteenth = 0.0625
            h_lo = h_lo + (a_lo + za_lo) * x0_lo
            h_hi = h_hi + (a_hi + za_hi) * x0_hi
            h_lo = h_lo + (b_lo * sixteenth + zb_lo) * x1_lo
            h_hi = h_hi + (b_hi * sixteenth + zb_hi) * x1_hi
            h_lo = h_lo + (c_lo + za_lo) * x2_lo
            h_hi = h_hi + (c_hi + za_hi) * x2_hi
            h_lo = h_lo + (d_lo * sixteenth + zb_lo) * x3_lo
            h_hi = h_hi + (d_hi * sixteenth + zb_hi) * x3_hi
            return h_lo, h_hi

        @triton.jit
        def _words_dot(v, u, x0, x1, x2, x3, y0, y1, y2, y3, za, zb):
            """float32: sum over two words' 16 codes of (c - z) * x, as the PTX below computes it."""
            zero = tl.zeros(v.shape, tl.float16)
            h_lo, h_hi = _word_sum(zero, zero, v, x0, x1, x2, x3, za, zb)
            h_lo, h_hi = _word_sum(h_lo, h_hi, u, y0, y1, y2, y3, za, zb)
            return h_lo.to(tl.float32) + h_hi.to(tl.float32)

        @triton.jit
        def _pairs3_dot(a0, a1, b0, b1, p0, p1, p2, p3, p4, p5, p6, p7, z0, z2, z4, z6):
            """(low, high) float32: eight 3-bit code pairs' sum of (c - z) * x (PTX below)."""
            h_lo = tl.zeros(a0.shape, tl.float16)
            h_hi = tl.zeros(a0.shape, tl.float16)
            for hh in tl.static_range(2):
                a = a0 if hh == 0 else a1
                b = b0 if hh == 0 else b1
                for sp in tl.static_range(4):
                    v = (a & ((6 << (2 * sp)) * 0x10001)) | (b & ((1 << (2 * sp)) * 0x10001)) | 0x64006400
                    v_lo, v_hi = _halves(v)
                    zq = z0 if sp == 0 else (z2 if sp == 1 else (z4 if sp == 2 else z6))
                    z_lo, z_hi = _halves(zq)
                    p = (p0 if sp == 0 else (p1 if sp == 1 else (p2 if sp == 2 else p3))) if hh == 0 else \
                        (p4 if sp == 0 else (p5 if sp == 1 else (p6 if sp == 2 else p7)))
                    x_lo, x_hi = _halves(p)
                    m = 1.0 / (1 << (2 * sp))
                    h_lo = h_lo + (v_lo * m + z_lo) * x_lo
                    h_hi = h_hi + (v_hi * m + z_hi) * x_hi
            return h_lo.to(tl.float32), h_hi.to(tl.float32)
    else:

        @triton.jit
        def _words_dot(v, u, x0, x1, x2, x3, y0, y1, y2, y3, za, zb):
            """float32: sum over two words' 16 codes of (c - z) * x (module docstring): v and u the
            words, x0..x3 and y0..y3 x's fp16 pairs for each, za = -(1024 + z) and zb = -(64 + z)
            as fp16 pairs, all int32."""
            return tl.inline_asm_elementwise(PTX_WORDS4, "=r" + ",r" * 12, [v, u, x0, x1, x2, x3, y0, y1, y2, y3, za, zb],
                                             dtype=tl.float32, is_pure=True, pack=1)

        @triton.jit
        def _pairs3_dot(a0, a1, b0, b1, p0, p1, p2, p3, p4, p5, p6, p7, z0, z2, z4, z6):
            """(low, high) float32: the sums over eight 3-bit code pairs of (c - z) * x, each half
            in fp16 (module docstring). a0, a1: the 2-bit words of tile runs h = 0, 1 and b0, b1
            the 1-bit words, shifted so that slot s' of the run holds the code at bits 2 s' .. 2 s'
            + 2 of each half; p0..p7 x's pairs (h, s'); z0..z6 the pairs -(2**(10 - q) + z), q =
            2 s'."""
            return tl.inline_asm_elementwise(PTX_PAIRS3, "=r,=r" + ",r" * 16,
                                             [a0, a1, b0, b1, p0, p1, p2, p3, p4, p5, p6, p7, z0, z2, z4, z6],
                                             dtype=(tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def _zero_pair(z_lo, z_hi, Q: tl.constexpr):
        """int32 [BN]: the fp16 pair -(2**(10 - Q) + z) of two groups' zeros (int32 [BN] each)."""
        top: tl.constexpr = 0x8000 | ((25 - Q) << 10)  # sign and exponent of 2**(10 - Q); z lands at bit Q
        return ((z_lo << Q) | top) | (((z_hi << Q) | top) << 16)

    @triton.jit
    def _words4(blk, wa, s_ptr, z_ptr, units, offs_n, n_ok, N):
        """What a 4-bit layout block reads from memory: its words v (word rows r) and u (rows
        r + 8), int32 [8, BN], and its group's scales and zeros [BN] (groups of ``units`` blocks)."""
        r = tl.arange(0, 8)
        wp = wa + (blk * 16 + r)[:, None] * N + offs_n[None, :]
        v = tl.load(wp, mask=n_ok[None, :], other=0)
        u = tl.load(wp + 8 * N, mask=n_ok[None, :], other=0)
        g = blk // units
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0)
        return v, u, s, z

    @triton.jit
    def _math4(acc, blk, v, u, s, z, xp_ptr, xs_ptr, x_ptr, q_ptr, n_cols, FUSED: tl.constexpr,
               LIMIT_LOG2: tl.constexpr):
        """acc [8, BN] += one 4-bit layout block from its _words4: word rows r and r + 8, summed
        together in fp16."""
        r = tl.arange(0, 8)
        if FUSED:
            x0, x1, x2, x3, y0, y1, y2, y3, xsc = _coop_pairs4(x_ptr, q_ptr, blk, n_cols, LIMIT_LOG2)
        else:
            x0 = _xpair(xp_ptr, blk, r, 8, 0)
            x1 = _xpair(xp_ptr, blk, r, 8, 1)
            x2 = _xpair(xp_ptr, blk, r, 8, 2)
            x3 = _xpair(xp_ptr, blk, r, 8, 3)
            y0 = _xpair(xp_ptr, blk, r + 8, 8, 0)
            y1 = _xpair(xp_ptr, blk, r + 8, 8, 1)
            y2 = _xpair(xp_ptr, blk, r + 8, 8, 2)
            y3 = _xpair(xp_ptr, blk, r + 8, 8, 3)
            xsc = tl.load(xs_ptr + blk)
        zi = z.to(tl.int32)
        za = _zero_pair(zi, zi, 0)[None, :]  # fp16 -(1024 + z), twice
        zb = _zero_pair(zi, zi, 4)[None, :]  # fp16 -(64 + z), twice
        d = _words_dot(v, u, x0[:, None], x1[:, None], x2[:, None], x3[:, None], y0[:, None], y1[:, None],
                       y2[:, None], y3[:, None], za, zb)
        return acc + d * (s.to(tl.float32) * xsc)[None, :]

    @triton.jit
    def _words3(blk, wa, wb, s_ptr, z_ptr, units, n_groups, offs_n, n_ok, N):
        """What a 3-bit layout block (512 columns) reads from memory: per word row r, the 2-bit
        words of tile runs h = 0, 1 (A0, A1) and the 1-bit word (B), int32 [16, BN]; the scales
        and zeros [BN] of its four runs of 128 columns (groups of ``units`` such runs), in the order
        (half sg 0: low, high; sg 1: low, high) that _math3 pairs them."""
        r = tl.arange(0, 16)
        m = n_ok[None, :]
        pa = wa + (blk * 32 + r)[:, None] * N + offs_n[None, :]
        A0 = tl.load(pa, mask=m, other=0)
        A1 = tl.load(pa + 16 * N, mask=m, other=0)
        B = tl.load(wb + (blk * 16 + r)[:, None] * N + offs_n[None, :], mask=m, other=0)
        g0 = (blk * 4) // units  # tiles 0-7
        g1 = (blk * 4 + 2) // units  # tiles 16-23
        g2 = (blk * 4 + 1) // units  # tiles 8-15
        g3 = (blk * 4 + 3) // units  # tiles 24-31
        # a partial last block's tiles past the columns have no group
        m0, m1, m2, m3 = n_ok & (g0 < n_groups), n_ok & (g1 < n_groups), n_ok & (g2 < n_groups), n_ok & (g3 < n_groups)
        s0 = tl.load(s_ptr + g0 * N + offs_n, mask=m0, other=0.0)
        s1 = tl.load(s_ptr + g1 * N + offs_n, mask=m1, other=0.0)
        s2 = tl.load(s_ptr + g2 * N + offs_n, mask=m2, other=0.0)
        s3 = tl.load(s_ptr + g3 * N + offs_n, mask=m3, other=0.0)
        z0 = tl.load(z_ptr + g0 * N + offs_n, mask=m0, other=0)
        z1 = tl.load(z_ptr + g1 * N + offs_n, mask=m1, other=0)
        z2 = tl.load(z_ptr + g2 * N + offs_n, mask=m2, other=0)
        z3 = tl.load(z_ptr + g3 * N + offs_n, mask=m3, other=0)
        return A0, A1, B, s0, s1, s2, s3, z0, z1, z2, z3

    @triton.jit
    def _half3(acc, a0, a1, b0, b1, p0, p1, p2, p3, p4, p5, p6, p7, s_lo, s_hi, z_lo, z_hi, xsc):
        """acc [16, BN] += one half of a 3-bit block: tiles paired low/high, their groups' scales
        and zeros s_lo, z_lo (low tiles) and s_hi, z_hi (high), [BN] each as loaded."""
        zl, zh = z_lo.to(tl.int32), z_hi.to(tl.int32)
        lo, hi = _pairs3_dot(a0, a1, b0, b1, p0[:, None], p1[:, None], p2[:, None], p3[:, None], p4[:, None],
                             p5[:, None], p6[:, None], p7[:, None], _zero_pair(zl, zh, 0)[None, :],
                             _zero_pair(zl, zh, 2)[None, :], _zero_pair(zl, zh, 4)[None, :],
                             _zero_pair(zl, zh, 6)[None, :])
        return acc + lo * (s_lo.to(tl.float32) * xsc)[None, :] + hi * (s_hi.to(tl.float32) * xsc)[None, :]

    @triton.jit
    def _math3(acc, blk, A0, A1, B, s0, s1, s2, s3, z0, z1, z2, z3, xp_ptr, xs_ptr, x_ptr, q_ptr, n_cols,
               FUSED: tl.constexpr, LIMIT_LOG2: tl.constexpr):
        """acc [16, BN] += one 3-bit layout block from its _words3: tiles 0-15 pair with 16-31, in
        two halves sg (tiles 8 sg .. 8 sg + 7 and 16 more) whose groups may differ."""
        r = tl.arange(0, 16)
        if FUSED:
            p00, p01, p02, p03, p04, p05, p06, p07, p10, p11, p12, p13, p14, p15, p16, p17, xsc = _coop_pairs3(
                x_ptr, q_ptr, blk, n_cols, LIMIT_LOG2)
        else:
            p00 = _xpair(xp_ptr, blk, r, 32, 0)
            p01 = _xpair(xp_ptr, blk, r, 32, 1)
            p02 = _xpair(xp_ptr, blk, r, 32, 2)
            p03 = _xpair(xp_ptr, blk, r, 32, 3)
            p04 = _xpair(xp_ptr, blk, r, 32, 4)
            p05 = _xpair(xp_ptr, blk, r, 32, 5)
            p06 = _xpair(xp_ptr, blk, r, 32, 6)
            p07 = _xpair(xp_ptr, blk, r, 32, 7)
            p10 = _xpair(xp_ptr, blk, r, 32, 8)
            p11 = _xpair(xp_ptr, blk, r, 32, 9)
            p12 = _xpair(xp_ptr, blk, r, 32, 10)
            p13 = _xpair(xp_ptr, blk, r, 32, 11)
            p14 = _xpair(xp_ptr, blk, r, 32, 12)
            p15 = _xpair(xp_ptr, blk, r, 32, 13)
            p16 = _xpair(xp_ptr, blk, r, 32, 14)
            p17 = _xpair(xp_ptr, blk, r, 32, 15)
            xsc = tl.load(xs_ptr + blk)
        # half 0: slot s = s' at 2 s' (+ 1 for the 2-bit piece); half 1: slot s = 4 + s'
        acc = _half3(acc, A0 << 1, A1 << 1, B, B >> 1, p00, p01, p02, p03, p04, p05, p06, p07, s0, s1, z0, z1, xsc)
        return _half3(acc, A0 >> 7, A1 >> 7, B >> 8, B >> 9, p10, p11, p12, p13, p14, p15, p16, p17, s2, s3, z2, z3,
                      xsc)

    @triton.jit
    def _segment_sum(pid_s, xp_ptr, xs_ptr, x_ptr, q_ptr, wa, wb, s_ptr, z_ptr, N, n_cols, n_blocks, units,
                     n_groups, blocks_per_split, offs_n, n_ok, BITS: tl.constexpr, BN: tl.constexpr,
                     FUSED: tl.constexpr, LIMIT_LOG2: tl.constexpr, PDL: tl.constexpr):
        """float32 [1, BN]: split-K run pid_s (blocks_per_split layout blocks) of one 3- or 4-bit
        segment's x @ W^T for features offs_n. acc [rows, BN] holds scaled sums per word row,
        added once at the end. PDL: wait for x's gather (the primary launch) before the first
        block's math, after its loads."""
        acc = tl.zeros((8 if BITS == 4 else 16, BN), dtype=tl.float32)
        b_lo = pid_s * blocks_per_split
        b_hi = tl.minimum(b_lo + blocks_per_split, n_blocks)
        # the first block's loads issued before the wait for x's gather (the weights do not depend
        # on it); a program always has a first block (plan_launches)
        if BITS == 4:
            v, u, s, z = _words4(b_lo, wa, s_ptr, z_ptr, units, offs_n, n_ok, N)
            if PDL:
                gdc_wait()
            acc = _math4(acc, b_lo, v, u, s, z, xp_ptr, xs_ptr, x_ptr, q_ptr, n_cols, FUSED, LIMIT_LOG2)
            for blk in range(b_lo + 1, b_hi):
                v, u, s, z = _words4(blk, wa, s_ptr, z_ptr, units, offs_n, n_ok, N)
                acc = _math4(acc, blk, v, u, s, z, xp_ptr, xs_ptr, x_ptr, q_ptr, n_cols, FUSED, LIMIT_LOG2)
        else:
            A0, A1, B, s0, s1, s2, s3, z0, z1, z2, z3 = _words3(b_lo, wa, wb, s_ptr, z_ptr, units,
                                                                n_groups, offs_n, n_ok, N)
            if PDL:
                gdc_wait()
            acc = _math3(acc, b_lo, A0, A1, B, s0, s1, s2, s3, z0, z1, z2, z3, xp_ptr, xs_ptr, x_ptr, q_ptr,
                         n_cols, FUSED, LIMIT_LOG2)
            for blk in range(b_lo + 1, b_hi):
                A0, A1, B, s0, s1, s2, s3, z0, z1, z2, z3 = _words3(blk, wa, wb, s_ptr, z_ptr, units,
                                                                    n_groups, offs_n, n_ok, N)
                acc = _math3(acc, blk, A0, A1, B, s0, s1, s2, s3, z0, z1, z2, z3, xp_ptr, xs_ptr, x_ptr, q_ptr,
                             n_cols, FUSED, LIMIT_LOG2)
        return tl.sum(acc, axis=0)[None, :]

    @triton.jit
    def _decode_h2(x_ptr, out_ptr, ws_ptr, cnt_ptr, bias_ptr, N, stride_om, split1,
                   xp1, xs1, q1, wa1, wb1, s1, z1, n1, nblk1, u1, ng1, bps1,
                   xp2, xs2, q2, wa2, wb2, s2, z2, n2, nblk2, u2, ng2, bps2,
                   BITS1: tl.constexpr, BITS2: tl.constexpr, NSEG: tl.constexpr, BN: tl.constexpr,
                   MODE: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED: tl.constexpr, LIMIT_LOG2: tl.constexpr,
                   PDL: tl.constexpr = False, GLU: tl.constexpr = False):
        """y [1, N] (+)= x @ W^T over one or two 3- or 4-bit segments (a mixed-width layer's two
        widths in one launch). Per segment: x as pregathered pairs xp and block scales xs
        (half2_gather._gather_pairs), or (FUSED) gathered here, each program for its own blocks,
        from x_ptr (fp16, one row) through q (the segment's perm; n columns); words wa (the 4-bit,
        or the 3-bit's 2-bit piece) and wb (the 3-bit's 1-bit piece); scales and zeros s, z of
        ng groups of u runs of 128 columns (u = 1 for groups of 128: Triton specializes an argument
        equal to 1, so finding a block's group takes no integer division, which cost about 25
        instructions a block, a group, in the loop); nblk layout blocks, bps a split. Program
        (pid_n, pid_s): BN output features; split-K run pid_s of segment 1 below split1, run
        pid_s - split1 of segment 2 from there. MODE as tile_kernel's (the split-K workspace and
        its counter span both segments' programs). PDL: launched as the x gather's programmatic
        dependent, so its programs may start before the gather is done: they wait for it
        (_segment_sum). GLU: the output is SiLU(gate) * up of N / 2 feature pairs (write_out)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        if NSEG == 2:
            if pid_s < split1:
                y = _segment_sum(pid_s, xp1, xs1, x_ptr, q1, wa1, wb1, s1, z1, N, n1, nblk1, u1, ng1, bps1,
                                 offs_n, n_ok, BITS1, BN, FUSED, LIMIT_LOG2, PDL)
            else:
                y = _segment_sum(pid_s - split1, xp2, xs2, x_ptr, q2, wa2, wb2, s2, z2, N, n2, nblk2, u2, ng2,
                                 bps2, offs_n, n_ok, BITS2, BN, FUSED, LIMIT_LOG2, PDL)
        else:
            y = _segment_sum(pid_s, xp1, xs1, x_ptr, q1, wa1, wb1, s1, z1, N, n1, nblk1, u1, ng1, bps1,
                             offs_n, n_ok, BITS1, BN, FUSED, LIMIT_LOG2, PDL)
        om = tl.arange(0, 1)
        write_out(y, om, om < 1, offs_n, n_ok, N, pid_n, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr, HAS_BIAS, MODE,
                  GLU)
