"""The stored form of one compressed linear layer (format 2; pure: tensors in, tensors out).

A layer's grid (:class:`~misq.algorithms.quantizer.QuantGrid`) has K scale groups, each a set
of input columns with one width and, per row, one (scale, zero). The file lays the columns out
in *storage order* ``perm``: the order the solver took them in (act-order, width segments) or,
for a grid solved in the natural order, the columns sorted by group. Every group is then one
run of consecutive positions, so the file needs no group id per column, only each run's length
and width. Per layer (``R`` rows, ``C`` columns, widths ``b``):

==================  =======================================================================
``codes_w{b}``      the surviving weights' codes of the columns of width b, row-major over
                    [R, those columns in storage order], bit-packed at b bits
``fp_values``       surviving values of 16-bit (unquantized) columns, in the weight's dtype
``scales``          fp16 [R, Kq]: the scale of each quantized group (Kq groups below 16 bits)
``zeros_w{b}``      the zero-points of the groups of width b, [R, K_b] row-major, at b bits
``perm``            int16 [C] (int32 past 32767 columns) storage order; absent when natural
``group_bits``      uint8 [K] each run's width; ``group_len`` int32 [K] each run's length
                    (absent when the layer is *regular*: one width, runs of G; config.json's
                    ``regular_groupsize`` and ``group_bits`` say so, as GPTQ's quantize config does)
``mask``/``nm_index``  the sparsity pattern (:mod:`misq.checkpoint.packing`), original order;
                    under an unstructured pattern a layer whose zeros cost fewer bits as codes
                    at the zero point than a mask does (few pruned weights, e.g. a layer the
                    sparsity allocation left dense) stores none (meta ``masked: false``)
==================  =======================================================================

Zeros at the code width and no per-column group ids are what make group-wise grids cheap:
GPTQ 3-bit with groups of 128 costs 3 + 19/128 bits per weight (docs/bit-accounting.md).
:func:`layer_nbytes` gives the byte count of every tensor from the same description, so the
size accounting and the file cannot disagree.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from misq.algorithms.quantizer import FP_BITS, QuantGrid, from_codes, to_codes
from misq.checkpoint.packing import (
    Pattern,
    decode_nm,
    encode_nm,
    keep_mask,
    mask_nbytes,
    nm_nbytes,
    pack_bits,
    pack_mask,
    packed_nbytes,
    parse_pattern,
    unpack_bits,
    unpack_mask,
)

LAYER_FORMAT = 2
_ROW_CHUNK = 1 << 18  # elements per row block: small temporaries stay in cache


@dataclass
class PackedLayer:
    """tensors: suffix -> tensor (see the module docstring); meta: JSON-ready rows, cols,
    groups (K), group_bits, permuted, dtype, survivors {width: count}, layer_format."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _pattern(pattern: str | Pattern) -> Pattern:
    return pattern if isinstance(pattern, Pattern) else parse_pattern(str(pattern))


def stored_grid(grid: QuantGrid) -> QuantGrid:
    """``grid`` as the checkpoint holds it: scales through fp16, unquantized groups' grid 0."""
    bits = grid.bits.detach().cpu().long()
    fp = (bits >= FP_BITS).unsqueeze(0)
    scale = torch.where(fp, 0.0, grid.scale.detach().cpu().float()).to(torch.float16)
    zero = torch.where(fp, 0.0, grid.zero.detach().cpu().float())
    order = None if grid.order is None else grid.order.detach().cpu().long()
    return QuantGrid(scale=scale.float(), zero=zero, groups=grid.groups.detach().cpu().long(), bits=bits, order=order)


def storage_order(grid: QuantGrid) -> tuple[Tensor, Tensor, Tensor]:
    """(perm [C], run_group [K'], run_len [K']): the storage order and, in it, the group and
    length of each run of columns. ValueError if a group's columns are not consecutive in
    ``grid.order`` (the solver's layouts always make them so)."""
    groups = grid.groups.cpu().long()
    perm = grid.order.cpu().long() if grid.order is not None else torch.argsort(groups, stable=True)
    at = groups[perm]
    starts = torch.ones_like(at, dtype=torch.bool)
    starts[1:] = at[1:] != at[:-1]
    run_group = at[starts]
    if run_group.numel() != torch.unique(at).numel():
        raise ValueError("a scale group's columns are not consecutive in the grid's column order")
    bounds = torch.nonzero(starts).flatten().tolist() + [at.numel()]
    run_len = torch.tensor([b - a for a, b in itertools.pairwise(bounds)], dtype=torch.long)
    return perm, run_group, run_len


def _perm_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= 32767 else torch.int32


def _row_chunks(R: int, n_cols: int) -> list[slice]:
    step = max(1, _ROW_CHUNK // max(n_cols, 1))
    return [slice(r, min(r + step, R)) for r in range(0, R, step)]


def _stored_keep(W: Tensor, pat: Pattern, col_bits: Tensor) -> tuple[Tensor, bool]:
    """(keep [R, C] of the weights stored as codes or values, whether a mask is stored).

    Under an unstructured pattern the mask costs one bit per weight; without it every zero is
    stored like any weight (a code at the zero point, or a 16-bit value). The cheaper wins, the
    mask on a tie (so 50% at 2 bits stores one, as before). ``col_bits`` [C]: each column's width.
    """
    keep = keep_mask(W, pat)
    if pat.kind != "unstructured":
        return keep, False
    zero_cost = int(((~keep).sum(0).long() * col_bits.long()).sum())
    if mask_nbytes(keep.numel()) * 8 <= zero_cost:
        return keep, True
    return torch.ones_like(keep), False


def encode_layer(weight: Tensor, grid: QuantGrid, pattern: str | Pattern, *, verify: bool = True) -> PackedLayer:
    """Encode weight [R, C] (pruned and quantized on ``grid``) for ``pattern``.

    With ``verify`` (the default, and what checkpoints use) raises ValueError if the weight is
    not exactly what its grid (through fp16) and the mask reproduce, so a checkpoint that saved
    is a checkpoint that reloads bit for bit.
    """
    pat = _pattern(pattern)
    W = weight.detach().cpu()
    R, C = W.shape
    if grid.groups.numel() != C or tuple(grid.scale.shape) != (R, grid.n_groups) or tuple(grid.zero.shape) != (R, grid.n_groups):
        raise ValueError(f"grid (scale {list(grid.scale.shape)}, {grid.groups.numel()} channels) does not fit weight {[R, C]}")
    if int(grid.bits.max()) > FP_BITS or int(grid.bits.min()) < 1:
        raise ValueError(f"group widths {grid.bits.tolist()} are outside 1..{FP_BITS}")
    g = stored_grid(grid)
    perm, run_group, run_len = storage_order(g)
    bits = g.bits[run_group]
    pos_group = torch.repeat_interleave(torch.arange(run_group.numel()), run_len)
    sg = QuantGrid(scale=g.scale[:, run_group], zero=g.zero[:, run_group], groups=pos_group, bits=bits)
    keep, masked = _stored_keep(W, pat, g.bits[g.groups])
    Wp, kp = W[:, perm], keep[:, perm]
    out = PackedLayer()
    survivors: dict[str, int] = {}
    pos_bits = bits[pos_group]
    for b in sorted(set(bits.tolist())):
        idx = torch.nonzero(pos_bits == b).flatten()
        sub_grid = QuantGrid(scale=sg.scale, zero=sg.zero, groups=pos_group[idx], bits=bits)
        parts, bad = [], 0
        for rows in _row_chunks(R, idx.numel()):
            Wb, kb = Wp[rows][:, idx], kp[rows][:, idx]
            if b >= FP_BITS:
                parts.append(Wb[kb])
                continue
            rg = QuantGrid(scale=sub_grid.scale[rows], zero=sub_grid.zero[rows], groups=sub_grid.groups, bits=bits)
            codes = _exact_codes(Wb, rg, b)
            if verify:
                back = torch.where(kb, from_codes(codes, rg), 0.0).to(W.dtype)
                bad += int(torch.count_nonzero(back != Wb))
            parts.append(codes[kb])
        if bad:
            raise ValueError(f"{bad} weights of the {b}-bit columns are not on their grid (or not pruned to exact 0)")
        values = torch.cat(parts)
        survivors[str(b)] = values.numel()
        if b >= FP_BITS:
            out.tensors["fp_values"] = values
            continue
        out.tensors[f"codes_w{b}"] = pack_bits(values, b)
        zeros = sg.zero[:, bits == b]
        out.tensors[f"zeros_w{b}"] = pack_bits(zeros.round().to(torch.int32).flatten(), b)
    quantized = bits < FP_BITS
    if bool(quantized.any()):
        out.tensors["scales"] = sg.scale[:, quantized].to(torch.float16).contiguous()
    if masked:
        out.tensors["mask"] = pack_mask(keep)
    elif pat.kind == "nm":
        out.tensors["nm_index"] = encode_nm(keep, pat.n, pat.m)
    permuted = not torch.equal(perm, torch.arange(C))
    if permuted:
        out.tensors["perm"] = perm.to(_perm_dtype(C))
    out.meta = {"rows": R, "cols": C, "groups": int(bits.numel()), "group_bits": bits.tolist(), "permuted": permuted,
                "dtype": str(W.dtype).replace("torch.", ""), "survivors": survivors, "layer_format": LAYER_FORMAT}
    if pat.kind == "unstructured" and not masked:
        out.meta["masked"] = False  # absent means a mask, as in every file before this choice
    regular = regular_groupsize(bits, run_len)
    if regular:  # one width, runs of G: the table follows from (width, G), which meta holds
        out.meta["regular_groupsize"] = regular
    else:
        out.tensors["group_bits"] = bits.to(torch.uint8)
        out.tensors["group_len"] = run_len.to(torch.int32)
    return out


def regular_groupsize(bits: Tensor, run_len: Tensor) -> int:
    """G when every run has the same width and the runs are G, G, ..., G, rest (GPTQ's own
    layout, with or without act-order); else 0. Such a layer stores no group table."""
    if torch.unique(bits).numel() != 1:
        return 0
    G, C = int(run_len[0]), int(run_len.sum())
    expected = [G] * (C // G) + ([C % G] if C % G else [])
    return G if run_len.tolist() == expected else 0


def run_table(tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(group_bits [K], group_len [K]) of a stored layer: its table, or the regular one."""
    G = int(meta.get("regular_groupsize") or 0)
    if not G:
        return tensors["group_bits"].long(), tensors["group_len"].long()
    C, K = int(meta["cols"]), int(meta["groups"])
    lens = [G] * (C // G) + ([C % G] if C % G else [])
    if len(lens) != K or len(set(meta["group_bits"])) != 1:
        raise ValueError("the regular group layout disagrees with the group count")
    return torch.tensor([int(b) for b in meta["group_bits"]], dtype=torch.long), torch.tensor(lens, dtype=torch.long)


def _exact_codes(Wb: Tensor, grid: QuantGrid, bits: int) -> Tensor:
    """Codes [r, n] whose dequantized value, rounded to Wb's dtype, is Wb exactly.

    The nearest code is that one unless the dtype is coarser than the grid: bfloat16 keeps 8
    significant bits, so at 8 bits two neighbouring codes far from the zero point can round to
    the same or to swapped values. The neighbours are tried then, so that the file still reloads
    bit for bit.
    """
    codes = to_codes(Wb, grid)
    if Wb.dtype == torch.float32:
        return codes
    bad = (from_codes(codes, grid).to(Wb.dtype) != Wb) & (Wb != 0)
    for delta in (-1, 1):
        if not bool(bad.any()):
            break
        cand = (codes + delta).clamp(0, 2**bits - 1)
        fixed = bad & (from_codes(cand, grid).to(Wb.dtype) == Wb)
        codes = torch.where(fixed, cand, codes)
        bad &= ~fixed
    return codes


def expected_shapes(meta: dict[str, Any], pattern: Pattern) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Suffix -> (shape, dtype) every tensor of a layer must have (dtype None: the weight's)."""
    R, C, K = int(meta["rows"]), int(meta["cols"]), int(meta["groups"])
    bits = [int(b) for b in meta["group_bits"]]
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    if not meta.get("regular_groupsize"):
        shapes.update({"group_bits": ((K,), torch.uint8), "group_len": ((K,), torch.int32)})
    n_quantized = sum(b < FP_BITS for b in bits)
    if n_quantized:
        shapes["scales"] = ((R, n_quantized), torch.float16)
    if meta.get("permuted"):
        shapes["perm"] = ((C,), _perm_dtype(C))
    for b_text, n in meta["survivors"].items():
        b, n = int(b_text), int(n)
        if b >= FP_BITS:
            shapes["fp_values"] = ((n,), None)
            continue
        shapes[f"codes_w{b}"] = ((packed_nbytes(n, b),), torch.uint8)
        shapes[f"zeros_w{b}"] = ((packed_nbytes(R * bits.count(b), b),), torch.uint8)
    if pattern.kind == "unstructured" and has_mask(meta):
        shapes["mask"] = ((mask_nbytes(R * C),), torch.uint8)
    elif pattern.kind == "nm":
        shapes["nm_index"] = ((nm_nbytes(R, C, pattern.n, pattern.m),), torch.uint8)
    return shapes


def has_mask(meta: dict[str, Any]) -> bool:
    """Whether a layer of an unstructured pattern stores its mask (files before the choice always do)."""
    return bool(meta.get("masked", True))


def layer_nbytes(meta: dict[str, Any], pattern: str | Pattern, weight_element_size: int = 2) -> dict[str, int]:
    """Bytes of each tensor of a layer described by ``meta`` (what :func:`encode_layer` writes)."""
    out = {}
    for suffix, (shape, dtype) in expected_shapes(meta, _pattern(pattern)).items():
        n = 1
        for s in shape:
            n *= s
        out[suffix] = n * (weight_element_size if dtype is None else torch.empty(0, dtype=dtype).element_size())
    return out


def describe_layer(weight: Tensor, grid: QuantGrid, pattern: str | Pattern) -> dict[str, Any]:
    """The ``meta`` :func:`encode_layer` would write, without encoding (for size accounting)."""
    pat = _pattern(pattern)
    W = weight.detach().cpu()
    R, C = W.shape
    g = stored_grid(grid)
    perm, run_group, run_len = storage_order(g)
    bits = g.bits[run_group]
    pos_bits = torch.repeat_interleave(bits, run_len)
    keep, masked = _stored_keep(W, pat, g.bits[g.groups])
    kept = keep[:, perm].sum(0)  # [C] survivors per position
    survivors = {str(b): int(kept[pos_bits == b].sum()) for b in sorted(set(bits.tolist()))}
    meta = {"rows": R, "cols": C, "groups": int(bits.numel()), "group_bits": bits.tolist(),
            "permuted": not torch.equal(perm, torch.arange(C)), "dtype": str(W.dtype).replace("torch.", ""),
            "survivors": survivors, "layer_format": LAYER_FORMAT}
    if pat.kind == "unstructured" and not masked:
        meta["masked"] = False
    regular = regular_groupsize(bits, run_len)
    if regular:
        meta["regular_groupsize"] = regular
    return meta


def decode_layer(tensors: dict[str, Tensor], meta: dict[str, Any], pattern: str | Pattern,
                 dtype: torch.dtype | None = None) -> Tensor:
    """Rebuild the dense weight [R, C] exactly as the solver left it (ValueError if inconsistent).

    Codes are dequantized in float32, then cast to ``dtype`` (default: the dtype the layer was
    saved in); pruned weights are 0; 16-bit columns are copied.
    """
    pat = _pattern(pattern)
    R, C = int(meta["rows"]), int(meta["cols"])
    dtype = dtype or getattr(torch, meta["dtype"])
    bits, run_len = run_table(tensors, meta)
    if bits.tolist() != [int(b) for b in meta["group_bits"]] or int(run_len.sum()) != C or int(run_len.min()) < 1:
        raise ValueError("group widths or lengths disagree with config.json")
    K = bits.numel()
    perm = tensors["perm"].long() if "perm" in tensors else torch.arange(C)
    if not torch.equal(torch.sort(perm).values, torch.arange(C)):
        raise ValueError("the stored column order is not a permutation of the columns")
    pos_group = torch.repeat_interleave(torch.arange(K), run_len)
    scale = torch.zeros(R, K)
    zero = torch.zeros(R, K)
    quantized = bits < FP_BITS
    if bool(quantized.any()):
        scale[:, quantized] = tensors["scales"].float()
    for b in sorted(set(bits[quantized].tolist())):
        cols = bits == b
        zero[:, cols] = unpack_bits(tensors[f"zeros_w{b}"], b, R * int(cols.sum())).reshape(R, -1).float()
    if pat.kind == "dense":
        keep = torch.ones(R, C, dtype=torch.bool)
    elif pat.kind == "unstructured":
        keep = unpack_mask(tensors["mask"], (R, C)) if has_mask(meta) else torch.ones(R, C, dtype=torch.bool)
    else:
        keep = decode_nm(tensors["nm_index"], pat.n, pat.m, (R, C))
    kp = keep[:, perm]
    Wp = torch.zeros(R, C, dtype=dtype)  # in storage order
    pos_bits = bits[pos_group]
    for b in sorted(set(bits.tolist())):
        idx = torch.nonzero(pos_bits == b).flatten()
        kb_all = kp[:, idx]
        n = int(torch.count_nonzero(kb_all))
        if n != int(meta["survivors"].get(str(b), -1)):
            raise ValueError(f"the mask keeps {n} weights in the {b}-bit columns, config.json says {meta['survivors'].get(str(b))}")
        values = tensors["fp_values"].to(dtype) if b >= FP_BITS else unpack_bits(tensors[f"codes_w{b}"], b, n)
        offset = 0
        for rows in _row_chunks(R, idx.numel()):
            kb = kb_all[rows]
            k = int(torch.count_nonzero(kb))
            sub = torch.zeros(kb.shape, dtype=values.dtype)
            sub[kb] = values[offset : offset + k]
            offset += k
            if b < FP_BITS:
                rg = QuantGrid(scale=scale[rows], zero=zero[rows], groups=pos_group[idx], bits=bits)
                sub = torch.where(kb, from_codes(sub, rg), 0.0)
            Wp[rows.start : rows.stop, idx] = sub.to(dtype)
    return torch.empty_like(Wp).index_copy_(1, perm, Wp)
