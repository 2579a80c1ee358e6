"""One linear layer in GPTQ's checkpoint layout (pure: tensors in, tensors out, no files).

The layout is the one AutoGPTQ wrote and GPTQModel, transformers (through optimum), vLLM and
ExLlama read as ``"checkpoint_format": "gptq"`` (v1), or GPTQModel's ``"gptq_v2"``, which differs
only in ``qzeros`` (see "v2" below). For a layer of R output rows
(``out_features``), C input columns (``in_features``), width b in {2, 3, 4, 8} and K scale groups:

==============  =============  ===============================================================
``qweight``     int32 [C*b/32, R]  codes, packed along the *input* dim: every run of 32 input
                               columns becomes b words per output row
``qzeros``      int32 [K, R*b/32]  zero point minus one (the v1 convention), packed the same
                               way along the *output* dim
``scales``      fp16 [K, R]    one scale per (group, row)
``g_idx``       int32 [C]      the scale group of every input column
==============  =============  ===============================================================

and the weight is ``W[r, c] = scales[g, r] * (q[c, r] - (qzeros[g, r] + 1))`` with ``g = g_idx[c]``.

Packing (checked against AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack`` and GPTQModel
``nn_modules/qlinear/__init__.py`` ``_pack_rows_2_4_8``/``_pack_rows_3`` and their
``dequantize_weight``): 32 values make one little-endian stream of 32*b bits, value j at bits
j*b .. j*b+b-1, cut into b int32 words. For 2/4/8 bits no value crosses a word; for 3 bits
values 10 and 21 straddle two words (AutoGPTQ's "10 | 1 | 10 | 1 | 10" pattern), which the
stream view gives without a special case.

How misq's grids map onto it (:func:`gptq_layout`): GPTQ has one width per layer and, in every
reader, ``ceil(C / group_size)`` groups; vLLM's exllama kernel, after sorting the columns by
``g_idx`` when ``desc_act`` is set, takes group k to be columns [kG, (k+1)G) of that order.
So a layer is expressible when it has one width in {2, 3, 4, 8}, no 16-bit columns, and its
groups are runs of G consecutive columns of misq's storage order (the last one may be shorter)
or a single group (``group_size`` -1). Group j is the j-th run: ``g_idx[perm[k]] = k // G``.
``desc_act`` is needed only when that is not ``arange(C) // G``, i.e. when act-order moved a
column to another group. Groups of unequal sizes would be read with the wrong boundaries by
vLLM, so they are refused, as are mixed widths within a layer and widths GPTQ lacks (6 bits).

Zero point 0. misq's zeros lie in [0, maxq]; v1 stores ``zero - 1``, and GPTQModel's v1 -> v2
conversion adds one to each packed field as a whole-word add (``convert_gptq_v1_to_v2_format``)
while ExLlama adds one after unpacking without masking, so a stored -1 does not come back as 0
in them. A (group, row) whose zero point is 0 (all its weights >= 0) is therefore written
mirrored: scale -s, zero maxq, codes maxq - q. ``(-s) * ((maxq - q) - maxq) = s * q`` exactly,
so every reader gets misq's weights bit for bit (0 may come back as -0.0).

v2 (``checkpoint_format="gptq_v2"``). GPTQModel's own runtime layout: ``qzeros`` holds the zero
point itself, packed the same way, and the weight is ``scales[g, r] * (q[c, r] - qzeros[g, r])``
(``nn_modules/qlinear/__init__.py`` ``dequantize_weight``/``_dequantize_from_codes``; its loader
runs ``convert_gptq_v1_to_v2_format`` only on v1 folders, and ``convert_gptq_v2_to_v1_format``
subtracts the one back on saving v1). Every zero point 0..maxq fits, so nothing is mirrored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from misq.algorithms.quantizer import FP_BITS, QuantGrid
from misq.checkpoint.layer_format import regular_groupsize, storage_order

GPTQ_BITS = (2, 3, 4, 8)  # what the v1 layout packs (AutoGPTQ, vLLM's gptq kernels)
# checkpoint_format -> what is subtracted from each zero point on disk (v1: zero - 1; v2: the zero itself)
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
_WORD = 32
_MASK32 = (1 << _WORD) - 1


class GptqUnsupported(ValueError):
    """A layer the GPTQ layout cannot express; ``str()`` says why."""


@dataclass
class GptqLayout:
    """How one layer maps onto GPTQ: ``bits``; ``group_size`` G, or -1 for one group per row;
    ``cols`` C (a single-group layer is also described by group_size C)."""

    bits: int
    group_size: int
    cols: int

    def fits(self, bits: int, group_size: int) -> bool:
        """True when a quantize config (bits, group_size) describes this layer."""
        if bits != self.bits:
            return False
        if self.group_size == -1:  # one group; G > C would give ceil(C / G) = 1 too, but vLLM wants C % G == 0
            return group_size in (-1, self.cols)
        return group_size == self.group_size


@dataclass
class GptqLayer:
    """The four tensors of one linear (see the module docstring for shapes), its layout,
    ``desc_act`` (g_idx is not ``arange(C) // G``) and ``mirrored``, the number of
    (group, row) cells written with a negated scale because their zero point is 0."""

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor
    layout: GptqLayout
    desc_act: bool
    mirrored: int = 0

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}


def gptq_layout(rows: int, cols: int, group_bits: list[int], run_len: list[int] | None) -> GptqLayout:
    """The GPTQ layout of a layer whose storage-order runs have widths ``group_bits`` [K] and
    lengths ``run_len`` [K] (None: known not to be G, G, ..., rest); :class:`GptqUnsupported`
    naming the reason when there is none."""
    widths = sorted(set(group_bits))
    if any(b >= FP_BITS for b in widths):
        raise GptqUnsupported("keeps some input columns unquantized (16-bit), which GPTQ cannot store")
    if len(widths) > 1:
        raise GptqUnsupported(f"mixes widths {', '.join(map(str, widths))} within the layer; GPTQ has one width per linear")
    bits = widths[0]
    if bits not in GPTQ_BITS:
        raise GptqUnsupported(f"uses {bits}-bit codes; GPTQ's layout packs {', '.join(map(str, GPTQ_BITS))} bits")
    if rows % _WORD or cols % _WORD:
        raise GptqUnsupported(f"is {rows}x{cols}; GPTQ packs 32 values per word group, so both must be multiples of 32")
    if run_len is not None and len(run_len) == 1:
        return GptqLayout(bits, -1, cols)
    G = regular_groupsize(torch.tensor(group_bits), torch.tensor(run_len)) if run_len is not None else 0
    if not G:
        raise GptqUnsupported("has scale groups of unequal sizes, which GPTQ readers (vLLM's kernels) cannot place")
    return GptqLayout(bits, G, cols)


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Pack codes ``values`` [N, M] (0 <= v < 2**bits, N a multiple of 32) along dim 0:
    int32 [N*bits/32, M], each run of 32 rows one little-endian bit stream of ``bits`` words."""
    N, M = values.shape
    if N % _WORD:
        raise ValueError(f"cannot pack {N} rows: GPTQ packs runs of 32")
    v = values.to(torch.int64).reshape(N // _WORD, _WORD, M)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    words = torch.zeros(N // _WORD, bits, M, dtype=torch.int64)
    for j in range(_WORD):
        word, shift = divmod(j * bits, _WORD)
        words[:, word] |= (v[:, j] << shift) & _MASK32
        if shift + bits > _WORD:  # 3 bits: the value's high bits open the next word
            words[:, word + 1] |= v[:, j] >> (_WORD - shift)
    words = torch.where(words >= 1 << 31, words - (1 << _WORD), words)  # two's complement int32, as the readers view it
    return words.to(torch.int32).reshape(N // _WORD * bits, M)


def unpack_int32(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_int32`: int32 [N, M] from int32 [N*bits/32, M]."""
    W, M = packed.shape
    if W % bits:
        raise ValueError(f"{W} packed rows are not a whole number of {bits}-word runs")
    p = (packed.to(torch.int64) & _MASK32).reshape(W // bits, bits, M)
    out = torch.empty(W // bits, _WORD, M, dtype=torch.int64)
    for j in range(_WORD):
        word, shift = divmod(j * bits, _WORD)
        value = p[:, word] >> shift
        if shift + bits > _WORD:
            value = value | (p[:, word + 1] << (_WORD - shift))
        out[:, j] = value & ((1 << bits) - 1)
    return out.reshape(-1, M).to(torch.int32)


def _zero_offset(checkpoint_format: str) -> int:
    if checkpoint_format not in ZERO_OFFSET:
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}: one of {', '.join(ZERO_OFFSET)}")
    return ZERO_OFFSET[checkpoint_format]


def encode_gptq(codes: Tensor, grid: QuantGrid, checkpoint_format: str = "gptq") -> GptqLayer:
    """GPTQ tensors of one layer from its ``codes`` [R, C] (natural column order, every weight's
    integer code on ``grid``; a pruned weight's code is its zero point) and its stored ``grid``
    (fp16-exact scales [R, K], integral zeros [R, K], ``order`` the storage order or None), in
    the ``checkpoint_format`` "gptq" (v1) or "gptq_v2" layout.

    Raises :class:`GptqUnsupported` when the layout cannot express the grid.
    """
    offset = _zero_offset(checkpoint_format)
    R, C = codes.shape
    perm, run_group, run_len = storage_order(grid)
    bits_k = grid.bits.cpu().long()[run_group]
    layout = gptq_layout(R, C, bits_k.tolist(), run_len.tolist())
    b, maxq = layout.bits, (1 << layout.bits) - 1
    G = C if layout.group_size == -1 else layout.group_size
    g_idx = torch.empty(C, dtype=torch.long)
    g_idx[perm] = torch.arange(C) // G  # group j is the j-th run of the storage order
    scale = grid.scale.cpu().float()[:, run_group].t()  # [K, R], group j = run j
    zero = grid.zero.cpu().float()[:, run_group].t()
    if bool(((zero < 0) | (zero > maxq) | (zero != zero.round())).any()):
        raise ValueError(f"zero points outside the integers 0..{maxq}: the grid is not a {b}-bit grid")
    q = codes.cpu().long()
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise ValueError(f"codes outside 0..{maxq}")
    mirror = zero < offset  # [K, R]: v1 cannot store zero - 1 = -1 (module docstring); v2 needs nothing
    if bool(mirror.any()):
        scale = torch.where(mirror, -scale, scale)
        zero = torch.where(mirror, float(maxq), zero)
        q = torch.where(mirror.t()[:, g_idx], maxq - q, q)  # [R, C]: each weight's (row, group) cell
    return GptqLayer(
        qweight=pack_int32(q.t(), b),
        qzeros=pack_int32((zero.long() - offset).t(), b).t().contiguous(),
        scales=scale.to(torch.float16).contiguous(),
        g_idx=g_idx.to(torch.int32),
        layout=layout,
        desc_act=not torch.equal(g_idx, torch.arange(C) // G),
        mirrored=int(mirror.sum()),
    )


def decode_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                checkpoint_format: str = "gptq") -> Tensor:
    """The weight [R, C] (float32) a GPTQ reader computes: ``scales[g] * (q - (qzeros + 1))`` for
    v1 ("gptq"), ``scales[g] * (q - qzeros)`` for "gptq_v2"."""
    q = unpack_int32(qweight, bits).long()  # [C, R]
    zeros = unpack_int32(qzeros.t().contiguous(), bits).t().long() + _zero_offset(checkpoint_format)  # [K, R]
    g = g_idx.long()
    return (scales.float()[g] * (q - zeros[g]).float()).t().contiguous()
