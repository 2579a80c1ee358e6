"""Projections that read one input, run as one packed layer.

A decoder layer's q/k/v projections read the same x, and so do gate/up. misq solves each such
step as one stacked matrix, so where their widths are uniform they share one column order and
one layout (:func:`misq.compress.bitplan.solve_batches`): concatenated along the rows they are
one :class:`PackedLinear`. That is one gather of x and one kernel launch instead of three at
decode, and one dequantize and one larger GEMM at prefill. Rows are independent, so each row's
result is the same as before. The only difference is how far a split-K sum is cut, within fp16
rounding as before.

The model keeps its modules and its forward: each projection becomes a :class:`SharedInputSlice`
that returns its rows of the merged layer's output. The output is computed once per input
tensor and dropped once every slice has read it. Its views are strided, as a fused QKV
projection's split is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from misq.runtime.layout import Segment
from misq.runtime.linear import PackedLinear

log = logging.getLogger(__name__)


def mergeable(layers: Sequence[PackedLinear]) -> bool:
    """Whether ``layers`` read their input the same way: one column order, the same widths,
    column counts and scale groups, 16-bit columns and bias alike, one device and dtype."""
    first = layers[0]
    for other in layers[1:]:
        if (other.in_features != first.in_features or other.perm.device != first.perm.device
                or other.weight_dtype != first.weight_dtype or other._meta != first._meta
                or (other.bias is None) != (first.bias is None) or (other.fp_cols is None) != (first.fp_cols is None)
                or not torch.equal(other.perm, first.perm)):
            return False
        if not all(torch.equal(a.gidx, b.gidx) for a, b in zip(first.segments, other.segments)):
            return False
    return True


def merge_linears(layers: Sequence[PackedLinear]) -> PackedLinear:
    """One PackedLinear whose rows are ``layers``' rows in turn (``mergeable`` must hold): the
    words, scales and zeros [., R] concatenated along R, the 16-bit columns and bias alike."""
    first = layers[0]
    per_layer = [layer.segments for layer in layers]
    segments = []
    for i, seg in enumerate(per_layer[0]):
        parts = [segs[i] for segs in per_layer]
        segments.append(Segment(
            bits=seg.bits, start=seg.start, n=seg.n, group_len=seg.group_len, gidx=seg.gidx,
            words={p: torch.cat([s.words[p] for s in parts], dim=1) for p in seg.words},
            scales=torch.cat([s.scales for s in parts], dim=1), zeros=torch.cat([s.zeros for s in parts], dim=1)))
    fp = None if first.fp_cols is None else torch.cat([layer.fp_cols for layer in layers], dim=0)
    bias = None if first.bias is None else torch.cat([layer.bias for layer in layers])
    return PackedLinear(first.perm, segments, fp, sum(layer.out_features for layer in layers), bias,
                        first.weight_dtype)


class _SharedOutput:
    """The merged layer's last input and output, until each of ``readers`` slices has read it."""

    def __init__(self, readers: int):
        self.readers = readers
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.unread = 0


class SharedInputSlice(nn.Module):
    """Rows [start, stop) of a merged layer (``merged``, shared with its sibling slices). A call
    with the tensor the merged layer last saw reuses that output; any other input runs the
    merged layer, so a slice called alone, or twice, is still right, only slower."""

    def __init__(self, merged: PackedLinear, start: int, stop: int, shared: _SharedOutput):
        super().__init__()
        self.merged = merged
        self.start, self.stop = start, stop
        self.in_features, self.out_features = merged.in_features, stop - start
        self._shared = shared

    def forward(self, x: Tensor) -> Tensor:
        """x [..., C] -> [..., stop - start]: a view of the merged output's last dimension."""
        shared = self._shared
        if shared.x is not x:  # (dropped once all had read it: x is then None)
            shared.x, shared.y, shared.unread = x, self.merged(x), shared.readers
        y = shared.y[..., self.start:self.stop]
        shared.unread -= 1
        if shared.unread == 0:  # every slice has its rows: hold nothing between calls
            shared.x = shared.y = None
        return y

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop} of a merged {self.merged.out_features}-row layer"


def merge_shared_inputs(model: nn.Module, groups: Sequence[Sequence[str]]) -> int:
    """Replace, in every decoder layer of ``model.model.layers``, each group of projections that
    read one input (``groups``: names within a layer, e.g. ``("self_attn.q_proj", ...)``) by slices
    of one merged layer, where all of them are packed and :func:`mergeable`. Returns how many
    groups were merged; the others stay as they were."""
    merged_groups = 0
    for block in model.model.layers:
        for names in groups:
            if len(names) < 2:
                continue
            layers = [block.get_submodule(n) for n in names]
            if not all(isinstance(layer, PackedLinear) for layer in layers) or not mergeable(layers):
                continue
            merged = merge_linears(layers)
            shared = _SharedOutput(len(names))
            start = 0
            for name, layer in zip(names, layers):
                block.set_submodule(name, SharedInputSlice(merged, start, start + layer.out_features, shared))
                start += layer.out_features
            merged_groups += 1
    log.debug("merged %d groups of projections that read one input", merged_groups)
    return merged_groups
