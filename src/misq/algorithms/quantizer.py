"""Asymmetric min-max weight quantization with a bit-width per channel group.

The unit of quantization is (output row, input-channel group): each has one grid
``(scale, zero)`` and every channel of a group shares one bit-width. With one group and one
width this is exactly GPTQ/SparseGPT's per-channel ("per-row") quantizer, which misq must
match for reference parity:

    xmin = min(row.min(), 0)     xmax = max(row.max(), 0)     (0 is always on the grid)
    scale = (xmax - xmin) / maxq   zero = round(-xmin / scale)   maxq = 2**bits - 1
    q = clamp(round(w / scale) + zero, 0, maxq)        w_hat = scale * (q - zero)

Scales are rounded to fp16 as soon as they are found, because the checkpoint stores them in
fp16: the weights the solver writes are then exactly what a reload dequantizes. Zeros are
integers in [0, maxq], exact in fp16. A width of 16 (or more) means "keep the weight".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP_BITS = 16  # a width at or above this is not quantized


@dataclass
class QuantGrid:
    """Grids for one linear layer.

    scale, zero: [R, K] float32 (scale fp16-representable, zero integral)
    groups:      [C] int64, the group of each input channel (column)
    bits:        [K] int64, the width of each group
    order:       [C] int64 or None, the order the solver took the columns in (act-order, width
                 segments); each group is a run of consecutive columns in it. None: the
                 natural order (the packed format then orders columns by group itself).
    """

    scale: Tensor
    zero: Tensor
    groups: Tensor
    bits: Tensor
    order: Tensor | None = None

    @property
    def n_groups(self) -> int:
        return int(self.bits.numel())

    def column_bits(self) -> Tensor:
        """[C] width of every input channel."""
        return self.bits[self.groups]

    def column_grid(self, start: int = 0, end: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-column views for columns [start, end): scale [R, n], zero [R, n], maxq [n] (float32).

        maxq is +inf for unquantized (16-bit) columns; :func:`quantize` passes those through.
        """
        g = self.groups[start:end]
        return self.scale[:, g], self.zero[:, g], maxq_of(self.bits)[g]


@dataclass
class StackedGrid:
    """The grids of layers stacked by rows (R = Σ r_i), handed out by columns on demand.

    The solver needs (scale, zero, maxq) per weight of each block of columns it sweeps; storing
    them for the whole [R, C] matrix took three extra fp32 copies of the layer (2.8 GB for a 70B
    down_proj, twice while permuting), so this keeps each layer's [r_i, K_i] grids and expands
    one block at a time.
    """

    grids: list[QuantGrid]

    def columns(self, cols: Tensor | slice, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, zero, maxq), each [R, n] float32 on ``device``, for columns ``cols`` (indices
        [n] in any order, or a slice)."""
        parts = []
        for g in self.grids:
            idx = g.groups.to(device)[cols]
            maxq = maxq_of(g.bits.to(device))[idx]
            parts.append((g.scale.to(device)[:, idx], g.zero.to(device)[:, idx], maxq.unsqueeze(0).expand(g.scale.shape[0], -1)))
        if len(parts) == 1:
            return parts[0][0], parts[0][1], parts[0][2].contiguous()
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))


def maxq_of(bits: Tensor) -> Tensor:
    """[K] largest code for each width (float32), +inf for widths >= 16."""
    bits = bits.to(torch.float32)
    return torch.where(bits >= FP_BITS, torch.full_like(bits, float("inf")), 2.0**bits - 1.0)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: Tensor) -> Tensor:
    """Round ``w`` to its grid and dequantize (float32, same shape as ``w``).

    w: [R, n] or [R]; scale, zero broadcast to w; maxq: [n] or scalar (inf = keep w).
    """
    q = torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), maxq)
    out = scale * (q - zero)
    return torch.where(torch.isinf(maxq), w, out)


def _fp16_exact(scale: Tensor) -> Tensor:
    """Round scales to fp16 (what the checkpoint stores), never to zero."""
    s16 = scale.to(torch.float16)
    tiny = torch.tensor(torch.finfo(torch.float16).smallest_normal, dtype=torch.float16, device=scale.device)
    return torch.where(s16 > 0, s16, tiny).to(torch.float32)


def _minmax(xmin: Tensor, xmax: Tensor, maxq: Tensor) -> tuple[Tensor, Tensor]:
    """GPTQ's grid from a range: [R, K] each, range forced to contain 0."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    finite_maxq = torch.where(torch.isinf(maxq), torch.full_like(maxq, 2.0**FP_BITS - 1), maxq)
    scale = _fp16_exact((xmax - xmin) / finite_maxq)
    # In [0, maxq] already unless the scale underflowed fp16 (weights below ~1e-7): the clamp
    # keeps every zero storable at the code width (the packed format stores it so).
    zero = torch.minimum(torch.round(-xmin / scale), finite_maxq)
    return scale, zero


def find_grid(
    W: Tensor,
    groups: Tensor,
    bits: Tensor,
    *,
    mse: bool = False,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
    keep: Tensor | None = None,
    chunk_elements: int = 2**25,
) -> QuantGrid:
    """Min-max grid per (row, group) of ``W`` [R, C]; ``groups`` [C] in [0, K), ``bits`` [K].

    With ``mse`` the range is shrunk symmetrically towards 0 in ``grid`` steps (at most
    ``maxshrink``) and the shrink with the lowest sum |w - w_hat|**norm per (row, group) is kept,
    as GPTQ's ``mse=True`` does. ``keep`` [R, C] bool: only these weights count in that sum
    (the ones expected to survive pruning: the pruned ones become exact zeros, which are on
    every grid). Without it, at 50% sparsity the small weights about to be pruned pull the
    range in and clip the survivors. The min-max range itself always spans all of ``W``.

    Rows are independent, so they are taken ``chunk_elements`` weights at a time: the search's
    temporaries stay ~1 GiB for a 70B gate_proj (28672 x 8192) instead of several.
    """
    R, C = W.shape
    K = int(bits.numel())
    groups = groups.to(device=W.device, dtype=torch.long)
    bits = bits.to(device=W.device, dtype=torch.long)
    if groups.numel() != C:
        raise ValueError(f"groups has {groups.numel()} entries for {C} columns")
    step = max(1, chunk_elements // max(C, 1))
    parts = [_grid_rows(W[r : r + step].to(torch.float32), groups, bits, K, mse, norm, grid, maxshrink,
                        None if keep is None else keep[r : r + step])
             for r in range(0, R, step)]
    scale = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
    zero = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
    return QuantGrid(scale=scale, zero=zero, groups=groups, bits=bits)


def _grid_rows(W: Tensor, groups: Tensor, bits: Tensor, K: int, mse: bool, norm: float, grid: int,
               maxshrink: float, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """(scale, zero) [r, K] of rows W [r, C] (float32): :func:`find_grid` for one chunk of rows."""
    R = W.shape[0]
    # Per-(row, group) range as plain reductions over each group's columns: a scatter_reduce
    # with atomics on K addresses per row was 150x slower on a GPU for the same result.
    xmin = torch.full((R, K), float("inf"), device=W.device)
    xmax = torch.full((R, K), float("-inf"), device=W.device)
    order = torch.argsort(groups, stable=True)
    Ws = W[:, order] if K > 1 else W
    start = 0
    for k, n in enumerate(torch.bincount(groups, minlength=K).tolist()):
        if n:
            xmin[:, k] = Ws[:, start : start + n].amin(1)
            xmax[:, k] = Ws[:, start : start + n].amax(1)
        start += n
    del Ws
    maxq = maxq_of(bits).unsqueeze(0)  # [1, K]
    scale, zero = _minmax(xmin, xmax, maxq)
    if mse:
        best = torch.full((R, K), float("inf"), device=W.device)
        col_maxq = maxq[0, groups]
        for i in range(int(maxshrink * grid)):
            p = 1.0 - i / grid
            s1, z1 = _minmax(p * xmin, p * xmax, maxq)
            err = (quantize(W, s1[:, groups], z1[:, groups], col_maxq) - W).abs_().pow_(norm)
            if keep is not None:
                err.mul_(keep)
            err = torch.zeros((R, K), device=W.device).index_add_(1, groups, err)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def uniform_grid(W: Tensor, wbits: int, *, mse: bool = False) -> QuantGrid:
    """One group, one width: the reference per-row quantizer."""
    C = W.shape[1]
    groups = torch.zeros(C, dtype=torch.long, device=W.device)
    return find_grid(W, groups, torch.tensor([wbits], device=W.device), mse=mse)


def quantize_with_grid(W: Tensor, grid: QuantGrid) -> Tensor:
    """Round-to-nearest of the whole matrix ``W`` [R, C] on ``grid`` (float32)."""
    scale, zero, maxq = grid.column_grid()
    return quantize(W.to(torch.float32), scale, zero, maxq)


def to_codes(W_hat: Tensor, grid: QuantGrid) -> Tensor:
    """Integer codes [R, C] (int32) of already-quantized weights ``W_hat``.

    Exact for weights produced by :func:`quantize` on ``grid``, also after a round trip through
    fp16, because a step is far wider than fp16's rounding of w_hat. Unquantized columns get 0.
    """
    scale, zero, maxq = grid.column_grid()
    finite = ~torch.isinf(maxq)
    q = torch.round(W_hat.to(torch.float32) / scale + zero)
    q = torch.clamp(q, torch.zeros_like(maxq), torch.where(finite, maxq, torch.zeros_like(maxq)))
    return q.to(torch.int32)


def from_codes(codes: Tensor, grid: QuantGrid) -> Tensor:
    """Dequantize codes [R, C] back to float32 weights (unquantized columns are not handled here)."""
    scale, zero, _ = grid.column_grid()
    return scale * (codes.to(torch.float32) - zero)
