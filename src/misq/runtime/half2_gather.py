"""x for the fp16 pairs kernel (:mod:`misq.runtime.half2_kernel`): gathered through the segment's
column order, scaled per layout block by a power of two so that the kernel's fp16 sums stay
finite, and paired in the kernel's order; either first, by one small launch for all of a layer's
segments (``_gather_pairs``), or by each program for its own blocks (``_coop_pairs4`` /
``_coop_pairs3``, the kernel's FUSED mode).

4 bits: element (blk, j, r) of a block's pairs is fp16 (x[16 j + r], x[16 (j + 4) + r]), j < 4.
3 bits (blocks of 512 columns): pair (sg, h, s') joins tiles t = 8 sg + 2 s' + h and t + 16, at
((2 sg + h) 4 + s') 16 + r. Each block's 2**k goes to the kernel with it (xs), to be multiplied
back in with the scale.
"""

from __future__ import annotations

from misq.runtime.triton_common import HAVE_TRITON

X_LIMIT_LOG2 = 8  # x is scaled per block below 2**8: eight products of |c - z| <= 15 stay finite in fp16

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _scale_down(x, amax, LIMIT_LOG2: tl.constexpr):
        """(int32 like x: the fp16 bits of x * 2**-k in the low half, k) for float32 x whose largest
        magnitude is amax: k >= 0 the least power of two that brings them below 2**LIMIT_LOG2."""
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 amax) (amax >= 2**-126)
        k = tl.maximum(e + 1 - LIMIT_LOG2, 0)
        down = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2**-k, exactly
        return (x * down).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF, k

    @triton.jit
    def _block_x(x_ptr, q_ptr, c, n_cols):
        """float32 x[q[c]] for a layout block's columns c (1-D; those past n_cols read as zero)."""
        ok = c < n_cols
        return tl.load(x_ptr + tl.load(q_ptr + c, mask=ok, other=0), mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _pairs_block(x_ptr, idx_ptr, xp_ptr, xs_ptr, n_cols, blk, BITS: tl.constexpr, LIMIT_LOG2: tl.constexpr):
        """Layout block blk (B = 128 columns at 4 bits, 512 at 3): xp int32 [nblk, B / 2]
        of fp16 pairs of x[idx] * 2**-k in the kernel's order (module docstring), and xs [nblk]
        float32 = 2**k, k >= 0 the least that brings the block's |x| below 2**LIMIT_LOG2.
        Columns past n_cols are zero."""
        T: tl.constexpr = 8 if BITS == 4 else 32  # tiles of 16 columns a block
        t = tl.arange(0, T)
        r = tl.arange(0, 16)
        col = blk * (16 * T) + 16 * t[:, None] + r[None, :]  # [T, 16]
        ok = col < n_cols
        idx = tl.load(idx_ptr + col, mask=ok, other=0)
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        bits, k = _scale_down(x, tl.max(tl.max(tl.abs(x), axis=1), axis=0), LIMIT_LOG2)  # [T, 16]
        out = xp_ptr + blk * (8 * T)
        if BITS == 4:  # pair j: tiles j and j + 4, at 16 j + r
            lo, hi = tl.split(tl.permute(tl.reshape(bits, (2, 4, 16)), (1, 2, 0)))  # [4, 16]
            tl.store(out + 16 * tl.arange(0, 4)[:, None] + r[None, :], lo | (hi << 16))
        else:  # pair (sg, h, s'): tiles t = 8 sg + 2 s' + h and t + 16, at ((2 sg + h) 4 + s') 16 + r
            lo, hi = tl.split(tl.permute(tl.reshape(bits, (2, 2, 4, 2, 16)), (1, 3, 2, 4, 0)))  # [sg, h, s', r]
            q = tl.arange(0, 4)
            pos = (tl.arange(0, 2)[:, None, None, None] * 2 + tl.arange(0, 2)[None, :, None, None]) * 64 \
                + 16 * q[None, None, :, None] + r[None, None, None, :]
            tl.store(out + pos, lo | (hi << 16))
        tl.store(xs_ptr + blk, ((127 + k) << 23).to(tl.float32, bitcast=True))

    @triton.jit
    def _gather_pairs(x_ptr, n_blocks1, idx1, xp1, xs1, n1, idx2, xp2, xs2, n2,
                      BITS1: tl.constexpr, BITS2: tl.constexpr, NSEG: tl.constexpr, LIMIT_LOG2: tl.constexpr,
                      PDL: tl.constexpr = False, WAIT: tl.constexpr = False):
        """x's fp16 pairs (_pairs_block) for one or two segments in one launch, one program per
        layout block: programs below n_blocks1 take segment 1's blocks (columns idx1, n1 of
        them; out xp1, xs1), the rest segment 2's. PDL: let the next kernel (the decode, launched
        as its programmatic dependent) start now; it waits for this one's writes itself. WAIT:
        launched as the programmatic dependent of the kernel before (which made x): wait for it."""
        if PDL:
            gdc_launch_dependents()
        if WAIT:
            gdc_wait()
        blk = tl.program_id(0)
        if NSEG == 2:
            if blk < n_blocks1:
                _pairs_block(x_ptr, idx1, xp1, xs1, n1, blk, BITS1, LIMIT_LOG2)
            else:
                _pairs_block(x_ptr, idx2, xp2, xs2, n2, blk - n_blocks1, BITS2, LIMIT_LOG2)
        else:
            _pairs_block(x_ptr, idx1, xp1, xs1, n1, blk, BITS1, LIMIT_LOG2)

    @triton.jit
    def _xpair(xp_ptr, blk, r, T: tl.constexpr, P: tl.constexpr):
        """int32 [R]: the pregathered fp16 pairs (_gather_pairs' order) of pair slot P for word rows
        r of block blk (T tiles a block)."""
        return tl.load(xp_ptr + blk * (8 * T) + 16 * P + r)

    @triton.jit
    def _coop_pairs4(x_ptr, q_ptr, blk, n_cols, LIMIT_LOG2: tl.constexpr):
        """The fused gather, shared by the program: block blk's 128 x values loaded once (a few a
        thread), scaled below 2**LIMIT_LOG2, paired and split into the eight [8] pair vectors of
        _block4 (x0..x3: rows r, y0..y3: rows r + 8); plus the block's 2**k."""
        xv = _block_x(x_ptr, q_ptr, blk * 128 + tl.arange(0, 128), n_cols)
        b, k = _scale_down(xv, tl.max(tl.abs(xv), axis=0), LIMIT_LOG2)
        # column 16 t + r = 64 half + 32 j1 + 16 j0 + 8 rh + r': pair j = 2 j1 + j0 joins tiles j, j + 4
        b = tl.permute(tl.reshape(b, (2, 2, 2, 2, 8)), (4, 1, 2, 3, 0))  # (r', j1, j0, rh, half)
        lo, hi = tl.split(b)
        pv, pu = tl.split(lo | (hi << 16))  # rows r' and r' + 8: (r', j1, j0)
        a0, a1 = tl.split(pv)
        x0, x2 = tl.split(a0)
        x1, x3 = tl.split(a1)
        a0, a1 = tl.split(pu)
        y0, y2 = tl.split(a0)
        y1, y3 = tl.split(a1)
        return x0, x1, x2, x3, y0, y1, y2, y3, ((127 + k) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _split4(p):
        """[16, 2, 2] (r, s1, s0) -> its four [16] vectors, s' = 2 s1 + s0 = 0, 1, 2, 3."""
        a0, a1 = tl.split(p)
        q0, q2 = tl.split(a0)
        q1, q3 = tl.split(a1)
        return q0, q1, q2, q3

    @triton.jit
    def _coop_pairs3(x_ptr, q_ptr, blk, n_cols, LIMIT_LOG2: tl.constexpr):
        """As _coop_pairs4 for a 3-bit block (512 columns): the sixteen [16] pair vectors of
        _block3, slot (sg, h, s') at index (2 sg + h) 4 + s', and the block's 2**k."""
        xv = _block_x(x_ptr, q_ptr, blk * 512 + tl.arange(0, 512), n_cols)
        b, k = _scale_down(xv, tl.max(tl.abs(xv), axis=0), LIMIT_LOG2)
        # column 16 t + r = 256 half + 128 sg + 64 s1 + 32 s0 + 16 h + r: tile t = 16 half + 8 sg + 2 s' + h
        b = tl.permute(tl.reshape(b, (2, 2, 2, 2, 2, 16)), (5, 1, 4, 2, 3, 0))  # (r, sg, h, s1, s0, half)
        lo, hi = tl.split(b)
        p0, p1 = tl.split(tl.permute(lo | (hi << 16), (0, 2, 3, 4, 1)))  # sg 0, 1: (r, h, s1, s0)
        a, b4 = tl.split(tl.permute(p0, (0, 2, 3, 1)))  # h 0, 1: (r, s1, s0)
        p00, p01, p02, p03 = _split4(a)
        p04, p05, p06, p07 = _split4(b4)
        a, b4 = tl.split(tl.permute(p1, (0, 2, 3, 1)))
        p10, p11, p12, p13 = _split4(a)
        p14, p15, p16, p17 = _split4(b4)
        return (p00, p01, p02, p03, p04, p05, p06, p07, p10, p11, p12, p13, p14, p15, p16, p17,
                ((127 + k) << 23).to(tl.float32, bitcast=True))
