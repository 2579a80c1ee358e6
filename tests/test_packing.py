"""Bit packing, masks, N:M metadata (misq.checkpoint.packing) and whole-layer encoding round trips
(misq.checkpoint.layer_format), with group-wise grids and column orders."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from misq.algorithms.column_layout import layout_for
from misq.algorithms.quantizer import QuantGrid, find_grid, quantize_with_grid
from misq.checkpoint.layer_format import decode_layer, describe_layer, encode_layer, layer_nbytes
from misq.checkpoint.packing import (
    decode_nm,
    encode_nm,
    mask_nbytes,
    nm_index_bits,
    nm_keep_mask,
    nm_nbytes,
    pack_bits,
    pack_mask,
    packed_nbytes,
    parse_pattern,
    unpack_bits,
    unpack_mask,
)

FAST = settings(max_examples=50, deadline=None)


@FAST
@given(bits=st.integers(1, 16), n=st.integers(0, 5000), seed=st.integers(0, 2**31 - 1))
def test_pack_bits_round_trip(bits: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), values.to(torch.int32))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_extremes_and_size(bits: int) -> None:
    n = 8 * 1000 + 3  # not a multiple of 8: the padding must not leak into the values
    values = torch.tensor([0, 2**bits - 1] * (n // 2) + [2**bits - 1])
    packed = pack_bits(values, bits)
    assert packed.numel() == bits * math.ceil(n / 8)  # exactly `bits` bits per value, up to padding
    assert torch.equal(unpack_bits(packed, bits, n), values.int())


def test_pack_bits_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 100)


@FAST
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), p=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_mask_round_trip(rows: int, cols: int, p: float, seed: int) -> None:
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < p
    packed = pack_mask(mask)
    assert packed.numel() == mask_nbytes(rows * cols)
    assert torch.equal(unpack_mask(packed, (rows, cols)), mask)


@pytest.mark.parametrize("n,m,bits", [(2, 4, 3), (4, 8, 7), (1, 4, 2)])
def test_nm_round_trip(n: int, m: int, bits: int) -> None:
    rows, cols = 33, 8 * m
    keep = nm_keep_mask(torch.randn(rows, cols), n, m)
    assert torch.equal(keep.reshape(rows, -1, m).sum(-1), torch.full((rows, cols // m), n))
    packed = encode_nm(keep, n, m)
    assert nm_index_bits(n, m) == bits
    assert packed.numel() == nm_nbytes(rows, cols, n, m) == bits * math.ceil(rows * cols // m / 8)
    assert torch.equal(decode_nm(packed, n, m, (rows, cols)), keep)


def test_nm_cost_and_order() -> None:
    # 2:4 costs 3 bits per 4 weights = 0.75 bit per weight, as docs/bit-accounting.md counts it.
    assert nm_nbytes(1000, 4000, 2, 4) * 8 / (1000 * 4000) == 0.75
    # Combinations are numbered lexicographically: {0,1} is 0, {2,3} is the last (5).
    keep = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert unpack_bits(encode_nm(keep, 2, 4), 3, 2).tolist() == [0, 5]
    with pytest.raises(ValueError, match="not 2:4"):
        encode_nm(torch.tensor([[1, 1, 1, 0]], dtype=torch.bool), 2, 4)


def test_nm_keep_mask_ties_by_index() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -3.0, 1.0, 1.0]])
    assert nm_keep_mask(w, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]


def test_parse_pattern() -> None:
    assert str(parse_pattern("2:4")) == "2:4" and parse_pattern("Unstructured").kind == "unstructured"
    for bad in ("4:2", "2:2", "half", "0:4"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def _layer(rows: int, cols: int, widths: list[int], pattern: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, QuantGrid]:
    """A weight pruned to ``pattern`` and quantized on a grid with one group per width."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    p = parse_pattern(pattern)
    if p.kind == "unstructured":
        W[torch.rand(rows, cols, generator=gen) < 0.5] = 0
    elif p.kind == "nm":
        W = torch.where(nm_keep_mask(W, p.n, p.m), W, 0.0)
    groups = torch.randint(0, len(widths), (cols,), generator=gen)
    grid = find_grid(W, groups, torch.tensor(widths))
    return quantize_with_grid(W, grid).to(dtype), grid


@FAST
@given(
    rows=st.integers(1, 24),
    blocks=st.integers(1, 12),
    widths=st.lists(st.sampled_from([2, 3, 4, 6, 8, 16]), min_size=1, max_size=5),
    pattern=st.sampled_from(["dense", "unstructured", "2:4", "1:4"]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_round_trip_bit_exact(rows: int, blocks: int, widths: list[int], pattern: str, dtype: torch.dtype, seed: int) -> None:
    W, grid = _layer(rows, 4 * blocks, widths, pattern, dtype, seed)
    packed = encode_layer(W, grid, pattern)
    out = decode_layer(packed.tensors, packed.meta, pattern)
    assert out.dtype == dtype and torch.equal(out, W)
    # Only survivors are stored: pruned weights cost nothing but the mask (unless coding the zeros is cheaper).
    masked = "mask" in packed.tensors
    assert sum(packed.meta["survivors"].values()) == (int((W != 0).sum()) if masked else
                                                      W.numel() * (parse_pattern(pattern).n / 4 if ":" in pattern else 1))


def test_encode_rejects_weights_off_grid() -> None:
    W, grid = _layer(8, 16, [4], "dense", torch.float32, 0)
    W[0, 0] += 1e-3
    with pytest.raises(ValueError, match="not on their grid"):
        encode_layer(W, grid, "dense")
    W, grid = _layer(8, 16, [4], "dense", torch.float32, 0)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        encode_layer(W, grid, "2:4")


@FAST
@given(
    rows=st.integers(1, 16),
    cols=st.integers(1, 70),
    n_groups=st.integers(1, 4),
    groupsize=st.sampled_from([0, 3, 8, 32]),
    act_order=st.booleans(),
    sparse=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_groupwise_layout_round_trip_and_exact_size(rows, cols, n_groups, groupsize, act_order, sparse, seed) -> None:
    """A grid laid out by column_layout (segments by width, act-order, scale groups of
    ``groupsize``, odd column counts, partial groups) reloads bit for bit, and the accounting's
    byte count is the encoded tensors' to the byte."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    if sparse:
        W = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, 0.0, W)
    channel_group = torch.randint(0, n_groups, (cols,), generator=gen)
    widths = torch.tensor([2, 3, 4, 16])[torch.randint(0, 4, (n_groups,), generator=gen)]
    lay = layout_for(channel_group, widths, hessian_diag=torch.rand(cols, generator=gen), act_order=act_order,
                     groupsize=groupsize)
    grid = find_grid(W, lay.group_of_column(), lay.group_bits())
    grid.order = lay.perm
    Wq = torch.where(W != 0, quantize_with_grid(W, grid), 0.0).to(torch.float16)
    pattern = "unstructured" if sparse else "dense"
    packed = encode_layer(Wq, grid, pattern)
    assert torch.equal(decode_layer(packed.tensors, packed.meta, pattern), Wq)
    actual = {k: t.numel() * t.element_size() for k, t in packed.tensors.items()}
    assert layer_nbytes(describe_layer(Wq, grid, pattern), pattern, 2) == actual
    assert ("perm" in packed.tensors) == lay.permuted


@pytest.mark.parametrize("pruned,masked", [(0.02, False), (0.5, True)])
def test_unstructured_layer_stores_a_mask_only_where_it_is_cheaper(pruned, masked) -> None:
    """Under an unstructured pattern a layer with few zeros (one the sparsity allocation left dense)
    codes them at the zero point and stores no mask; a half-pruned layer stores its mask. Both
    reload bit for bit, the accounting counts the file to the byte, and files written before the
    choice (a mask, no ``masked`` key) still read."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(48, 96, generator=gen)
    W[torch.rand(48, 96, generator=gen) < pruned] = 0
    grid = find_grid(W, torch.zeros(96, dtype=torch.long), torch.tensor([4]))
    Wq = torch.where(W != 0, quantize_with_grid(W, grid), 0.0).half()
    packed = encode_layer(Wq, grid, "unstructured")
    assert ("mask" in packed.tensors) == masked and packed.meta.get("masked", True) == masked
    assert torch.equal(decode_layer(packed.tensors, packed.meta, "unstructured"), Wq)
    actual = {k: t.numel() * t.element_size() for k, t in packed.tensors.items()}
    assert layer_nbytes(describe_layer(Wq, grid, "unstructured"), "unstructured", 2) == actual
    n_zero = int((Wq == 0).sum())
    with_mask = 48 * 96 // 8 + 4 * math.ceil((Wq.numel() - n_zero) / 8)  # codes: 4 bit-planes of whole bytes
    without = 4 * math.ceil(Wq.numel() / 8)
    codes = actual["codes_w4"]
    assert codes + actual.get("mask", 0) == min(with_mask, without)


def test_zeros_are_stored_at_the_code_width() -> None:
    """GPTQ 3-bit with groups of 128: 3 + (16 + 3) / 128 bits per weight, plus the group table."""
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    lay = layout_for(torch.zeros(512, dtype=torch.long), torch.tensor([3]), groupsize=128)
    grid = find_grid(W, lay.group_of_column(), lay.group_bits())
    packed = encode_layer(quantize_with_grid(W, grid).half(), grid, "dense")
    nbytes = sum(t.numel() * t.element_size() for t in packed.tensors.values())
    # one width in runs of 128: no group table (config.json's regular_groupsize says it)
    assert set(packed.tensors) == {"codes_w3", "zeros_w3", "scales"} and packed.meta["regular_groupsize"] == 128
    assert 8 * nbytes / W.numel() == pytest.approx(3 + 19 / 128)
