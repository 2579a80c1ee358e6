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

A LLaMA-style MLP, down(SiLU(gate(x)) * up(x)), goes one step further (:class:`GatedMLP`): gate
and up are merged with their rows interleaved (:func:`merge_gated`), and the merged layer
returns SiLU(gate) * up itself. At decode the kernel's last program for each slice of
features makes it from its float32 sums, so the activation is not a kernel of its own (a
launch, and the gate/up output written and read back, each decode step of each layer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


def merge_gated(gate: PackedLinear, up: PackedLinear) -> PackedLinear:
    """One gated PackedLinear (``glu``) of ``gate`` and ``up`` (mergeable, as many rows each):
    gate's row i is its row 2i, up's row i its row 2i + 1, so each kernel program's slice of
    features holds whole pairs and forward returns SiLU(gate) * up."""
    if gate.out_features != up.out_features:
        raise ValueError(f"gate and up differ in rows ({gate.out_features}, {up.out_features})")

    def pairs(a: Tensor, b: Tensor, dim: int) -> Tensor:  # a's and b's slices along dim, in turn
        return torch.stack([a, b], dim=dim + 1).flatten(dim, dim + 1)

    segments = [Segment(bits=g.bits, start=g.start, n=g.n, group_len=g.group_len, gidx=g.gidx,
                        words={p: pairs(g.words[p], u.words[p], 1) for p in g.words},
                        scales=pairs(g.scales, u.scales, 1), zeros=pairs(g.zeros, u.zeros, 1))
                for g, u in zip(gate.segments, up.segments, strict=True)]
    fp = None if gate.fp_cols is None else pairs(gate.fp_cols, up.fp_cols, 0)
    bias = None if gate.bias is None else pairs(gate.bias, up.bias, 0)
    return PackedLinear(gate.perm, segments, fp, 2 * gate.out_features, bias, gate.weight_dtype, glu=True)


# The MLPs whose forward is down(SiLU(gate(x)) * up(x)) (transformers' LLaMA family,
# misq.models.layout.KNOWN_MODEL_TYPES; Gemma's gates with GELU)
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _is_silu(act: nn.Module) -> bool:
    probe = torch.linspace(-8, 8, 33)
    return torch.allclose(act(probe), F.silu(probe))


class GatedMLP(nn.Module):
    """A LLaMA-style MLP, down(SiLU(gate(x)) * up(x)), with gate and up as one gated packed layer
    (:func:`merge_gated`) that returns the activation."""

    def __init__(self, gate_up: PackedLinear, down_proj: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down_proj

    def forward(self, x: Tensor) -> Tensor:
        """x [..., hidden] -> [..., hidden]."""
        return self.down_proj(self.gate_up(x))


def _gated_mlp(block: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    """(its name in ``block``, the MLP) if ``names`` are the gate and up projections of a
    LLaMA-style MLP (GATED_MLPS, SiLU), else None."""
    parents = {n.rpartition(".")[0] for n in names}
    if len(names) != 2 or len(parents) != 1 or [n.rpartition(".")[2] for n in names] != ["gate_proj", "up_proj"]:
        return None
    parent = parents.pop()
    if not parent:
        return None
    mlp = block.get_submodule(parent)
    if type(mlp).__name__ not in GATED_MLPS or not _is_silu(getattr(mlp, "act_fn", nn.Identity())):
        return None
    return parent, mlp


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


def merge_shared_inputs(model: nn.Module, groups: Sequence[Sequence[str]], gated: bool = True) -> int:
    """Replace, in every decoder layer of ``model.model.layers``, each group of projections that
    read one input (``groups``: names within a layer, e.g. ``("self_attn.q_proj", ...)``) by slices
    of one merged layer, where all of them are packed and :func:`mergeable`; a LLaMA-style MLP's
    gate and up, with ``gated``, by a :class:`GatedMLP` instead. Returns how many groups were
    merged; the others stay as they were."""
    merged_groups = 0
    for block in model.model.layers:
        for names in groups:
            if len(names) < 2:
                continue
            layers = [block.get_submodule(n) for n in names]
            if not all(isinstance(layer, PackedLinear) for layer in layers) or not mergeable(layers):
                continue
            mlp = _gated_mlp(block, names) if gated else None
            if mlp is not None and layers[0].out_features == layers[1].out_features:
                block.set_submodule(mlp[0], GatedMLP(merge_gated(*layers), mlp[1].down_proj))
                merged_groups += 1
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
