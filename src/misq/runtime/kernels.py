"""Launching the Triton kernels over the runtime layout of :mod:`misq.runtime.layout`, as
:mod:`misq.runtime.launch_plan` plans them (paths, settings, split-K, which widths share a
launch): the dispatch :mod:`misq.runtime.linear`, the tests and benchmarks/decode_speed.py call,
and the split-K workspace. The kernels live in :mod:`misq.runtime.tile_kernel`,
:mod:`misq.runtime.half2_kernel`, :mod:`misq.runtime.mma_kernel` and
:mod:`misq.runtime.dequant_kernel` (their shared Triton helpers and the ``HAVE_TRITON`` probe in
:mod:`misq.runtime.triton_common`); everything here that launches one needs Triton.

* :func:`decode_matmul` (decode: x fp16 [M, C], M <= 16 rows) computes ``y = x[:, perm] @ W^T``,
  fp16 [M, N], straight from the codes; the last launch of a layer writes the fp16 output (bias
  added). Each program takes BLOCK_N output features and a split-K run of blocks of the layout.
  Paths (:class:`Config`, picked by :func:`config_for`):

  - ``h2`` (``half2_kernel._decode_h2``, CUDA cores, M = 1, the default for 3- and 4-bit
    segments whose groups are multiples of 128 columns): codes become fp16 pairs with one LOP3
    and are multiplied by x's pairs two at a time, eight products summed in fp16 before each
    float32 add (about 2.2-3.5 instructions a weight against 5.3); x is gathered first into
    fp16 pairs, each layout block scaled by a power of two so the sums stay finite (``pregather``,
    one small kernel; else each program gathers its own blocks: faster on 5120 x 5120 layers,
    slower on the MLP shapes); a mixed 3/4 layer's two widths share one gather and one launch;
  - ``fma`` (``_decode_mm``, CUDA cores, M = 1, the default for other one-piece widths such as 2
    and 8 bits): x gathered first as float32 times each slot's 2**-q (``pregather``, one small kernel;
    else through ``perm`` in the kernel); codes become float32 through the exponent trick and
    each scale group's dot product is scaled once (so its outputs differ from the dense fp16
    weights' by at most their fp16 rounding);
  - ``mma`` (``_mma_mm``, tensor cores, M = 2..16 padded to 16, and M = 1 for widths of several
    pieces): x gathered once into the kernel's column order (layout.kernel_perm; ``pregather``,
    one small kernel) or in the kernel; per chunk of up to 8 tiles the decoder's fp16 weights,
    bit for bit, two per 32-bit operation, as the left operand of the tensor cores' product
    (wgmma). Two segments (widths) share a launch, split-K programs taking about equal numbers
    of columns;
  - ``dot`` (``_decode_mm``, one K = 16 tensor-core dot per tile): widths over 10 bits.

  Split-K programs add their partial sums into a float32 workspace [M, N] with atomics; the last
  program of each BLOCK_N slice (a per-slice counter) reads the sums back while zeroing them,
  adds the bias and writes fp16, so the workspace is all zeros between calls (``_workspace``).
* :func:`dequantize_into` (prefill, M > 16): writes the layer's weight, transposed, in its
  columns' original order, into a reused fp16 buffer [C, N] (``_segment_dequant``), and the
  caller runs one cuBLAS matmul on x as it is (no gather: the kernel scatters whole rows).
* :func:`prefill_matmul` (prefill, one or two widths of at most 10 bits, no 16-bit columns:
  launch_plan.prefill_ok): ``_mma_mm`` over [BLOCK_M, BLOCK_N] output tiles of x gathered into the
  kernel's order, each tile's weights dequantized on the fly (no weight buffer). Slower than
  dequantize + cuBLAS on an H200 at 512 and 2048 rows, so the layers' forward uses it only up to
  ``launch_plan.PREFILL_FUSED_MAX_ROWS`` (0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from misq.runtime.half2_gather import X_LIMIT_LOG2
from misq.runtime.launch_plan import Config, Launch, config_for, mma_ok, plan_launches
from misq.runtime.layout import Segment, block_cols, chunk_tiles, kernel_perm, pieces
from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    import triton

    from misq.runtime.dequant_kernel import _segment_dequant
    from misq.runtime.gather_kernel import _gather_cols, _gather_scaled
    from misq.runtime.half2_gather import _gather_pairs
    from misq.runtime.half2_kernel import _decode_h2
    from misq.runtime.mma_kernel import _mma_mm
    from misq.runtime.tile_kernel import _decode_mm

# float32 bits of 2**23, passed to the CUDA-core kernel at run time: as a register, (w & mask) | magic
# compiles to one LOP3 (two immediates cannot), about one instruction a weight fewer (sm_90 SASS)
MAGIC_BITS = 0x4B000000
GATHER_BLOCK = 256  # columns a program of the gather kernel: many small programs, all loads in flight
DEQUANT_CONFIG = (128, 8)  # prefill's dequantize kernel: BLOCK_N, warps (fastest of 4 on every 13B shape, H200)


def gather_scaled(x: Tensor, idx: Tensor, bits: int) -> Tensor:
    """x fp16 [1, C] on CUDA, idx int32 [K] (a one-piece segment's columns) -> float32 [K]:
    x[0, idx] times each column's 2**-q for the batch-1 CUDA-core kernel (gather_kernel._gather_scaled)."""
    K = idx.numel()
    out = torch.empty(K, dtype=torch.float32, device=x.device)
    _gather_scaled[(triton.cdiv(K, GATHER_BLOCK),)](x, idx, out, K, P=bits, BLOCK=GATHER_BLOCK)
    return out


def gather_pairs(x: Tensor, idxs: list[Tensor], widths: list[int]) -> list[tuple[Tensor, Tensor]]:
    """x fp16 [1, C] on CUDA; per segment (one or two, one launch) its columns idx int32 [K] and
    width (3 or 4) -> (xp int32 [nblk * B / 2], xs float32 [nblk]), B = block_cols(bits): x[0, idx]
    as the h2 kernel's fp16 pairs, each layout block scaled by its xs**-1 (half2_gather)."""
    nblks = [triton.cdiv(i.numel(), block_cols(b)) for i, b in zip(idxs, widths, strict=True)]
    outs = [(torch.empty(n * block_cols(b) // 2, dtype=torch.int32, device=x.device),
             torch.empty(n, dtype=torch.float32, device=x.device)) for n, b in zip(nblks, widths, strict=True)]
    segs = [(i, xp, xs, i.numel()) for i, (xp, xs) in zip(idxs, outs, strict=True)]
    two = len(segs) == 2
    _gather_pairs[(sum(nblks),)](x, nblks[0], *segs[0], *segs[1 if two else 0], BITS1=widths[0],
                                 BITS2=widths[-1], NSEG=len(segs), LIMIT_LOG2=X_LIMIT_LOG2)
    return outs


def gather_columns(x: Tensor, idx: Tensor) -> Tensor:
    """x [M, C] (unit column stride), idx int32 [K] on x's device -> x[:, idx], [M, K] (one launch;
    torch's index_select where Triton cannot run it, see gather_kernel.py for why)."""
    if not (HAVE_TRITON and x.is_cuda and x.stride(-1) == 1 and idx.dtype == torch.int32):
        return x.index_select(1, idx)
    M, K = x.shape[0], idx.numel()
    out = torch.empty(M, K, dtype=x.dtype, device=x.device)
    if M and K:
        _gather_cols[(triton.cdiv(K, GATHER_BLOCK), M)](x, idx, out, K, x.stride(0), out.stride(0), BLOCK=GATHER_BLOCK)
    return out


def _pieces_args(seg) -> tuple[list[Tensor], dict[str, int]]:
    ps = pieces(seg.bits)
    ptrs = [seg.words[p] for p in ps] + [seg.gidx] * (4 - len(ps))
    names = ("PA", "PB", "PC", "PD")
    return ptrs, {names[i]: (ps[i] if i < len(ps) else 0) for i in range(4)}


def kernel_group(seg) -> int:
    """The group length the fma and dot paths use (whole tiles of 16 lined up with the layout's
    blocks), or 0: read each column's group (exact path)."""
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


def _kbase(segments: list) -> list[int]:
    """Each segment's first position in layout.kernel_perm (the padded widths before it)."""
    out, pos = [], 0
    for seg in segments:
        out.append(pos)
        pos += triton.cdiv(seg.n, block_cols(seg.bits)) * block_cols(seg.bits)
    return out


def _run_h2(launch: Launch, x: Tensor, perm: Tensor, out: Tensor, ws: Tensor | None, cnt: Tensor | None,
            bias: Tensor | None, mode: int) -> None:
    """One _decode_h2 launch over launch.segs (one or two segments; x [1, C], not gathered): x
    gathered first into fp16 pairs for all of them (cfg.pregather, one small kernel) or by each
    program for its own blocks."""
    segs, cfg = launch.segs, launch.cfg
    qs = [perm[s.start:s.start + s.n] for s in segs]
    xs = gather_pairs(x, qs, [s.bits for s in segs]) if cfg.pregather else [(q, x) for q in qs]
    args = []
    for seg, q, (xp, xsc), bps in zip(segs, qs, xs, launch.bps, strict=True):
        nblk = triton.cdiv(seg.n, block_cols(seg.bits))
        group_cols = nblk * block_cols(seg.bits) if seg.scales.shape[0] == 1 else seg.group_len
        words = [seg.words[p] for p in pieces(seg.bits)]
        args.append([xp, xsc, q, words[0], words[-1], seg.scales, seg.zeros, seg.n, nblk, group_cols,
                     seg.scales.shape[0], bps])
    two = len(segs) == 2
    _decode_h2[(launch.n_nblk, launch.split)](
        x, out, ws if ws is not None else out, cnt if cnt is not None else segs[0].gidx,
        bias if bias is not None else out, out.shape[1], out.stride(0), launch.off2 if two else launch.split,
        *args[0], *args[-1], BITS1=segs[0].bits, BITS2=segs[-1].bits, NSEG=len(segs), BN=cfg.block_n, MODE=mode,
        HAS_BIAS=bias is not None, FUSED=not cfg.pregather, LIMIT_LOG2=X_LIMIT_LOG2, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def _seg_args(seg: Segment, x: Tensor, q: Tensor | None, bps: int) -> list:
    ptrs, _ = _pieces_args(seg)
    return [x, q if q is not None else seg.gidx, *ptrs, seg.scales, seg.zeros, seg.gidx, seg.n,
            seg.scales.shape[0], bps]


def _seg_consts(seg: Segment, i: int) -> dict[str, int]:
    _, pc = _pieces_args(seg)
    g = seg.group_len if seg.group_len > 0 else 0
    return {f"BITS{i}": seg.bits, **{f"{k}{i}": v for k, v in pc.items()}, f"GROUP{i}": g,
            f"TC{i}": chunk_tiles(seg.bits), f"EVEN{i}": seg.n % block_cols(seg.bits) == 0}


def _run_mma(launch: Launch, x: Tensor, xs: list[Tensor], qs: list, out: Tensor, ws: Tensor | None,
             cnt: Tensor | None, bias: Tensor | None, mode: int, gather: bool) -> None:
    """One _mma_mm launch over launch.segs (x: the rows; xs / qs: each segment's x and kernel perm)."""
    cfg, segs = launch.cfg, launch.segs
    M = x.shape[0]
    a1 = _seg_args(segs[0], xs[0], qs[0], launch.bps[0])
    two = len(segs) == 2
    a2 = _seg_args(segs[1], xs[1], qs[1], launch.bps[1]) if two else a1
    consts = {**_seg_consts(segs[0], 1), **_seg_consts(segs[1] if two else segs[0], 2)}
    grid = (launch.n_nblk * triton.cdiv(M, cfg.block_m), launch.split)
    _mma_mm[grid](out, ws if ws is not None else out, cnt if cnt is not None else segs[0].gidx,
                  bias if bias is not None else out, M, out.shape[1], x.stride(0), out.stride(0), launch.off2,
                  *a1, *a2, **consts, NSEG=2 if two else 1, BM=cfg.block_m, BN=cfg.block_n,
                  GATHER=gather, MODE=mode, HAS_BIAS=bias is not None,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def decode_matmul(x: Tensor, perm: Tensor, segments: list, rows: int, bias: Tensor | None = None,
                  extra: Tensor | None = None, configs: list[Config] | None = None,
                  kperm: Tensor | None = None, pair_h2: bool = True) -> Tensor:
    """x fp16 [M, C] (M <= 16, unit column stride; not gathered) -> fp16 [M, rows]: the sum over
    quantized segments of x[:, perm][:, segment] @ W_segment^T, plus ``extra`` (float32 [M, rows],
    e.g. the 16-bit columns' product) and ``bias``. ``configs``: one per segment (default: tuned);
    the mma path takes two segments a launch (the first one's config), and so does the h2 path
    (a mixed 3/4 layer: one gather and one launch; ``pair_h2`` false runs them one by one, for
    benchmarks). ``kperm``: layout.kernel_perm(perm, segments) (made here when missing)."""
    M = x.shape[0]
    out = torch.empty(M, rows, dtype=x.dtype, device=x.device)
    cfgs = list(configs or [config_for(M, s.bits, rows, x.shape[1]) for s in segments])
    launches = plan_launches(segments, cfgs, rows, M, pair_h2)
    direct = len(launches) == 1 and extra is None and launches[0].split == 1
    ws = cnt = None
    if not direct:
        ws, cnt = _workspace(x.device, 16 * rows, max(p.n_nblk for p in launches))
        if extra is not None:
            ws[:M * rows].view(M, rows).add_(extra)
    base = dict(zip((id(s) for s in segments), _kbase(segments), strict=True))
    xq = None
    for i, lc in enumerate(launches):
        mode = 0 if direct else (2 if i == len(launches) - 1 else 1)
        if lc.cfg.path == "mma":
            if kperm is None:
                kperm = kernel_perm(perm, segments)
            if lc.cfg.pregather:
                if xq is None:
                    xq = gather_columns(x, kperm)
                _run_mma(lc, xq, [xq[:, base[id(s)]:] for s in lc.segs], [None] * len(lc.segs), out, ws, cnt, bias,
                         mode, False)
            else:
                _run_mma(lc, x, [x] * len(lc.segs), [kperm[base[id(s)]:] for s in lc.segs], out, ws, cnt, bias,
                         mode, True)
            continue
        if lc.cfg.path == "h2":
            _run_h2(lc, x, perm, out, ws, cnt, bias, mode)
            continue
        seg, cfg = lc.segs[0], lc.cfg
        ptrs, pc = _pieces_args(seg)
        dot = cfg.path == "dot" or M > 1
        xprep = cfg.pregather and not dot and len(pieces(seg.bits)) == 1 and kernel_group(seg) > 0
        xs = gather_scaled(x, perm[seg.start:seg.start + seg.n], seg.bits) if xprep else x
        _decode_mm[(lc.n_nblk, lc.split)](
            xs, perm[seg.start:], out, ws if ws is not None else out, cnt if cnt is not None else seg.gidx,
            bias if bias is not None else out, *ptrs, seg.scales, seg.zeros, seg.gidx,
            M, rows, seg.n, seg.scales.shape[0], x.stride(0), out.stride(0), lc.bps[0], MAGIC_BITS,
            BITS=seg.bits, **pc, GROUP=kernel_group(seg), BM=16 if dot else 1, BN=cfg.block_n, DOT=dot,
            MODE=mode, HAS_BIAS=bias is not None, XPREP=xprep, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not segments:  # only 16-bit columns
        y = extra if extra is not None else torch.zeros(M, rows, dtype=torch.float32, device=x.device)
        out = (y + (bias.float() if bias is not None else 0)).to(x.dtype)
    return out


def prefill_matmul(x: Tensor, kperm: Tensor, segments: list, rows: int, bias: Tensor | None = None,
                   config: Config | None = None) -> Tensor:
    """x fp16 [M, C] (not gathered), ``kperm`` = layout.kernel_perm(perm, segments), one or two
    quantized segments covering every column (launch_plan.prefill_ok) -> fp16 [M, rows] = x[:, perm]
    @ W^T (+ bias): x is gathered once into the kernel's column order, and each output tile's
    weights are dequantized on the fly into the tensor cores' operand (one launch, no split-K)."""
    M = x.shape[0]
    bits = next((s.bits for s in segments if len(pieces(s.bits)) > 1), segments[0].bits)  # the widest words
    cfg = config or config_for(M, bits, rows, x.shape[1])
    xq = gather_columns(x, kperm)
    out = torch.empty(M, rows, dtype=x.dtype, device=x.device)
    lc = Launch(segments, cfg, triton.cdiv(rows, cfg.block_n), 1,
                [triton.cdiv(s.n, block_cols(s.bits)) for s in segments], 0)
    _run_mma(lc, xq, [xq[:, b:] for b in _kbase(segments)], [None] * len(segments), out, None, None, bias, 0, False)
    return out


def dequantize_into(out: Tensor, perm: Tensor, segments: list, rows: int, block_n: int | None = None,
                    num_warps: int | None = None) -> None:
    """Write every quantized segment's weight, transposed, into out fp16 [C, rows] at the rows of
    its columns' original order (perm int32 [C], the layer's): out is then W^T for x as it is."""
    bn, nw = DEQUANT_CONFIG
    block_n, num_warps = block_n or bn, num_warps or nw
    for seg in segments:
        ptrs, pc = _pieces_args(seg)
        grid = (triton.cdiv(seg.n, block_cols(seg.bits)), triton.cdiv(rows, block_n))
        _segment_dequant[grid](out, perm[seg.start:], *ptrs, seg.scales, seg.zeros, seg.gidx, rows, seg.n,
                               seg.scales.shape[0], BITS=seg.bits, **pc, GROUP=max(seg.group_len, 0),
                               BN=block_n, TC=chunk_tiles(seg.bits), PK=mma_ok(seg), num_warps=num_warps)
