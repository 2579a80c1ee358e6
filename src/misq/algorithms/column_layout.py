"""The order in which a layer's input channels are solved and stored, and its scale groups.

A layer's channels are split into *segments* (misq's channel groups), each with one width; the
segments are laid out one after another in a column order ``perm``, and each segment is cut
into *scale groups* of ``groupsize`` consecutive columns (the last one may be shorter), each
with its own (row, scale group) grid. ``groupsize`` 0 means one scale group per segment, the
per-row grid of GPTQ/SparseGPT when there is one segment.

This one description serves the solver (columns are solved in ``perm`` order, so GPTQ's
act-order is a ``perm`` sorted by the Hessian diagonal), the packed format (codes of a width are
one contiguous slice, and the file stores ``perm`` plus the segment table instead of a group id
per channel) and the size accounting (scale and zero count per scale group).

Everything here is pure tensor bookkeeping: no model, no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ColumnLayout:
    """perm: [C] int64, the solve/storage order (position -> original column);
    seg_bits / seg_len: [S] int64, each segment's width and column count, in ``perm`` order;
    groupsize: columns per scale group inside a segment (0: the whole segment)."""

    perm: Tensor
    seg_bits: Tensor
    seg_len: Tensor
    groupsize: int = 0

    def __post_init__(self) -> None:
        C = self.perm.numel()
        if int(self.seg_len.sum()) != C or self.seg_bits.numel() != self.seg_len.numel():
            raise ValueError(f"segments cover {int(self.seg_len.sum())} columns of {C}")
        if self.groupsize < 0:
            raise ValueError(f"groupsize {self.groupsize} must be >= 0")

    @property
    def columns(self) -> int:
        return int(self.perm.numel())

    @property
    def permuted(self) -> bool:
        """False when ``perm`` is the identity (then the file need not store it)."""
        return not torch.equal(self.perm.cpu(), torch.arange(self.columns))

    def scale_groups(self) -> list[tuple[int, int, int]]:
        """[(start, end, width)] of every scale group, in ``perm`` positions, in order."""
        out, start = [], 0
        for b, n in zip(self.seg_bits.tolist(), self.seg_len.tolist()):
            step = self.groupsize or n
            for s in range(start, start + n, max(step, 1)):
                out.append((s, min(s + step, start + n), int(b)))
            start += n
        return out

    def group_bits(self) -> Tensor:
        """[K] width of each scale group."""
        return torch.tensor([b for _, _, b in self.scale_groups()], dtype=torch.long)

    def group_of_position(self) -> Tensor:
        """[C] scale group of each position in ``perm`` order."""
        out = torch.empty(self.columns, dtype=torch.long)
        for k, (s, e, _) in enumerate(self.scale_groups()):
            out[s:e] = k
        return out

    def group_of_column(self) -> Tensor:
        """[C] scale group of each original column (what :class:`QuantGrid` calls ``groups``)."""
        out = torch.empty(self.columns, dtype=torch.long)
        out[self.perm.cpu()] = self.group_of_position()
        return out


def identity_layout(columns: int, bits: int, groupsize: int = 0) -> ColumnLayout:
    """One segment of width ``bits`` in the natural order: GPTQ without act-order."""
    return ColumnLayout(torch.arange(columns), torch.tensor([bits]), torch.tensor([columns]), groupsize)


def layout_for(channel_group: Tensor, group_bits: Tensor, *, hessian_diag: Tensor | None = None,
               act_order: bool = False, groupsize: int = 0) -> ColumnLayout:
    """Lay out channel groups (``channel_group`` [C] in [0, K), widths ``group_bits`` [K]).

    Segments come in descending width, so the channels that matter most (the allocator gave
    them the most bits) are solved first and the later ones absorb their errors, as GPTQ's
    act-order does for single columns; ties keep the group order. Inside a segment the columns
    keep their natural order, or with ``act_order`` descending ``hessian_diag`` [C] (GPTQ's
    ``argsort(diag(H), descending=True)``). With one group and ``act_order`` this is exactly
    GPTQ's act-order permutation.
    """
    channel_group = channel_group.cpu().long()
    group_bits = group_bits.cpu().long()
    C = channel_group.numel()
    order_groups = sorted(range(group_bits.numel()), key=lambda k: (-int(group_bits[k]), k))
    if act_order:
        if hessian_diag is None:
            raise ValueError("act_order needs the Hessian diagonal")
        within = torch.argsort(hessian_diag.detach().cpu().float(), descending=True, stable=True)
    else:
        within = torch.arange(C)
    rank = torch.empty(C, dtype=torch.long)
    rank[within] = torch.arange(C)
    parts, bits, lens = [], [], []
    for k in order_groups:
        cols = torch.nonzero(channel_group == k).flatten()
        if cols.numel() == 0:
            continue
        parts.append(cols[torch.argsort(rank[cols], stable=True)])
        bits.append(int(group_bits[k]))
        lens.append(int(cols.numel()))
    perm = torch.cat(parts)
    return ColumnLayout(perm, torch.tensor(bits), torch.tensor(lens), groupsize)


RUN_BITS = 8 + 32  # group_bits (uint8) + group_len (int32) per run of the packed format


def nm_metadata_bits(n: int, m: int) -> int:
    """Bits that record which N of every M weights survive: ceil(log2 C(M, N)) (2:4: 3 bits)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def segment_bits(rows: int, cols: int, width: int, *, groupsize: int = 0, density: float = 1.0,
                 mask_bits_per_weight: float = 0.0, permuted: bool = False, scale_bits: int = 16) -> float:
    """Honest bits a segment of ``rows`` x ``cols`` weights of ``width`` costs in the packed file.

    codes of the surviving weights (``density`` of them), the sparsity mask or N:M metadata
    (``mask_bits_per_weight``), per (row, scale group) an fp16 scale and a zero at the code
    width, and the column order's share (16 bits per column) when the layer is permuted. A
    width of 16 or more stores the surviving values in fp16 and no grid. The allocator prices
    every width choice with this, so that it spends the budget the file will really hold.
    """
    weights = rows * cols
    n_groups = math.ceil(cols / groupsize) if groupsize else 1
    # Each scale group is one run in the file's group table: a width (8 bits) and a length (32).
    total = weights * mask_bits_per_weight + (16 * cols if permuted else 0) + RUN_BITS * n_groups
    if width >= 16:
        return total + weights * density * 16
    return total + weights * density * width + rows * n_groups * (scale_bits + width)
