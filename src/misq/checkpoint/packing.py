"""Bit-level encoding of one compressed linear layer (pure: tensors in, tensors out, no files).

Three encodings, each exact and each a whole number of bytes:

* **codes** of width b (1..16): ``n`` values become ``b`` bit-planes of ``ceil(n/8)`` bytes each,
  plane 0 holding every value's most significant bit (``np.packbits`` order: first value in the
  high bit of the first byte). Bit-planes let numpy do the work with one ``packbits`` per plane,
  in cache-sized chunks, which packs 70M 4-bit codes in well under a second.
* **unstructured mask**: one bit per weight, row-major, ``np.packbits`` order.
* **N:M metadata**: for each run of M consecutive columns of a row, the index of its set of N
  kept positions among the C(M, N) lexicographic combinations, stored as codes of
  ``ceil(log2 C(M, N))`` bits (2:4: 3 bits per 4 weights = 0.75 bit/weight).

:func:`encode_layer` / :func:`decode_layer` combine them into the per-layer tensors of the packed
checkpoint. Channels are sorted by width (stably, ``perm``); for each width only the *surviving*
weights' codes are stored, row-major over ``[R, columns of that width]``. Unquantized (16-bit)
channels keep their surviving values in the weight's own dtype (fp16 for an fp16 model, so the
reload is bit-exact whatever the dtype).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from misq.algorithms.quantizer import FP_BITS, QuantGrid, from_codes, to_codes

_CHUNK = 1 << 20  # values per pack_bits chunk: a multiple of 8 whose temporaries stay in cache
_ROW_CHUNK = 1 << 18  # elements per row block in encode/decode_layer (measured best of 2**14..2**20)
MAX_BITS = 16


# ----------------------------------------------------------------------------- codes


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes :func:`pack_bits` uses for ``n`` values of width ``bits``."""
    return bits * ((n + 7) // 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"cannot bit-pack width {bits}: widths 1..{MAX_BITS} are packed, wider ones are stored as values")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack integer ``values`` [n] (0 <= v < 2**bits) into bit-planes: uint8 [bits * ceil(n/8)]."""
    _check_bits(bits)
    v = values.detach().reshape(-1).cpu()
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    v = v.numpy().astype(np.uint8 if bits <= 8 else np.uint16, copy=False)
    n = v.size
    nb = (n + 7) // 8
    out = np.empty((bits, nb), dtype=np.uint8)
    tmp = np.empty(min(_CHUNK, max(n, 1)), dtype=v.dtype)
    for s in range(0, n, _CHUNK):
        chunk = v[s : s + _CHUNK]
        t = tmp[: chunk.size]
        for j in range(bits):
            np.bitwise_and(chunk, v.dtype.type(1 << (bits - 1 - j)), out=t)  # packbits: nonzero -> 1
            out[j, s // 8 : (s + chunk.size + 7) // 8] = np.packbits(t)
    return torch.from_numpy(out.reshape(-1))


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: int32 [n]."""
    _check_bits(bits)
    nb = (n + 7) // 8
    p = packed.detach().reshape(-1).cpu().numpy()
    if p.dtype != np.uint8 or p.size != bits * nb:
        raise ValueError(f"packed buffer holds {p.size} bytes ({p.dtype}), {n} values of {bits} bits need {bits * nb} uint8")
    planes = p.reshape(bits, nb)
    dt = np.uint8 if bits <= 8 else np.uint16
    out = np.empty(n, dtype=dt)
    for s in range(0, n, _CHUNK):
        cnt = min(_CHUNK, n - s)
        acc = out[s : s + cnt]
        acc[:] = 0
        for j in range(bits):
            u = np.unpackbits(planes[j, s // 8 : (s + cnt + 7) // 8], count=cnt).astype(dt, copy=False)
            np.left_shift(u, dt(bits - 1 - j), out=u)
            np.bitwise_or(acc, u, out=acc)
    return torch.from_numpy(out.astype(np.int32))


# ----------------------------------------------------------------------------- masks


def mask_nbytes(numel: int) -> int:
    return (numel + 7) // 8


def pack_mask(mask: Tensor) -> Tensor:
    """Bool mask of any shape -> uint8 [ceil(numel/8)], 1 bit per element, row-major."""
    return torch.from_numpy(np.packbits(mask.detach().reshape(-1).cpu().numpy().astype(bool, copy=False)))


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: bool tensor of ``shape``."""
    numel = math.prod(shape)
    p = packed.detach().reshape(-1).cpu().numpy()
    if p.dtype != np.uint8 or p.size != mask_nbytes(numel):
        raise ValueError(f"mask holds {p.size} bytes ({p.dtype}), a {list(shape)} mask needs {mask_nbytes(numel)} uint8")
    return torch.from_numpy(np.unpackbits(p, count=numel).view(bool).reshape(shape))


def nm_index_bits(n: int, m: int) -> int:
    """Bits per block of the N:M metadata: ceil(log2 C(m, n)) (2:4 -> 3, 4:8 -> 7, 1:4 -> 2)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def nm_nbytes(rows: int, cols: int, n: int, m: int) -> int:
    return packed_nbytes(rows * cols // m, nm_index_bits(n, m))


def _combinations(n: int, m: int) -> np.ndarray:
    """[C(m, n)] int64: the m-bit pattern (bit j = position j kept) of each combination, lexicographic."""
    if not (1 <= n < m <= MAX_BITS):
        raise ValueError(f"N:M pattern {n}:{m} is not supported: need 1 <= N < M <= {MAX_BITS}")
    return np.array([sum(1 << j for j in c) for c in itertools.combinations(range(m), n)], dtype=np.int64)


def nm_keep_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """[R, C] bool: in each run of m columns of a row, the n largest |w| (ties: lower index first)."""
    R, C = weight.shape
    blocks = weight.detach().abs().reshape(R, C // m, m)
    order = torch.argsort(blocks, dim=2, descending=True, stable=True)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(2, order[:, :, :n], True)
    return keep.reshape(R, C)


def encode_nm(keep: Tensor, n: int, m: int) -> Tensor:
    """N:M mask [R, C] (exactly n of every m) -> packed combination indices (uint8)."""
    combos = _combinations(n, m)
    lut = np.full(1 << m, -1, dtype=np.int64)
    lut[combos] = np.arange(combos.size)
    blocks = keep.detach().cpu().reshape(-1, m).numpy().astype(np.int64)
    pattern = (blocks << np.arange(m, dtype=np.int64)).sum(axis=1)
    index = lut[pattern]
    if (index < 0).any():
        raise ValueError(f"mask is not {n}:{m}: some run of {m} columns does not keep exactly {n}")
    return pack_bits(torch.from_numpy(index), nm_index_bits(n, m))


def decode_nm(packed: Tensor, n: int, m: int, shape: tuple[int, int]) -> Tensor:
    """Inverse of :func:`encode_nm`: bool [R, C]."""
    combos = _combinations(n, m)
    index = unpack_bits(packed, nm_index_bits(n, m), shape[0] * shape[1] // m).numpy()
    if index.size and int(index.max()) >= combos.size:
        raise ValueError(f"N:M metadata holds index {int(index.max())}, {n}:{m} has only {combos.size} combinations")
    pattern = combos[index]
    bits = (pattern[:, None] >> np.arange(m, dtype=np.int64)) & 1
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: kind is "dense", "unstructured" or "nm" (with n, m)."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_pattern(pattern: str) -> Pattern:
    """``"dense"``, ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``); ValueError otherwise."""
    text = str(pattern).strip().lower()
    if text in ("dense", "unstructured"):
        return Pattern(text)
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern {pattern!r} is unknown: use dense, unstructured or N:M such as 2:4") from None
    _combinations(n, m)  # validates n, m
    return Pattern("nm", n, m)


def keep_mask(weight: Tensor, pattern: Pattern) -> Tensor:
    """[R, C] bool of the weights the format stores for ``pattern`` (see module docstring)."""
    if pattern.kind == "dense":
        return torch.ones(weight.shape, dtype=torch.bool)
    if pattern.kind == "unstructured":
        return weight != 0
    C = weight.shape[1]
    if C % pattern.m:
        raise ValueError(f"{C} columns are not a multiple of M={pattern.m}")
    keep = nm_keep_mask(weight, pattern.n, pattern.m)
    if bool(((weight != 0) & ~keep).any()):
        raise ValueError(f"weight is not {pattern} sparse: some run of {pattern.m} columns has more than {pattern.n} non-zeros")
    return keep


# ----------------------------------------------------------------------------- layers


def group_id_dtype(n_groups: int) -> torch.dtype:
    return torch.uint8 if n_groups <= 256 else torch.int16


def width_order(column_bits: Tensor) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """perm [C] (columns stably sorted by width) and [(width, start, end)]: the columns
    perm[start:end] are those of that width, in ascending width."""
    perm = torch.argsort(column_bits, stable=True)
    widths, counts = torch.unique_consecutive(column_bits[perm], return_counts=True)
    segments, start = [], 0
    for b, cnt in zip(widths.tolist(), counts.tolist()):
        segments.append((int(b), start, start + cnt))
        start += cnt
    return perm, segments


@dataclass
class PackedLayer:
    """The stored form of one linear layer.

    tensors: suffix -> tensor: ``codes_w{b}`` uint8 (per width b < 16), ``fp_values`` [n16]
    (weight dtype), ``mask`` uint8 or ``nm_index`` uint8, ``scales``/``zeros`` fp16 [R, K],
    ``channel_group`` uint8/int16 [C], ``group_bits`` uint8 [K], ``perm`` int32 [C].
    meta: JSON-ready rows, cols, groups (K), group_bits, dtype, survivors {width: count}.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def stored_grid(grid: QuantGrid) -> QuantGrid:
    """``grid`` as the checkpoint holds it: scale and zero through fp16, unquantized groups 0."""
    bits = grid.bits.detach().cpu().long()
    fp = (bits >= FP_BITS).unsqueeze(0)
    scale = torch.where(fp, 0.0, grid.scale.detach().cpu().float()).to(torch.float16)
    zero = torch.where(fp, 0.0, grid.zero.detach().cpu().float()).to(torch.float16)
    return QuantGrid(scale=scale.float(), zero=zero.float(), groups=grid.groups.detach().cpu().long(), bits=bits)


def _sub_grid(grid: QuantGrid, rows: slice, cols: slice) -> QuantGrid:
    """The grid of W[rows, cols]."""
    return QuantGrid(scale=grid.scale[rows], zero=grid.zero[rows], groups=grid.groups[cols], bits=grid.bits)


def _permuted(grid: QuantGrid, perm: Tensor) -> QuantGrid:
    """The grid of W[:, perm]."""
    return QuantGrid(scale=grid.scale, zero=grid.zero, groups=grid.groups[perm], bits=grid.bits)


def _row_chunks(R: int, n_cols: int) -> Iterator[slice]:
    """Row blocks of about _ROW_CHUNK elements: small temporaries stay in cache and skip the
    page faults of fresh large allocations, 2-3x faster than whole-matrix operations."""
    step = max(1, _ROW_CHUNK // max(n_cols, 1))
    for r in range(0, R, step):
        yield slice(r, min(r + step, R))


def encode_layer(weight: Tensor, grid: QuantGrid, pattern: str | Pattern, *, verify: bool = True) -> PackedLayer:
    """Encode weight [R, C] (pruned and quantized on ``grid``) for ``pattern``.

    With ``verify`` (the default, and what checkpoints use) raises ValueError if the weight is
    not exactly what its grid (through fp16) and the mask reproduce, so a checkpoint that saved
    is a checkpoint that reloads bit for bit. The check costs about as much as the encoding.
    """
    pat = parse_pattern(str(pattern)) if not isinstance(pattern, Pattern) else pattern
    W = weight.detach().cpu()
    R, C = W.shape
    K = grid.n_groups
    if grid.groups.numel() != C or tuple(grid.scale.shape) != (R, K) or tuple(grid.zero.shape) != (R, K):
        raise ValueError(f"grid (scale {list(grid.scale.shape)}, {grid.groups.numel()} channel groups) does not fit weight {[R, C]}")
    if int(grid.bits.max()) > FP_BITS or int(grid.bits.min()) < 1:
        raise ValueError(f"group widths {grid.bits.tolist()} are outside 1..{FP_BITS}")
    g = stored_grid(grid)
    keep = keep_mask(W, pat)
    perm, segments = width_order(g.column_bits())
    # Work on column-permuted copies: each width is then a slice, with no gather per block.
    Wp, kp, gp = W[:, perm], keep[:, perm], _permuted(g, perm)
    out = PackedLayer()
    survivors: dict[str, int] = {}
    for b, start, end in segments:
        parts, bad = [], 0
        for rows in _row_chunks(R, end - start):
            Wb, kb = Wp[rows, start:end], kp[rows, start:end]
            if b >= FP_BITS:
                parts.append(Wb[kb])
                continue
            sub = _sub_grid(gp, rows, slice(start, end))
            codes = to_codes(Wb, sub)
            if verify:
                back = torch.where(kb, from_codes(codes, sub), 0.0).to(W.dtype)
                if not torch.equal(back, Wb):
                    bad += int(torch.count_nonzero(back != Wb))
            parts.append(codes[kb])
        if bad:
            raise ValueError(f"{bad} weights of the {b}-bit channels are not on their grid (or not pruned to exact 0)")
        values = torch.cat(parts)
        survivors[str(b)] = values.numel()
        out.tensors["fp_values" if b >= FP_BITS else f"codes_w{b}"] = values if b >= FP_BITS else pack_bits(values, b)
    if pat.kind == "unstructured":
        out.tensors["mask"] = pack_mask(keep)
    elif pat.kind == "nm":
        out.tensors["nm_index"] = encode_nm(keep, pat.n, pat.m)
    out.tensors["scales"] = g.scale.to(torch.float16)
    out.tensors["zeros"] = g.zero.to(torch.float16)
    out.tensors["channel_group"] = g.groups.to(group_id_dtype(K))
    out.tensors["group_bits"] = g.bits.to(torch.uint8)
    out.tensors["perm"] = perm.to(torch.int32)
    out.meta = {"rows": R, "cols": C, "groups": K, "group_bits": g.bits.tolist(),
                "dtype": str(W.dtype).replace("torch.", ""), "survivors": survivors}
    return out


def expected_shapes(meta: dict[str, Any], pattern: Pattern) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Suffix -> (shape, dtype) every tensor of a layer must have (dtype None: the weight's)."""
    R, C, K = int(meta["rows"]), int(meta["cols"]), int(meta["groups"])
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
        "scales": ((R, K), torch.float16), "zeros": ((R, K), torch.float16),
        "channel_group": ((C,), group_id_dtype(K)), "group_bits": ((K,), torch.uint8), "perm": ((C,), torch.int32),
    }
    for b, n in meta["survivors"].items():
        b, n = int(b), int(n)
        shapes["fp_values" if b >= FP_BITS else f"codes_w{b}"] = ((n,) if b >= FP_BITS else (packed_nbytes(n, b),),
                                                                   None if b >= FP_BITS else torch.uint8)
    if pattern.kind == "unstructured":
        shapes["mask"] = ((mask_nbytes(R * C),), torch.uint8)
    elif pattern.kind == "nm":
        shapes["nm_index"] = ((nm_nbytes(R, C, pattern.n, pattern.m),), torch.uint8)
    return shapes


def decode_layer(tensors: dict[str, Tensor], meta: dict[str, Any], pattern: str | Pattern,
                 dtype: torch.dtype | None = None) -> Tensor:
    """Rebuild the dense weight [R, C] exactly as the solver left it (ValueError if inconsistent).

    Codes are dequantized by :func:`from_codes` in float32, then cast to ``dtype`` (default: the
    dtype the layer was saved in); pruned weights are 0; 16-bit channels are copied.
    """
    pat = parse_pattern(str(pattern)) if not isinstance(pattern, Pattern) else pattern
    R, C = int(meta["rows"]), int(meta["cols"])
    dtype = dtype or getattr(torch, meta["dtype"])
    groups, bits = tensors["channel_group"].long(), tensors["group_bits"].long()
    if bits.tolist() != [int(b) for b in meta["group_bits"]] or int(groups.min()) < 0 or int(groups.max()) >= bits.numel():
        raise ValueError("channel groups or group widths disagree with config.json")
    g = QuantGrid(scale=tensors["scales"].float(), zero=tensors["zeros"].float(), groups=groups, bits=bits)
    if pat.kind == "dense":
        keep = torch.ones(R, C, dtype=torch.bool)
    elif pat.kind == "unstructured":
        keep = unpack_mask(tensors["mask"], (R, C))
    else:
        keep = decode_nm(tensors["nm_index"], pat.n, pat.m, (R, C))
    perm, segments = width_order(g.column_bits())
    if not torch.equal(perm, tensors["perm"].long()):
        raise ValueError("the stored channel order disagrees with the channel widths")
    kp, gp = keep[:, perm], _permuted(g, perm)
    Wp = torch.empty(R, C, dtype=dtype)  # column-permuted, as in encode_layer
    for b, start, end in segments:
        n = int(torch.count_nonzero(kp[:, start:end]))
        if n != int(meta["survivors"].get(str(b), -1)):
            raise ValueError(f"the mask keeps {n} weights in the {b}-bit channels, config.json says {meta['survivors'].get(str(b))}")
        values = tensors["fp_values"].to(dtype) if b >= FP_BITS else unpack_bits(tensors[f"codes_w{b}"], b, n)
        offset = 0
        for rows in _row_chunks(R, end - start):
            kb = kp[rows, start:end]
            k = int(torch.count_nonzero(kb))
            sub = torch.zeros(kb.shape, dtype=values.dtype)
            sub[kb] = values[offset : offset + k]
            offset += k
            if b < FP_BITS:
                sub = torch.where(kb, from_codes(sub, _sub_grid(gp, rows, slice(start, end))), 0.0).to(dtype)
            Wp[rows, start:end] = sub
    return torch.empty_like(Wp).index_copy_(1, perm, Wp)
