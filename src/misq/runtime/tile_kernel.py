"""``_decode_mm``: the decode kernel that walks each layout block one tile of 16 columns at a time,
for :func:`misq.runtime.decode_plan.decode_matmul`'s ``fma`` and ``dot`` paths.

One launch covers one segment (width) of a layer: y [M, N] = x[:, perm][:, segment] @ W^T, x fp16
[M, C] gathered through ``perm`` in the kernel (rows stride_xm apart), W's codes read from the
segment's words (triton_common's shapes). Program (pid_n, pid_s): BN output features, and split-K
run pid_s of blocks_per_split layout blocks (16 T columns each, T = 32 // the smallest piece).

* ``fma`` (DOT false, M = 1, CUDA cores; the default for one-piece widths such as 4 bits): per
  block it loads each piece's 16 word rows once and walks the tiles with a shift and a mask per
  tile; codes become float32 through the exponent trick (``bits | 0x4B000000`` is 2**23 + code *
  2**q, q the code's bit position, so one and/or, one subtract and one FMA with x * 2**-q per
  code), accumulated as ``sum code * x`` and ``sum x`` per scale group; each group then adds
  ``scale * (sum code*x - zero * sum x)`` (so its outputs differ from the dense fp16 weights' by at
  most their fp16 rounding).
* ``dot`` (DOT true, M <= 16 rows padded to BM = 16): one K = 16 tensor-core dot per tile, x tile
  [BM, 16] against the tile's weights [16, BN]; the path for widths over 10 bits, which the
  tensor-core kernel's fp16 trick cannot take.

XPREP (fma, one-piece widths, whole-tile groups): x_ptr is x already gathered into the segment's
column order, float32 and times each slot's 2**-q (gather_kernel._gather_scaled), so a slot costs
one load of 16 values instead of an index load, a gather, a convert and a multiply each; with
``magic`` (2**23's bits as a run-time argument, so that ``(w & mask) | magic`` is one LOP3) the loop
issues 5.3 instructions a weight instead of 6.9 (sm_90 SASS, 4-bit, BLOCK_N 64, 4 warps).

GROUP is the scale groups' length when groups are whole tiles lined up with the blocks
(kernels.kernel_group), else 0: then (and on the dot path for widths over 11 bits) each column's
group is read from gidx and each weight rounded to fp16 as the decoder does (triton_common ``exact_w``).

MODE 0 stores the fp16 output (+ bias); 1 adds the partial sums into the float32 split-K
workspace [M, N]; 2 adds them too, and the last program of each BN slice (an int32 counter per
slice) reads the sums back while zeroing them, adds the bias, writes fp16 and resets its counter.
"""

from __future__ import annotations

from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from misq.runtime.triton_common import MAGIC, exact_w, load_pieces, write_out

    TWO23 = tl.constexpr(8388608.0)

    @triton.jit
    def _code(wA, wB, wC, wD, s: tl.constexpr, h, BITS: tl.constexpr, PA: tl.constexpr,
              PB: tl.constexpr, PC: tl.constexpr, PD: tl.constexpr, PMIN: tl.constexpr):
        """int32 [16, BLOCK_N]: the codes of tile t = h + H_A * s (pieces ORed into place). Piece X
        (H_X | H_A) holds tile t in slot t // H_X = (H_A // H_X) * s + h // H_X."""
        HA: tl.constexpr = PA // PMIN
        code = ((wA >> (PA * s)) & ((1 << PA) - 1)) << (BITS & (PA - 1))
        if PB > 0:
            HB: tl.constexpr = PB // PMIN
            code = code | (((wB >> (PB * ((HA // HB) * s + h // HB))) & ((1 << PB) - 1)) << (BITS & (PB - 1)))
        if PC > 0:
            HC: tl.constexpr = PC // PMIN
            code = code | (((wC >> (PC * ((HA // HC) * s + h // HC))) & ((1 << PC) - 1)) << (BITS & (PC - 1)))
        if PD > 0:
            HD: tl.constexpr = PD // PMIN
            code = code | (((wD >> (PD * ((HA // HD) * s + h // HD))) & ((1 << PD) - 1)) << (BITS & (PD - 1)))
        return code

    @triton.jit
    def _decode_mm(x_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr, bias_ptr, wa, wb, wc, wd, s_ptr, z_ptr, g_ptr,
                   M, N, n_cols, n_groups, stride_xm, stride_om, blocks_per_split, magic,
                   BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, PC: tl.constexpr, PD: tl.constexpr,
                   GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
                   MODE: tl.constexpr, HAS_BIAS: tl.constexpr, XPREP: tl.constexpr = False,
                   GLU: tl.constexpr = False):
        # MODE 0: store out (fp16, + bias); 1: add into the workspace; 2: add, and the last program
        # of each BLOCK_N slice writes out from the workspace (zeroing it) and resets its counter.
        # GLU: the output is SiLU(gate) * up of the N / 2 feature pairs (triton_common.write_out).
        PMIN: tl.constexpr = PD if PD > 0 else (PC if PC > 0 else (PB if PB > 0 else PA))
        T: tl.constexpr = 32 // PMIN
        BKB: tl.constexpr = 16 * T
        HA: tl.constexpr = PA // PMIN
        PER: tl.constexpr = 32 // PA
        EXACT: tl.constexpr = GROUP == 0 or (DOT and BITS > 11)
        TG: tl.constexpr = (GROUP // 16) if (GROUP > 0 and GROUP < BKB) else T  # tiles per group run
        SINGLE: tl.constexpr = PB == 0
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        offs_r = tl.arange(0, 16)
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < M
        if DOT:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((16, BN), dtype=tl.float32)
        nblk = tl.cdiv(n_cols, BKB)
        b_lo = pid_s * blocks_per_split
        b_hi = tl.minimum(b_lo + blocks_per_split, nblk)
        for blk in range(b_lo, b_hi):
            for h in range(HA):  # a runtime loop: less code to compile
                wA, wB, wC, wD = load_pieces(wa, wb, wc, wd, blk, h, PA, PB, PC, PD, PMIN, False, offs_n, n_ok, N)
                if SINGLE and not DOT and not EXACT:
                    wAhi = wA >> 16
                if DOT:
                    accg = tl.zeros((BM, BN), dtype=tl.float32)
                else:
                    accg = tl.zeros((16, BN), dtype=tl.float32)
                    sxg = tl.zeros((16,), dtype=tl.float32)
                sc = tl.zeros((BN,), dtype=tl.float32)  # the current group's scales, 2**23 + zeros
                zm = tl.zeros((BN,), dtype=tl.float32)
                for s in tl.static_range(PER):
                    t = h + HA * s
                    k = blk * BKB + 16 * t + offs_r
                    k_ok = k < n_cols
                    if XPREP:  # x already gathered, float32, times 2**-Q (gather_kernel._gather_scaled)
                        xt = tl.load(x_ptr + k, mask=k_ok, other=0.0)
                    else:
                        idx = tl.load(perm_ptr + k, mask=k_ok, other=0)
                        if DOT:
                            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + idx[None, :],
                                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                        else:
                            xt = tl.load(x_ptr + idx, mask=k_ok, other=0.0).to(tl.float32)
                    if EXACT:
                        code = _code(wA, wB, wC, wD, s, h, BITS, PA, PB, PC, PD, PMIN)
                        w = exact_w(code, tl.load(g_ptr + k, mask=k_ok, other=0), k_ok, s_ptr, z_ptr, offs_n, n_ok, N)
                        if DOT:
                            acc = tl.dot(xt, w, acc)
                        else:
                            acc += w.to(tl.float32) * xt[:, None]
                    else:
                        g = (blk * BKB + 16 * t) // GROUP
                        FIRST = s == 0 or (HA * s) // TG != (HA * (s - 1)) // TG  # a group's run starts (H_A | TG)
                        LAST = s == PER - 1 or (HA * s) // TG != (HA * (s + 1)) // TG  # ... ends
                        if FIRST:
                            gm = n_ok & (g < n_groups)
                            sc = tl.load(s_ptr + g * N + offs_n, mask=gm, other=0.0).to(tl.float32)
                            z = tl.load(z_ptr + g * N + offs_n, mask=gm, other=0).to(tl.int32)
                            zm = (z | MAGIC).to(tl.float32, bitcast=True)  # 2**23 + zero
                        if DOT:
                            code = _code(wA, wB, wC, wD, s, h, BITS, PA, PB, PC, PD, PMIN)
                            e = ((code | MAGIC).to(tl.float32, bitcast=True) - zm[None, :]).to(tl.float16)
                            accg = tl.dot(xt, e, accg)
                        else:
                            if SINGLE:  # the code in place at bit q: no shift, x scaled by 2**-q
                                SH = PA * s
                                if SH + PA <= 23:
                                    v = wA & (((1 << PA) - 1) << SH)
                                    Q = SH
                                else:
                                    v = wAhi & (((1 << PA) - 1) << (SH - 16))
                                    Q = SH - 16
                                # magic: 2**23's bits as a run-time value, so (w & mask) | magic is one LOP3
                                c = (v | magic).to(tl.float32, bitcast=True) - TWO23  # code * 2**Q
                                if XPREP:
                                    accg += c * xt[:, None]
                                else:
                                    accg += c * (xt * (1.0 / (1 << Q)))[:, None]
                            else:
                                code = _code(wA, wB, wC, wD, s, h, BITS, PA, PB, PC, PD, PMIN)
                                c = (code | MAGIC).to(tl.float32, bitcast=True) - TWO23
                                accg += c * xt[:, None]
                            if XPREP:
                                sxg += xt * (1 << Q)
                            else:
                                sxg += xt
                        if LAST:  # scale the group's run of tiles
                            if DOT:
                                acc += sc[None, :] * accg
                                accg = tl.zeros((BM, BN), dtype=tl.float32)
                            else:
                                acc += sc[None, :] * (accg - (zm - TWO23)[None, :] * sxg[:, None])
                                accg = tl.zeros((16, BN), dtype=tl.float32)
                                sxg = tl.zeros((16,), dtype=tl.float32)
        if DOT:
            y = acc
            om = offs_m
            mo = m_ok
        else:
            y = tl.sum(acc, axis=0)[None, :]
            om = tl.arange(0, 1)
            mo = om < 1
        write_out(y, om, mo, offs_n, n_ok, N, pid_n, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr, HAS_BIAS, MODE, GLU)
