"""Triton kernels over the runtime layout of :mod:`misq.runtime.layout`.

* :func:`decode_matmul` (decode, M <= 16 rows of input): one kernel per width segment computes
  ``y = x[:, perm] @ W^T`` straight from the codes. It gathers x through ``perm`` itself, and the
  last launch of a layer writes the fp16 output (bias added): no gather, zero-fill or cast
  kernels around it. Each program takes BLOCK_N output features and a split-K run of blocks of
  the layout; per block it loads each piece's 16 word rows once (wide coalesced loads along the
  output features) and walks the tiles of 16 columns with a shift and a mask per tile:

  - ``fma`` (CUDA cores, meant for M = 1): codes become float32 through the exponent trick
    (``bits | 0x4B000000`` is 2**23 + code * 2**q, q the code's bit position, so one and/or, one
    subtract and one FMA with x * 2**-q per code), accumulated as ``sum code * x`` and ``sum x``
    per scale group; each group then adds ``scale * (sum code*x - zero * sum x)``;
  - ``dot`` (tensor cores, M <= 16 padded to 16): ``code - zero`` (exact in fp16 up to 11 bits)
    times x on the tensor cores per tile, each group's sum scaled once.

  Both apply the scale after the group's dot product in float32, so the result differs from the
  dense fp16 weights' by at most their fp16 rounding (each weight ``scale * (code - zero)`` is
  rounded to fp16 in the dense model, not here). Groups that do not line up with the tiles (or
  uneven groups, or over 11 bits on the tensor cores) take the exact path: each weight
  ``(code - zero) * scale`` rounded to fp16 as the checkpoint's decoder does.
  Split-K programs add their partial sums into a float32 workspace with atomics; the last program
  of each BLOCK_N slice (a per-slice counter) reads the sums back while zeroing them, adds the
  bias and writes fp16, so the workspace is all zeros between calls.
* :func:`dequantize_into` (prefill, M > 16): writes the layer's weight, transposed, in the
  gathered column order, into a reused fp16 buffer [C, N], and the caller runs one cuBLAS matmul.

Pointers for pieces a width does not have get a dummy tensor; constexpr piece widths prune code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from misq.runtime.layout import block_cols, pieces

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the runtime dequantizes layer by layer instead
    HAVE_TRITON = False

DECODE_MAX_ROWS = 16  # above this, dequantize into a buffer and use cuBLAS
_DEQUANT_BLOCK_N = 64  # prefill's dequantize kernel (not tuned)


@dataclass(frozen=True)
class Config:
    path: str  # "fma" (M = 1 only) or "dot"
    block_n: int
    target_programs: int  # split-K deep enough for about this many programs
    num_warps: int
    num_stages: int = 1


# Launch settings: (path bucket "m1" / "m16", bits, N, K) -> Config, filled by
# benchmarks/decode_speed.py --tune results; anything else uses default_config.
TUNED: dict[tuple[str, int, int, int], Config] = {}


def default_config(M: int, bits: int, N: int, K: int) -> Config:
    # Many small programs (about one layout block each): the loads of a block are one round trip,
    # so the memory system needs many warps per SM in flight (4 a program at 528 programs was
    # latency-bound on an H200, ~0.7 TB/s).
    if M == 1:  # benchmarks/decode_speed.py --tune picked 64/2112/4 on every 13B shape at 3 and 4 bits
        return Config("fma", 64, 16 * 132, 4)
    return Config("dot", 128, 16 * 132, 4)


def config_for(M: int, bits: int, N: int, K: int) -> Config:
    cfg = TUNED.get(("m1" if M == 1 else "m16", bits, N, K))
    if cfg is None or (cfg.path == "fma" and M > 1):
        cfg = default_config(M, bits, N, K)
    return cfg


if HAVE_TRITON:
    MAGIC = tl.constexpr(0x4B000000)  # float32 bits of 2**23: (MAGIC | v) is 2**23 + v for v < 2**23
    TWO23 = tl.constexpr(8388608.0)

    @triton.jit
    def _rows(ptr, blk, h, H: tl.constexpr, offs_r, offs_n, n_ok, N):
        """The 16 word rows (blk, h) of one piece: int32 [16, BLOCK_N]."""
        rows = (blk * H + h) * 16 + offs_r
        return tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0)

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
    def _exact_w(code, k, k_ok, s_ptr, z_ptr, g_ptr, offs_n, n_ok, N):
        """fp16 [16, BLOCK_N]: (code - zero) * scale in float32, rounded to fp16 (the decoder's
        weight, bit for bit), each column's group read from gidx."""
        g = tl.load(g_ptr + k, mask=k_ok, other=0)
        m = k_ok[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0).to(tl.int32)
        zm = (z | MAGIC).to(tl.float32, bitcast=True)
        return (((code | MAGIC).to(tl.float32, bitcast=True) - zm) * s).to(tl.float16)

    @triton.jit
    def _decode_mm(x_ptr, perm_ptr, out_ptr, ws_ptr, cnt_ptr, bias_ptr, wa, wb, wc, wd, s_ptr, z_ptr, g_ptr,
                   M, N, n_cols, n_groups, stride_xm, stride_om, blocks_per_split,
                   BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, PC: tl.constexpr, PD: tl.constexpr,
                   GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
                   MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
        # MODE 0: store out (fp16, + bias); 1: add into the workspace; 2: add, and the last program
        # of each BLOCK_N slice writes out from the workspace (zeroing it) and resets its counter.
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
                wA = _rows(wa, blk, h, HA, offs_r, offs_n, n_ok, N)
                wB = wA
                wC = wA
                wD = wA
                if PB > 0:
                    wB = _rows(wb, blk, h % (PB // PMIN), PB // PMIN, offs_r, offs_n, n_ok, N)
                if PC > 0:
                    wC = _rows(wc, blk, h % (PC // PMIN), PC // PMIN, offs_r, offs_n, n_ok, N)
                if PD > 0:
                    wD = _rows(wd, blk, h % (PD // PMIN), PD // PMIN, offs_r, offs_n, n_ok, N)
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
                    idx = tl.load(perm_ptr + k, mask=k_ok, other=0)
                    if DOT:
                        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + idx[None, :],
                                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    else:
                        xt = tl.load(x_ptr + idx, mask=k_ok, other=0.0).to(tl.float32)
                    if EXACT:
                        code = _code(wA, wB, wC, wD, s, h, BITS, PA, PB, PC, PD, PMIN)
                        w = _exact_w(code, k, k_ok, s_ptr, z_ptr, g_ptr, offs_n, n_ok, N)
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
                                c = (v | MAGIC).to(tl.float32, bitcast=True) - TWO23  # code * 2**Q
                                accg += c * (xt * (1.0 / (1 << Q)))[:, None]
                            else:
                                code = _code(wA, wB, wC, wD, s, h, BITS, PA, PB, PC, PD, PMIN)
                                c = (code | MAGIC).to(tl.float32, bitcast=True) - TWO23
                                accg += c * xt[:, None]
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
        msk = mo[:, None] & n_ok[None, :]
        if MODE == 0:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + om[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=msk)
        else:
            wsp = ws_ptr + om[:, None] * N + offs_n[None, :]
            tl.atomic_add(wsp, y, mask=msk, sem="relaxed")
            if MODE == 2:
                tl.debug_barrier()
                done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
                if done == tl.num_programs(1) - 1:
                    bits = tl.atomic_xchg(wsp.to(tl.pointer_type(tl.int32)), tl.zeros(y.shape, tl.int32), mask=msk,
                                          sem="acq_rel")  # read the sums and leave zeros
                    tot = bits.to(tl.float32, bitcast=True)
                    if HAS_BIAS:
                        tot += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    tl.store(out_ptr + om[:, None] * stride_om + offs_n[None, :],
                             tot.to(out_ptr.dtype.element_ty), mask=msk)
                    tl.atomic_xchg(cnt_ptr + pid_n, 0)

    @triton.jit
    def _segment_dequant(out_ptr, wa, wb, wc, wd, s_ptr, z_ptr, g_ptr, N, n_cols,
                         BITS: tl.constexpr, PA: tl.constexpr, PB: tl.constexpr, PC: tl.constexpr, PD: tl.constexpr,
                         BN: tl.constexpr):
        PMIN: tl.constexpr = PD if PD > 0 else (PC if PC > 0 else (PB if PB > 0 else PA))
        BKB: tl.constexpr = 16 * (32 // PMIN)
        HA: tl.constexpr = PA // PMIN
        blk = tl.program_id(0)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        offs_r = tl.arange(0, 16)
        for h in range(HA):
            wA = _rows(wa, blk, h, HA, offs_r, offs_n, n_ok, N)
            wB = wA
            wC = wA
            wD = wA
            if PB > 0:
                wB = _rows(wb, blk, h % (PB // PMIN), PB // PMIN, offs_r, offs_n, n_ok, N)
            if PC > 0:
                wC = _rows(wc, blk, h % (PC // PMIN), PC // PMIN, offs_r, offs_n, n_ok, N)
            if PD > 0:
                wD = _rows(wd, blk, h % (PD // PMIN), PD // PMIN, offs_r, offs_n, n_ok, N)
            for s in tl.static_range(32 // PA):
                t = h + HA * s
                k = blk * BKB + 16 * t + offs_r
                k_ok = k < n_cols
                code = _code(wA, wB, wC, wD, s, h, BITS, PA, PB, PC, PD, PMIN)
                w = _exact_w(code, k, k_ok, s_ptr, z_ptr, g_ptr, offs_n, n_ok, N)
                tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w, mask=k_ok[:, None] & n_ok[None, :])


def _pieces_args(seg) -> tuple[list[Tensor], dict[str, int]]:
    ps = pieces(seg.bits)
    ptrs = [seg.words[p] for p in ps] + [seg.gidx] * (4 - len(ps))
    names = ("PA", "PB", "PC", "PD")
    return ptrs, {names[i]: (ps[i] if i < len(ps) else 0) for i in range(4)}


def kernel_group(seg) -> int:
    """The group length the fast paths use (whole tiles of 16 lined up with the layout's blocks),
    or 0: read each column's group (exact path)."""
    g, B = seg.group_len, block_cols(seg.bits)
    ha = max(pieces(seg.bits)) // min(pieces(seg.bits))
    if g > 0 and g % 16 == 0 and (g % B == 0 or (B % g == 0 and (g // 16) % ha == 0)):
        return g
    return 0


_work: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _workspace(device: torch.device, numel: int, slices: int) -> tuple[Tensor, Tensor]:
    """(float32 workspace, int32 counters), all zeros between calls (the kernels restore that)."""
    ws, cnt = _work.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < slices:
        ws = torch.zeros(max(numel, 16 * 16384), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(slices, 4096), dtype=torch.int32, device=device)
        _work[device] = (ws, cnt)
    return ws, cnt


def decode_matmul(x: Tensor, perm: Tensor, segments: list, rows: int, bias: Tensor | None = None,
                  extra: Tensor | None = None, configs: list[Config] | None = None) -> Tensor:
    """x fp16 [M, C] (M <= 16, unit column stride; not gathered) -> fp16 [M, rows]: the sum over
    quantized segments of x[:, perm][:, segment] @ W_segment^T, plus ``extra`` (float32 [M, rows],
    e.g. the 16-bit columns' product) and ``bias``. ``configs``: one per segment (default: tuned)."""
    M = x.shape[0]
    out = torch.empty(M, rows, dtype=x.dtype, device=x.device)
    n_seg = len(segments)
    cfgs = configs or [config_for(M, s.bits, rows, s.n) for s in segments]
    ws = cnt = None
    plans = []
    for seg, cfg in zip(segments, cfgs, strict=True):
        n_nblk = triton.cdiv(rows, cfg.block_n)
        nblk = triton.cdiv(seg.n, block_cols(seg.bits))
        split = max(1, min(nblk, cfg.target_programs // n_nblk))
        bps = triton.cdiv(nblk, split)
        plans.append((n_nblk, triton.cdiv(nblk, bps), bps))
    direct = n_seg == 1 and extra is None and plans[0][1] == 1
    if not direct:
        ws, cnt = _workspace(x.device, 16 * rows, max(p[0] for p in plans))
        if extra is not None:
            ws[:M * rows].view(M, rows).add_(extra)
    for i, (seg, cfg, (n_nblk, split, bps)) in enumerate(zip(segments, cfgs, plans, strict=True)):
        ptrs, pc = _pieces_args(seg)
        mode = 0 if direct else (2 if i == n_seg - 1 else 1)
        dot = cfg.path == "dot" or M > 1
        _decode_mm[(n_nblk, split)](
            x, perm[seg.start:], out, ws if ws is not None else out, cnt if cnt is not None else seg.gidx,
            bias if bias is not None else out, *ptrs, seg.scales, seg.zeros, seg.gidx,
            M, rows, seg.n, seg.scales.shape[0], x.stride(0), out.stride(0), bps,
            BITS=seg.bits, **pc, GROUP=kernel_group(seg), BM=16 if dot else 1, BN=cfg.block_n, DOT=dot,
            MODE=mode, HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if n_seg == 0:  # only 16-bit columns
        y = extra if extra is not None else torch.zeros(M, rows, dtype=torch.float32, device=x.device)
        out = (y + (bias.float() if bias is not None else 0)).to(x.dtype)
    return out


def dequantize_into(out: Tensor, segments: list, rows: int) -> None:
    """Write every quantized segment's weight, transposed, into out fp16 [C, rows] at its rows."""
    for seg in segments:
        ptrs, pc = _pieces_args(seg)
        grid = (triton.cdiv(seg.n, block_cols(seg.bits)), triton.cdiv(rows, _DEQUANT_BLOCK_N))
        _segment_dequant[grid](out[seg.start:], *ptrs, seg.scales, seg.zeros, seg.gidx, rows, seg.n,
                               BITS=seg.bits, **pc, BN=_DEQUANT_BLOCK_N, num_warps=4)
