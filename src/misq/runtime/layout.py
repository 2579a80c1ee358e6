"""The packed runtime's in-memory layout of one layer, built at load from the file's tensors.

The file (:mod:`misq.checkpoint.layer_format`) is made to be small: bit-planes, survivors only,
runs in the solver's order. The kernels want something else, so at load each layer becomes:

* ``perm`` int32 [C]: the columns grouped by width (widths ascending, 16-bit last), each width's
  columns in storage order. The forward gathers ``x[:, perm]`` once, and every width is then one
  contiguous *segment* of the gathered input.
* per quantized segment of width b (n_b columns, K_b scale groups):

  - ``words``: for each power of two p in b's binary decomposition (3 = 2 + 1, 6 = 4 + 2), an
    int32 [nblk * 16 * H_p, R] array of p-bit slices of the codes, rows contiguous (coalesced
    loads). The columns are padded to blocks of ``block_cols(b)`` = 16 * T codes, T = 32 // p_min
    tiles of 16 columns (p_min: b's smallest piece). Word row ``(blk * H_p + h) * 16 + r``
    (H_p = p // p_min) holds, at bits ``p * s``, the piece of column ``blk * 16 T + 16 t + r`` for
    tile ``t = h + H_p * s``: a kernel loads 16 word rows once and gets, with one shift and mask
    per slot, a whole [16, BLOCK_N] tile of codes (no reshape), and every piece of a tile sits in
    word rows loaded together. Code bits: the p-bit piece sits at bit ``b & (p - 1)`` of the
    code. Power-of-two pieces store exactly b bits a weight (no bits wasted as with 10 3-bit codes
    per word), plus the padding of the last block (none when the width's column count is a
    multiple of 512, as on LLaMA shapes).
  - ``scales`` fp16 [K_b, R] and ``zeros`` uint8 [K_b, R] (int16 above 8 bits): group-major so
    one group's row vector is one contiguous load.
  - ``gidx`` int32 [n_b]: each column's group; ``group_len`` > 0 when every group but the last
    has that length (the kernel then computes the group instead of loading it).

* the 16-bit columns as a dense [R, n_fp] matrix in the saved dtype.

Pruned weights are stored as their row's zero-point code (dequantizing to exactly 0) rather than
through the mask: the kernels then read no mask and no per-row offsets. This costs memory:
at 50% unstructured sparsity and 4 bits the codes take 4 bits a weight against 2 + 1 (mask) in
the file; at 2:4 4 bits against 2 + 0.75.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from misq.algorithms.quantizer import FP_BITS
from misq.checkpoint.layer_format import has_mask, run_table
from misq.checkpoint.packing import Pattern, decode_nm, parse_pattern, unpack_bits, unpack_mask

WORD_BITS = 32


def pieces(bits: int) -> list[int]:
    """Powers of two that make up ``bits`` (descending): 3 -> [2, 1], 6 -> [4, 2], 4 -> [4]."""
    return [p for p in (8, 4, 2, 1) if bits & p]


@dataclass
class Segment:
    """One width's columns, in kernel layout (see the module docstring). ``start``: its first
    column in the gathered input; ``n``: its column count; ``words``: piece width -> int32 array."""

    bits: int
    start: int
    n: int
    words: dict[int, Tensor]
    scales: Tensor
    zeros: Tensor
    gidx: Tensor
    group_len: int

    def tensors(self) -> list[Tensor]:
        return [*self.words.values(), self.scales, self.zeros, self.gidx]


def block_cols(bits: int) -> int:
    """Columns per block of the word layout: 16 columns a tile, 32 // p_min tiles."""
    return 16 * (WORD_BITS // min(pieces(bits)))


def chunk_tiles(bits: int) -> int:
    """Tiles of 16 columns that the tensor-core kernel unpacks per ``tl.dot`` (a chunk of a block):
    up to 8, and at least two of piece A's slots (mma_kernel.py, ``_pk_chunk``)."""
    pmin, pmax = min(pieces(bits)), max(pieces(bits))
    return max(min(WORD_BITS // pmin, 8), 2 * (pmax // pmin))


def kernel_order(bits: int, n: int) -> Tensor:
    """int64 [nblk * 16 T]: the segment column that each position of the tensor-core kernel's
    reduction reads, block by block, chunk by chunk (positions past ``n`` give ``n``: padding).
    A chunk c of TC tiles pairs tile t = c TC/2 + i with tile t + T/2 (their codes sit 16 bits
    apart in the same words, so one 32-bit operation makes both fp16 weights); position
    k = (16 i + r) * 2 + j is column 16 (c TC/2 + i) + r + j * 16 T/2 of the block."""
    B = block_cols(bits)
    T, TC = B // 16, chunk_tiles(bits)
    k = torch.arange(16 * TC)
    i, r, j = k // 32, (k // 2) % 16, k % 2
    within = torch.cat([16 * (c * TC // 2 + i) + r + j * 8 * T for c in range(T // TC)])  # [B]
    cols = (torch.arange(-(-n // B))[:, None] * B + within[None, :]).reshape(-1)
    return cols.clamp(max=n)


def kernel_perm(perm: Tensor, segments: list[Segment]) -> Tensor:
    """int32 [sum of the segments' padded widths]: the input column (of x, before ``perm``) that
    each position of the tensor-core kernel reads; padding repeats a real column (its weights are
    masked to zero by the kernel)."""
    parts = [perm[(s.start + kernel_order(s.bits, s.n).clamp(max=s.n - 1)).to(perm.device)].to(torch.int32)
             for s in segments]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def pack_words(codes: Tensor, bits: int) -> dict[int, Tensor]:
    """codes int [R, n] (0 <= code < 2**bits) -> {p: int32 [nblk * 16 * H_p, R]} (module doc)."""
    R, n = codes.shape
    B = block_cols(bits)
    nb = -(-n // B)
    pmin = min(pieces(bits))
    T = WORD_BITS // pmin
    c = torch.zeros(R, nb * B, dtype=torch.int64, device=codes.device)
    c[:, :n] = codes.to(torch.int64)
    out = {}
    for p in pieces(bits):
        per, H = WORD_BITS // p, p // pmin
        part = ((c >> (bits & (p - 1))) & ((1 << p) - 1)).reshape(R, nb, per, H, 16)  # tile t = s * H + h
        shifts = (torch.arange(per, dtype=torch.int64, device=codes.device) * p).view(1, 1, per, 1, 1)
        word = (part << shifts).sum(2)  # [R, nb, H, 16], < 2**32
        word = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # same bits, signed
        out[p] = word.reshape(R, nb * H * 16).t().contiguous()
    assert T * 16 == B
    return out


def unpack_words(words: dict[int, Tensor], bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_words`: int32 codes [R, n] (on the words' device)."""
    code = None
    pmin = min(pieces(bits))
    for p, w in words.items():
        per, H = WORD_BITS // p, p // pmin
        R, nb = w.shape[1], w.shape[0] // (16 * H)
        shifts = (torch.arange(per, dtype=torch.int32, device=w.device) * p).view(1, 1, per, 1, 1)
        wt = w.t().reshape(R, nb, 1, H, 16)
        part = ((wt >> shifts) & ((1 << p) - 1)).reshape(R, -1)[:, :n]
        part = part << (bits & (p - 1))
        code = part if code is None else code | part
    assert code is not None
    return code


def _keep(tensors: dict[str, Tensor], meta: dict[str, Any], pattern: Pattern, R: int, C: int) -> Tensor:
    if pattern.kind == "dense" or (pattern.kind == "unstructured" and not has_mask(meta)):
        return torch.ones(R, C, dtype=torch.bool)
    if pattern.kind == "unstructured":
        return unpack_mask(tensors["mask"], (R, C))
    return decode_nm(tensors["nm_index"], pattern.n, pattern.m, (R, C))


def _group_len(run_len: list[int]) -> int:
    """The common length of every run but the last, or 0 when they differ."""
    if len(run_len) == 1:
        return 1 << 30  # one group: every column is group 0
    first = run_len[0]
    return first if all(r == first for r in run_len[:-1]) and run_len[-1] <= first else 0


def build_segments(tensors: dict[str, Tensor], meta: dict[str, Any], pattern: str | Pattern
                   ) -> tuple[Tensor, list[Segment], Tensor | None]:
    """From one layer's file tensors: (perm int32 [C], quantized segments, 16-bit columns
    [R, n_fp] in the saved dtype or None). ValueError if the tensors are inconsistent."""
    pat = pattern if isinstance(pattern, Pattern) else parse_pattern(str(pattern))
    R, C = int(meta["rows"]), int(meta["cols"])
    bits, run_len = run_table(tensors, meta)
    if bits.tolist() != [int(b) for b in meta["group_bits"]] or int(run_len.sum()) != C:
        raise ValueError("group widths or lengths disagree with config.json")
    perm = tensors["perm"].long() if "perm" in tensors else torch.arange(C)
    if not torch.equal(torch.sort(perm).values, torch.arange(C)):
        raise ValueError("the stored column order is not a permutation of the columns")
    kp = _keep(tensors, meta, pat, R, C)[:, perm]  # storage order
    pos_bits = torch.repeat_interleave(bits, run_len)
    quantized = bits < FP_BITS
    scale_col = torch.cumsum(quantized.long(), 0) - 1  # run -> its column in ``scales``
    order, segments, fp = [], [], None
    start = 0
    for b in sorted(set(bits.tolist())):
        idx = torch.nonzero(pos_bits == b).flatten()  # storage positions of width b, in order
        kb = kp[:, idx]
        n_kept = int(torch.count_nonzero(kb))
        if n_kept != int(meta["survivors"].get(str(b), -1)):
            raise ValueError(f"the mask keeps {n_kept} weights of width {b}, config.json says {meta['survivors'].get(str(b))}")
        order.append(perm[idx])
        runs = torch.nonzero(bits == b).flatten()
        if b >= FP_BITS:
            fp = torch.zeros(R, idx.numel(), dtype=tensors["fp_values"].dtype)
            fp[kb] = tensors["fp_values"]
            start += idx.numel()
            continue
        zeros = unpack_bits(tensors[f"zeros_w{b}"], b, R * runs.numel()).reshape(R, -1)  # [R, K_b]
        lens = run_len[runs]
        gidx = torch.repeat_interleave(torch.arange(runs.numel()), lens)  # [n_b] group in segment
        codes = zeros[:, gidx].clone()  # pruned weights: the zero-point code, which dequantizes to 0
        codes[kb] = unpack_bits(tensors[f"codes_w{b}"], b, n_kept)
        segments.append(Segment(
            bits=b, start=start, n=idx.numel(), words=pack_words(codes, b),
            scales=tensors["scales"][:, scale_col[runs]].t().contiguous().to(torch.float16),
            zeros=zeros.t().contiguous().to(torch.uint8 if b <= 8 else torch.int16),
            gidx=gidx.to(torch.int32), group_len=_group_len(lens.tolist())))
        start += idx.numel()
    return torch.cat(order).to(torch.int32), segments, fp


def dequantize_segment(seg: Segment, dtype: torch.dtype) -> Tensor:
    """The segment's weight [R, n] in ``dtype``: scale * (code - zero) in float32, as
    :func:`misq.checkpoint.layer_format.decode_layer` computes it, so the values are identical."""
    code = unpack_words(seg.words, seg.bits, seg.n).float()
    g = seg.gidx.long()
    scale = seg.scales.float()[g].t()  # [R, n]
    zero = seg.zeros.float()[g].t()
    return (scale * (code - zero)).to(dtype)


def dequantize(perm: Tensor, segments: list[Segment], fp: Tensor | None, rows: int,
               dtype: torch.dtype) -> Tensor:
    """The layer's dense weight [R, C] in the original column order."""
    parts = [dequantize_segment(s, dtype) for s in segments]
    if fp is not None:
        parts.append(fp.to(dtype))
    Wp = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return torch.empty_like(Wp).index_copy_(1, perm.long(), Wp)
