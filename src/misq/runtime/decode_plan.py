"""A layer's decode (M <= 16 rows of x), planned and bound once: :class:`DecodePlan`.

:func:`misq.runtime.launch_plan.plan_launches` decides the launches (paths, settings, split-K,
pairing); this module binds each to its kernel with the layer's fixed arguments
(:class:`misq.runtime.fast_launch.BoundLaunch`), so that a call passes only x, the output and
the gathered-x scratch: what :mod:`misq.runtime.kernels`' module docstring describes, at a
fraction of the host time (BENCHMARKS.md, session 13). ``PackedLinear`` keeps one plan per row
bucket (M = 1, M = 2..16); :func:`decode_matmul` builds one for a
single call (tests, benchmarks).

Argument slots every step shares: 0 is x fp16 [M, C] (unit column stride), 1 the output fp16
[M, N]; the steps' own scratch follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from misq.runtime import kernels, launch_plan
from misq.runtime.fast_launch import BoundLaunch, Slot
from misq.runtime.half2_gather import X_LIMIT_LOG2
from misq.runtime.half2_kernel import GROUP_COLS as H2_GROUP_COLS
from misq.runtime.launch_plan import Config, Launch, config_for, plan_launches
from misq.runtime.layout import Segment, block_cols, kernel_perm, pieces
from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    from misq.runtime.gather_kernel import _gather_cols, _gather_scaled
    from misq.runtime.half2_gather import _gather_pairs
    from misq.runtime.half2_kernel import _decode_h2
    from misq.runtime.mma_kernel import _mma_mm
    from misq.runtime.tile_kernel import _decode_mm

X, OUT = Slot(0), Slot(1)


def out_width(rows: int, glu: bool) -> int:
    """The output's features (its row stride): the layer's rows, or half of them when gated."""
    return rows // 2 if glu else rows


def gated(y: Tensor) -> Tensor:
    """y [..., 2n] of gate/up feature pairs (gate 2i, up 2i + 1) -> SiLU(gate) * up [..., n], in
    y's dtype: a LLaMA MLP's activation, as its own forward computes it from fp16 gate and up."""
    return F.silu(y[..., 0::2]) * y[..., 1::2]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol) needs an NVIDIA GPU of compute capability 9+."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def _sinks(out_slot: Slot, ws: Tensor | None, cnt: Tensor | None, bias: Tensor | None, dummy: Tensor) -> list:
    """The kernels' (ws, cnt, bias) arguments: the split-K workspace and counters, or stand-ins
    the kernel never touches (MODE 0, no bias)."""
    return [ws if ws is not None else out_slot, cnt if cnt is not None else dummy,
            bias if bias is not None else out_slot]


class _H2Step:
    """One _decode_h2 launch over one or two segments (M = 1), after one _gather_pairs launch
    that makes x's fp16 pairs for all of them (cfg.pregather), or with each program gathering
    its own blocks."""

    def __init__(self, lc: Launch, perm: Tensor, rows: int, sinks: list, mode: int, bias: bool, glu: bool):
        segs, cfg = lc.segs, lc.cfg
        qs = [perm[s.start:s.start + s.n] for s in segs]
        self.nblks = [_cdiv(s.n, block_cols(s.bits)) for s in segs]
        self.pair_cols = [n * block_cols(s.bits) // 2 for n, s in zip(self.nblks, segs, strict=True)]
        self.pregather, two = cfg.pregather, len(segs) == 2
        pdl = cfg.pdl and cfg.pregather and _pdl_ok(perm.device)
        widths = dict(BITS1=segs[0].bits, BITS2=segs[-1].bits, NSEG=len(segs), LIMIT_LOG2=X_LIMIT_LOG2, PDL=pdl)
        # x's pairs and block scales, all segments', in one int32 scratch (slot 2; slot 3: the same
        # memory as float32), each part starting 16 bytes aligned: one allocation a call
        offs, self.scratch = [], 0
        for n, pc in zip(self.nblks, self.pair_cols, strict=True):
            offs.append((self.scratch, self.scratch + pc))
            self.scratch += pc + _cdiv(n, 4) * 4
        xpairs = [(Slot(2, a), Slot(3, b)) for a, b in offs]
        if self.pregather:
            gsegs = [[q, *xpairs[k], s.n] for k, (q, s) in enumerate(zip(qs, segs, strict=True))]
            wait = pdl and launch_plan.GATHER_PDL
            self.gather = BoundLaunch(_gather_pairs, (sum(self.nblks),), [X, self.nblks[0], *gsegs[0], *gsegs[-1]],
                                      dict(widths, WAIT=wait), launch_pdl=wait)
        args = []
        for k, (seg, q, nblk, bps) in enumerate(zip(segs, qs, self.nblks, lc.bps, strict=True)):
            xp, xs = xpairs[k] if self.pregather else (q, X)
            group_cols = nblk * block_cols(seg.bits) if seg.scales.shape[0] == 1 else seg.group_len
            words = [seg.words[p] for p in pieces(seg.bits)]
            # the group's runs of 128 columns (launch_plan.h2_ok: groups are multiples of 128 columns)
            args.append([xp, xs, q, words[0], words[-1], seg.scales, seg.zeros, seg.n, nblk, group_cols // H2_GROUP_COLS,
                         seg.scales.shape[0], bps])
        self.decode = BoundLaunch(
            _decode_h2, (lc.n_nblk, lc.split),
            [X, OUT, *sinks, rows, out_width(rows, glu), lc.off2 if two else lc.split, *args[0], *args[-1]],
            dict(widths, BN=cfg.block_n, MODE=mode, HAS_BIAS=bias, FUSED=not cfg.pregather, GLU=glu),
            cfg.num_warps, cfg.num_stages, launch_pdl=pdl, maxnreg=cfg.maxnreg)

    def __call__(self, x: Tensor, out: Tensor, scratch: dict) -> None:
        if not self.pregather:
            self.decode(x, out)
            return
        buf = torch.empty(self.scratch, dtype=torch.int32, device=x.device)
        bufs = (buf, buf.view(torch.float32))
        self.gather(x, out, *bufs)
        self.decode(x, out, *bufs)


class _MmaStep:
    """One _mma_mm launch over one or two segments (tensor cores): x read gathered into the
    kernel's column order (scratch "xq", made once per call by the plan) or gathered here."""

    def __init__(self, lc: Launch, rows: int, kperm: Tensor, bases: list[int], sinks: list, mode: int,
                 bias: bool, gather: bool, glu: bool = False):
        cfg, segs = lc.cfg, lc.segs
        self.gather, self.block_m, self.n_nblk = gather, cfg.block_m, lc.n_nblk
        # slot 2: the gathered x (its row stride is slot 4's); slot 3: M; slot 4: x's row stride
        seg_args = []
        for seg, base, bps in zip(segs, bases, lc.bps, strict=True):
            ptrs, _ = kernels.pieces_args(seg)
            xs, q = (X, kperm[base:]) if gather else (Slot(2, base), seg.gidx)
            seg_args.append([xs, q, *ptrs, seg.scales, seg.zeros, seg.gidx, seg.n, seg.scales.shape[0], bps])
        consts = {**kernels.seg_consts(segs[0], 1), **kernels.seg_consts(segs[-1], 2)}
        self.launch = BoundLaunch(
            _mma_mm, (lc.n_nblk, lc.split),
            [OUT, *sinks, Slot(3), rows, Slot(4), out_width(rows, glu), lc.off2, *seg_args[0], *seg_args[-1]],
            dict(consts, NSEG=len(segs), BM=cfg.block_m, BN=cfg.block_n, GATHER=gather, MODE=mode, HAS_BIAS=bias,
                 GLU=glu),
            cfg.num_warps, cfg.num_stages)

    def __call__(self, x: Tensor, out: Tensor, scratch: dict) -> None:
        xq = x if self.gather else scratch["xq"]
        M = x.shape[0]
        self.launch(x, out, xq, M, xq.stride(0), grid=(self.n_nblk * _cdiv(M, self.block_m), self.launch.grid[1]))


class _TileStep:
    """One _decode_mm launch over one segment (CUDA cores at M = 1, per-tile dots otherwise); at
    M = 1 for one-piece widths with whole groups, x gathered first as float32 times each slot's
    2**-q (gather_kernel._gather_scaled)."""

    def __init__(self, lc: Launch, perm: Tensor, rows: int, sinks: list, mode: int, bias: bool, M: int, glu: bool):
        seg, cfg = lc.segs[0], lc.cfg
        ptrs, pc = kernels.pieces_args(seg)
        dot = cfg.path == "dot" or M > 1
        self.xprep = cfg.pregather and not dot and len(pieces(seg.bits)) == 1 and kernels.kernel_group(seg) > 0
        self.n = seg.n
        if self.xprep:  # slot 2: the scaled x, float32 [n]
            self.prep = BoundLaunch(_gather_scaled, (_cdiv(seg.n, kernels.GATHER_BLOCK),),
                                    [X, perm[seg.start:seg.start + seg.n], Slot(2), seg.n],
                                    dict(P=seg.bits, BLOCK=kernels.GATHER_BLOCK))
        self.launch = BoundLaunch(
            _decode_mm, (lc.n_nblk, lc.split),
            [Slot(2) if self.xprep else X, perm[seg.start:], OUT, *sinks, *ptrs, seg.scales, seg.zeros, seg.gidx,
             Slot(3), rows, seg.n, seg.scales.shape[0], Slot(4), out_width(rows, glu), lc.bps[0], kernels.MAGIC_BITS],
            dict(BITS=seg.bits, **pc, GROUP=kernels.kernel_group(seg), BM=16 if dot else 1, BN=cfg.block_n, DOT=dot,
                 MODE=mode, HAS_BIAS=bias, XPREP=self.xprep, GLU=glu), cfg.num_warps, cfg.num_stages)

    def __call__(self, x: Tensor, out: Tensor, scratch: dict) -> None:
        xs = None
        if self.xprep:
            xs = torch.empty(self.n, dtype=torch.float32, device=x.device)
            self.prep(x, out, xs)
        self.launch(x, out, xs, x.shape[0], x.stride(0))


class DecodePlan:
    """A layer's decode launches for M rows' bucket (M = 1, or 2..16: the same plan serves every
    M of it), bound to the layer's tensors. ``configs``: one launch_plan.Config per segment
    (default: tuned or default settings); ``has_extra``: calls will pass a float32 [M, rows] to
    add (the 16-bit columns' product); ``pair_h2`` false runs a mixed layer's h2 widths one
    launch each (benchmarks); ``glu``: the rows are gate/up pairs and the output SiLU(gate) * up
    [M, rows / 2], made by the launch that writes the output (triton_common.write_out)."""

    def __init__(self, perm: Tensor, segments: list[Segment], rows: int, M: int, bias: Tensor | None = None,
                 has_extra: bool = False, configs: list[Config] | None = None, kperm: Tensor | None = None,
                 pair_h2: bool = True, glu: bool = False):
        self.rows, self.segments, self.bias, self.glu = rows, segments, bias, glu
        cfgs = list(configs or [config_for(M, s.bits, rows, perm.numel()) for s in segments])
        launches = plan_launches(segments, cfgs, rows, M, pair_h2)
        direct = len(launches) == 1 and not has_extra and launches[0].split == 1
        self.ws = cnt = None
        if not direct and launches:
            self.ws, cnt = kernels.workspace(perm.device, 16 * rows, max(p.n_nblk for p in launches))
        bases = dict(zip((id(s) for s in segments), kernels.kernel_bases(segments), strict=True))
        self.kperm = self.gather_xq = None
        self.steps: list = []
        for i, lc in enumerate(launches):
            mode = 0 if direct else (2 if i == len(launches) - 1 else 1)
            writes = glu and i == len(launches) - 1  # the one launch whose programs write the output
            sinks = _sinks(OUT, self.ws, cnt, bias, lc.segs[0].gidx)
            has_bias = bias is not None
            if lc.cfg.path == "mma":
                if self.kperm is None:
                    self.kperm = kperm if kperm is not None else kernel_perm(perm, segments)
                if lc.cfg.pregather and self.gather_xq is None:  # x into the kernel order, once for all launches
                    K = self.kperm.numel()
                    self.gather_xq = BoundLaunch(_gather_cols, (_cdiv(K, kernels.GATHER_BLOCK), 1),
                                                 [X, self.kperm, Slot(2), K, Slot(3), K],
                                                 dict(BLOCK=kernels.GATHER_BLOCK))
                self.steps.append(_MmaStep(lc, rows, self.kperm, [bases[id(s)] for s in lc.segs], sinks, mode,
                                           has_bias, not lc.cfg.pregather, writes))
            elif lc.cfg.path == "h2":
                self.steps.append(_H2Step(lc, perm, rows, sinks, mode, has_bias, writes))
            else:
                self.steps.append(_TileStep(lc, perm, rows, sinks, mode, has_bias, M, writes))

    def __call__(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """x fp16 [M, C] (unit column stride; not gathered) -> fp16 [M, rows] (module docstring;
        glu: [M, rows / 2])."""
        M, rows = x.shape[0], self.rows
        out = torch.empty(M, out_width(rows, self.glu), dtype=x.dtype, device=x.device)
        if not self.segments:  # only 16-bit columns
            y = extra if extra is not None else torch.zeros(M, rows, dtype=torch.float32, device=x.device)
            y = (y + (self.bias.float() if self.bias is not None else 0)).to(x.dtype)
            return gated(y) if self.glu else y
        if extra is not None:
            self.ws[:M * rows].view(M, rows).add_(extra)
        scratch = {}
        if self.gather_xq is not None:
            K = self.kperm.numel()
            xq = scratch["xq"] = torch.empty(M, K, dtype=x.dtype, device=x.device)
            self.gather_xq(x, out, xq, x.stride(0), grid=(_cdiv(K, kernels.GATHER_BLOCK), M))
        for step in self.steps:
            step(x, out, scratch)
        return out


def decode_matmul(x: Tensor, perm: Tensor, segments: list, rows: int, bias: Tensor | None = None,
                  extra: Tensor | None = None, configs: list[Config] | None = None,
                  kperm: Tensor | None = None, pair_h2: bool = True, glu: bool = False) -> Tensor:
    """x fp16 [M, C] (M <= 16, unit column stride; not gathered) -> fp16 [M, rows]: the sum over
    quantized segments of x[:, perm][:, segment] @ W_segment^T, plus ``extra`` (float32 [M, rows],
    e.g. the 16-bit columns' product) and ``bias``: a :class:`DecodePlan` made for this call
    (``glu``: its gated output, [M, rows / 2])."""
    plan = DecodePlan(perm, segments, rows, x.shape[0], bias, extra is not None, configs, kperm, pair_h2, glu)
    return plan(x, extra)


def prefill_matmul(x: Tensor, kperm: Tensor, segments: list, rows: int, bias: Tensor | None = None,
                   config: Config | None = None) -> Tensor:
    """x fp16 [M, C] (not gathered), ``kperm`` = layout.kernel_perm(perm, segments), one or two
    quantized segments covering every column (launch_plan.prefill_ok) -> fp16 [M, rows] = x[:, perm]
    @ W^T (+ bias): x is gathered once into the kernel's column order, and each output tile's
    weights are dequantized on the fly into the tensor cores' operand (one launch, no split-K)."""
    M = x.shape[0]
    bits = next((s.bits for s in segments if len(pieces(s.bits)) > 1), segments[0].bits)  # the widest words
    cfg = config or config_for(M, bits, rows, x.shape[1])
    xq = kernels.gather_columns(x, kperm)
    out = torch.empty(M, rows, dtype=x.dtype, device=x.device)
    lc = Launch(segments, cfg, _cdiv(rows, cfg.block_n), 1, [_cdiv(s.n, block_cols(s.bits)) for s in segments], 0)
    step = _MmaStep(lc, rows, kperm, kernels.kernel_bases(segments), _sinks(OUT, None, None, bias, segments[0].gidx),
                    0, bias is not None, False)
    step(x, out, {"xq": xq})
    return out
