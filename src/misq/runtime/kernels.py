"""What the packed runtime launches over the layout of :mod:`misq.runtime.layout`: the decode
paths below (planned by :mod:`misq.runtime.launch_plan`, bound and launched by
:mod:`misq.runtime.decode_plan`), the x gathers, prefill's dequantize launch, the split-K
workspace and the arguments the kernels share. The kernels live in :mod:`misq.runtime.tile_kernel`,
:mod:`misq.runtime.half2_kernel`, :mod:`misq.runtime.mma_kernel` and
:mod:`misq.runtime.dequant_kernel` (their shared Triton helpers and the ``HAVE_TRITON`` probe in
:mod:`misq.runtime.triton_common`); everything here that launches one needs Triton.

* :func:`misq.runtime.decode_plan.decode_matmul` (decode: x fp16 [M, C], M <= 16 rows) computes ``y = x[:, perm] @ W^T``,
  fp16 [M, N], straight from the codes; the last launch of a layer writes the fp16 output (bias
  added). Each program takes BLOCK_N output features and a split-K run of blocks of the layout.
  Paths (launch_plan.Config, picked by launch_plan.config_for):

  - ``h2`` (``half2_kernel._decode_h2``, CUDA cores, M = 1, the default for 3- and 4-bit
    segments whose groups are multiples of 128 columns): codes become fp16 pairs with one LOP3
    and are multiplied by x's pairs two at a time, eight products summed in fp16 before each
    float32 add (about 2.2-3.5 instructions a weight against 5.3); x is gathered first into
    fp16 pairs, each layout block scaled by a power of two so the sums stay finite (``pregather``,
    one small kernel; else each program gathers its own blocks: faster on 5120 x 5120 layers,
    slower on the MLP shapes; on Hopper the kernel is the gather's programmatic dependent, its
    programs starting while the gather finishes); a mixed 3/4 layer's two widths share one
    gather and one launch;
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
  adds the bias and writes fp16, so the workspace is all zeros between calls (:func:`workspace`).
* :func:`dequantizer` (prefill, M > 16): writes the layer's weight, transposed, in its
  columns' original order, into a reused fp16 buffer [C, N] (``_segment_dequant``), and the
  caller runs one cuBLAS matmul on x as it is (no gather: the kernel scatters whole rows).
* :func:`misq.runtime.decode_plan.prefill_matmul` (prefill, one or two widths of at most 10 bits, no 16-bit columns:
  launch_plan.prefill_ok): ``_mma_mm`` over [BLOCK_M, BLOCK_N] output tiles of x gathered into the
  kernel's order, each tile's weights dequantized on the fly (no weight buffer). Slower than
  dequantize + cuBLAS on an H200 at 512 and 2048 rows, so the layers' forward uses it only up to
  ``launch_plan.PREFILL_FUSED_MAX_ROWS`` (0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from misq.runtime.fast_launch import BoundLaunch, Slot
from misq.runtime.launch_plan import mma_ok
from misq.runtime.layout import Segment, block_cols, chunk_tiles, pieces
from misq.runtime.triton_common import HAVE_TRITON

if HAVE_TRITON:
    import triton

    from misq.runtime.dequant_kernel import _segment_dequant
    from misq.runtime.gather_kernel import _gather_cols

# float32 bits of 2**23, passed to the CUDA-core kernel at run time: as a register, (w & mask) | magic
# compiles to one LOP3 (two immediates cannot), about one instruction a weight fewer (sm_90 SASS)
MAGIC_BITS = 0x4B000000
GATHER_BLOCK = 256  # columns a program of the gather kernel: many small programs, all loads in flight
DEQUANT_CONFIG = (128, 8)  # prefill's dequantize kernel: BLOCK_N, warps (fastest of 4 on every 13B shape, H200)


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


def pieces_args(seg) -> tuple[list[Tensor], dict[str, int]]:
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


def workspace(device: torch.device, numel: int, slices: int) -> tuple[Tensor, Tensor]:
    """(float32 workspace, int32 counters), all zeros between calls (the kernels restore that)."""
    ws, cnt = _work.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < slices:
        ws = torch.zeros(max(numel, 16 * 16384), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(slices, 4096), dtype=torch.int32, device=device)
        _work[device] = (ws, cnt)
    return ws, cnt


def kernel_bases(segments: list) -> list[int]:
    """Each segment's first position in layout.kernel_perm (the padded widths before it)."""
    out, pos = [], 0
    for seg in segments:
        out.append(pos)
        pos += triton.cdiv(seg.n, block_cols(seg.bits)) * block_cols(seg.bits)
    return out


def seg_consts(seg: Segment, i: int) -> dict[str, int]:
    _, pc = pieces_args(seg)
    g = seg.group_len if seg.group_len > 0 else 0
    return {f"BITS{i}": seg.bits, **{f"{k}{i}": v for k, v in pc.items()}, f"GROUP{i}": g,
            f"TC{i}": chunk_tiles(seg.bits), f"EVEN{i}": seg.n % block_cols(seg.bits) == 0}


def dequantizer(perm: Tensor, segments: list, rows: int, block_n: int | None = None,
                num_warps: int | None = None) -> Callable[[Tensor], None]:
    """A function of out fp16 [C, rows] that writes every quantized segment's weight, transposed,
    into it at the rows of its columns' original order (perm int32 [C], the layer's): out is then
    W^T for x as it is. One _segment_dequant launch a segment, bound once (fast_launch)."""
    bn, nw = DEQUANT_CONFIG
    block_n, num_warps = block_n or bn, num_warps or nw
    launches = []
    for seg in segments:
        ptrs, pc = pieces_args(seg)
        grid = (triton.cdiv(seg.n, block_cols(seg.bits)), triton.cdiv(rows, block_n))
        launches.append(BoundLaunch(
            _segment_dequant, grid,
            [Slot(0), perm[seg.start:], *ptrs, seg.scales, seg.zeros, seg.gidx, rows, seg.n, seg.scales.shape[0]],
            dict(BITS=seg.bits, **pc, GROUP=max(seg.group_len, 0), BN=block_n, TC=chunk_tiles(seg.bits),
                 PK=mma_ok(seg)), num_warps))

    def run(out: Tensor) -> None:
        for launch in launches:
            launch(out)

    return run


def dequantize_into(out: Tensor, perm: Tensor, segments: list, rows: int, block_n: int | None = None,
                    num_warps: int | None = None) -> None:
    """:func:`dequantizer`'s function, made and called once."""
    dequantizer(perm, segments, rows, block_n, num_warps)(out)
