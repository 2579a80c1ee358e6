"""SparseGPT's unstructured pruning mask, one block of columns at a time, whole or split by rows.

The solver (:func:`misq.algorithms.sparsegpt.solve`) chooses, for every block of columns and
every row segment (one of the layers stacked into W), a threshold: the sorted saliency
w² / [H⁻¹]_jj² of the segment's block at index ⌊n·sparsity⌋; everything at or below it is pruned
(:func:`unstructured_keep`, the reference rule). The rule couples all rows of a segment, and
nothing else: rows of different segments never meet.

When several processes solve row slices of one stacked matrix (:mod:`misq.distributed`), each
gives ``solve`` a :class:`RowSplitKeep` as its ``keep_fn``: a segment cut by a slice boundary
takes its threshold from all of its rows, gathered from every process through a ``gather``
callable the caller supplies, so every process's slice of the mask equals the slice of the
single-process mask bit for bit. This module knows nothing of processes or models: ``gather``
is the only way out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

import torch
from torch import Tensor

# keep_fn(W1 [r, B], hdiag [B]) -> keep [r, B] bool: the mask of one block of a solve's rows.
KeepFn = Callable[[Tensor, Tensor], Tensor]


def per_segment_sparsity(sparsity: float | Sequence[float], segments: Sequence[int]) -> list[float]:
    """One sparsity fraction per row segment, from one value for all or one per segment."""
    out = [float(sparsity)] * len(segments) if isinstance(sparsity, (int, float)) else [float(s) for s in sparsity]
    if len(out) != len(segments):
        raise ValueError(f"{len(out)} sparsities for {len(segments)} row segments")
    return out


def unstructured_keep(W1: Tensor, hdiag: Tensor, sparsity: float | Sequence[float], segments: list[int]) -> Tensor:
    """[R, B] keep-mask of block W1 [R, B] (hdiag [B] = diag of H⁻¹'s Cholesky block): per row
    segment, prune the ``sparsity`` fraction with lowest saliency.

    ``sparsity``: one fraction for every segment, or one per segment (stacked layers that were
    given different sparsities, :mod:`misq.compress.sparsity_plan`). Matches the reference
    exactly: threshold = the sorted saliency at index ⌊n·sparsity⌋, prune everything ≤ threshold.
    Each segment's mask depends on that segment's rows only (the batched and the per-segment
    sorts give the same threshold values).
    """
    per_segment = per_segment_sparsity(sparsity, segments)
    if len(set(per_segment)) == 1:
        sparsity = per_segment[0]  # one value: the original code path, bit for bit
    sal = W1**2 / hdiag.reshape(1, -1) ** 2
    if isinstance(sparsity, float):
        if sparsity <= 0:
            return torch.ones_like(W1, dtype=torch.bool)
        if len(set(segments)) == 1:
            # Equal segments (q/k/v, gate/up): one batched sort, same thresholds.
            parts = sal.reshape(len(segments), -1)
            thresh = _sorted_at(parts, int(parts.shape[1] * sparsity))
            return (parts > thresh.unsqueeze(1)).reshape(W1.shape)
    keep = torch.ones_like(W1, dtype=torch.bool)
    start = 0
    for rows, frac in zip(segments, per_segment):
        if frac > 0:  # a segment left dense keeps everything (the threshold rule would prune its minimum)
            part = sal[start : start + rows]
            thresh = torch.sort(part.flatten())[0][int(part.numel() * frac)]
            keep[start : start + rows] = part > thresh
        start += rows
    return keep


def _sorted_at(parts: Tensor, k: int) -> Tensor:
    """[S]: each row's value at index k of its ascending sort, parts [S, n]. Several rows on a
    GPU: the least of the n − k largest, which is that value exactly, from a top-k select
    (half a sort's time for q/k/v and gate/up blocks on an H200); else the reference's sort."""
    if parts.is_cuda and parts.shape[0] > 1:
        return torch.topk(parts, parts.shape[1] - k, dim=1, sorted=False)[0].amin(dim=1)
    return torch.sort(parts, dim=1)[0][:, k]


def split_segments(segments: Sequence[int], rows: slice) -> list[tuple[int, slice]]:
    """The pieces of the row segments (row counts, stacked in order) that lie in ``rows``:
    (index of the segment, its rows inside the slice in the segment's own numbering), in order,
    empty pieces left out."""
    pieces = []
    for k, (end, n) in enumerate(zip(accumulate(segments), segments)):
        lo, hi = max(end - n, rows.start), min(end, rows.stop)
        if hi > lo:
            pieces.append((k, slice(lo - (end - n), hi - (end - n))))
    return pieces


class RowSplitKeep:
    """A ``keep_fn`` for one process's rows of a stacked matrix split by rows over processes.

    segments: row counts of the stacked layers (the whole matrix, R = Σ segments);
    sparsity: one fraction, or one per segment; slices: every process's rows, a partition of
    [0, R) in order; rank: this process's index into ``slices``; gather: x [r, B] (this
    process's rows of a block) -> [R, B] (every process's, in order), a collective every
    process calls at the same blocks. It is called only when some segment to be pruned is cut
    by a slice boundary; otherwise each process decides its own segments alone.
    """

    def __init__(self, sparsity: float | Sequence[float], segments: Sequence[int], slices: Sequence[slice], rank: int,
                 gather: Callable[[Tensor], Tensor]):
        self.per_segment = per_segment_sparsity(sparsity, segments)
        self.rows = slices[rank]
        self.gather = gather
        bounds = {s.start for s in slices[1:]}  # rows where one process's slice ends and the next begins
        ends = list(accumulate(segments))
        self.dense = all(f <= 0 for f in self.per_segment)
        self.needs_gather = any(f > 0 and any(e - n < b < e for b in bounds)
                                for e, n, f in zip(ends, segments, self.per_segment))
        pieces = split_segments(segments, self.rows)
        self.own_segments = [sl.stop - sl.start for _, sl in pieces]  # this slice's pieces of them
        self.own_sparsity = [self.per_segment[k] for k, _ in pieces]
        # The whole segments this slice touches: rows [lo, hi) of the stacked matrix.
        touched = [k for k, _ in pieces]
        self.lo = ends[touched[0]] - segments[touched[0]] if touched else self.rows.start
        self.hi = ends[touched[-1]] if touched else self.rows.stop
        self.sub_segments = [int(segments[k]) for k in touched]
        self.sub_sparsity = [self.per_segment[k] for k in touched]

    def __call__(self, W1: Tensor, hdiag: Tensor) -> Tensor:
        """keep [r, B] of this process's rows W1 [r, B] of a block, hdiag [B] its H⁻¹ diagonal."""
        if self.dense:
            return torch.ones_like(W1, dtype=torch.bool)
        if not self.needs_gather:  # every pruned segment lies whole in one slice (cut ones keep everything)
            return unstructured_keep(W1, hdiag, self.own_sparsity, self.own_segments)
        whole = self.gather(W1)[self.lo : self.hi]  # the touched segments' rows, from every process
        if not self.sub_segments:  # an empty slice still takes part in the gather
            return torch.ones_like(W1, dtype=torch.bool)
        keep = unstructured_keep(whole, hdiag, self.sub_sparsity, self.sub_segments)
        return keep[self.rows.start - self.lo : self.rows.stop - self.lo]
