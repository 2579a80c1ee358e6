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

:mod:`misq.checkpoint.layer_format` combines them into the tensors of one packed layer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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
