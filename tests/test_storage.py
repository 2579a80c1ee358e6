"""Size accounting (misq.checkpoint.accounting) against docs/bit-accounting.md and against the real packed bytes."""

from __future__ import annotations

import struct

import pytest
import torch
from torch import nn

from misq.algorithms.quantizer import (
    QuantGrid,
    find_grid,
    from_codes,
    maxq_of,
    quantize_with_grid,
)
from misq.checkpoint.accounting import (
    kind_of,
    layer_bytes,
    pattern_for,
    storage_accounting,
)
from misq.checkpoint.layer_format import encode_layer
from misq.checkpoint.packed import save_packed
from misq.config import CompressConfig
from misq.models.layout import LINEAR_NAMES


def _one_layer_model(W: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.layer = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")  # no 70M-weight init
    model.layer.weight = nn.Parameter(W, requires_grad=False)
    return model


def test_pattern_for() -> None:
    # The dict form (results files, packed checkpoints) reads the same as the live config.
    for cfg in (CompressConfig(sparsity=0.5), CompressConfig(sparsity=0.0), CompressConfig(prunen=2, prunem=4)):
        assert pattern_for(cfg.to_dict()) == cfg.pattern
    assert [c.pattern for c in (CompressConfig(sparsity=0.5), CompressConfig(sparsity=0.0))] == ["unstructured", "dense"]
    assert CompressConfig(prunen=2, prunem=4).pattern == "2:4"
    assert pattern_for({"sparsity": None, "prunen": None}) == "dense"  # older files: null fields


def test_protocol_worked_example() -> None:
    """50% unstructured + 4 bits = 0.5 x 4 + 1 (mask) = 3 bits per weight plus scales, not 2."""
    R, C = 1024, 1024
    W = torch.rand(R, C) + 1.0  # |w| in [1, 2]: no kept weight rounds to 0 on a 4-bit grid over [-2, 2]
    W[:, ::2] *= -1
    W[(torch.arange(R)[:, None] + torch.arange(C)) % 2 == 0] = 0  # exactly half of every column
    grid = find_grid(W, torch.zeros(C, dtype=torch.long), torch.tensor([4]))
    W = quantize_with_grid(W, grid)
    assert int(torch.count_nonzero(W)) == R * C // 2
    acc = storage_accounting(_one_layer_model(W), {"layer": grid}, "unstructured")
    assert acc["avg_channel_bits"] == 4.0
    assert acc["bits_per_stored_weight"] == 4.0 + (16 + 4) / C  # fp16 scale + 4-bit zero per row
    table = 0  # one width, one group per row: a regular layout stores no group table; natural order: no permutation
    expected = 0.5 * 4 + 1 + ((16 + 4) * R + table) / (R * C)  # survivors' codes + mask + scales/zeros + table
    assert acc["bits_per_param_disk_quantized"] == pytest.approx(expected, rel=1e-12)
    assert 3.0 < acc["bits_per_param_disk_quantized"] < 3.1
    assert acc["compression_ratio_quantized"] == pytest.approx(16 / acc["bits_per_param_disk_quantized"])


@pytest.fixture
def one_thread():
    """Many small tensor ops: on a shared, busy CPU two OpenMP threads wait on each other and run
    up to 10x slower than one, while on an idle one they are at most 2x faster. Pin to one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_13b_layer_size_matches_packed_bytes(one_thread) -> None:
    """A 13B-shaped layer (5120 x 13824), 50% unstructured, 4.0 average bits over 10 groups."""
    R, C = 5120, 13824
    gen = torch.Generator().manual_seed(0)
    sizes = [1383] * 4 + [1382] * 6
    groups = torch.repeat_interleave(torch.arange(10), torch.tensor(sizes))
    bits = torch.tensor([4, 4, 4, 4, 3, 3, 3, 3, 6, 6])  # 4*1383*4 + 4*1382*3 + 2*1382*6 = 4.0 * C exactly
    scale = (torch.rand(R, 10, generator=gen) * 0.01 + 1e-3).half().float()
    maxq = maxq_of(bits)
    zero = torch.floor(torch.rand(R, 10, generator=gen) * (maxq + 1))
    grid = QuantGrid(scale=scale, zero=zero, groups=groups, bits=bits)
    W = torch.empty(R, C, dtype=torch.float16)
    start = 0
    for k, n in enumerate(sizes):  # on the grid, one group at a time
        codes = torch.randint(0, 2 ** int(bits[k]) - 1, (R, n), generator=gen)
        codes += codes >= zero[:, k : k + 1]  # never the zero point: kept weights stay non-zero, sparsity stays 50%
        sub = QuantGrid(scale=scale[:, k : k + 1], zero=zero[:, k : k + 1], groups=torch.zeros(n, dtype=torch.long), bits=bits[k : k + 1])
        W[:, start : start + n] = from_codes(codes, sub)
        start += n
    W.masked_fill_(torch.rand(R, C, generator=gen) < 0.5, 0.0)
    acc = storage_accounting(_one_layer_model(W), {"layer": grid}, "unstructured")
    assert acc["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert acc["avg_channel_bits"] == 4.0
    assert acc["bits_per_param_disk_quantized"] <= 3.1
    assert acc["bytes_quantized"] <= 0.2 * 2 * R * C  # under 20% of fp16
    packed = encode_layer(W, grid, "unstructured", verify=False)  # bit-exactness: test_packing, test_checkpoint
    actual = sum(t.numel() * t.element_size() for t in packed.tensors.values())
    assert actual == pytest.approx(acc["bits_per_param_disk_quantized"] * R * C / 8, rel=0.01)
    assert actual == acc["bytes_quantized"]  # in fact to the byte


def _compressed_llama(hidden: int, ffn: int, vocab: int) -> tuple[nn.Module, dict[str, QuantGrid]]:
    """A small LlamaForCausalLM, 50% pruned and quantized to widths {2, 4, 16} by direct grids."""
    from misq.demo.toy import build_model

    model = build_model(vocab, hidden=hidden, ffn=ffn, layers=2, heads=8, kv_heads=4).half()
    gen = torch.Generator().manual_seed(1)
    grids = {}
    for i, layer in enumerate(model.model.layers):
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            W = lin.weight.data.float()
            W[torch.rand(W.shape, generator=gen) < 0.5] = 0
            grid = find_grid(W, torch.randint(0, 3, (W.shape[1],), generator=gen), torch.tensor([2, 4, 16]))
            lin.weight.data.copy_(quantize_with_grid(W, grid).half())
            grids[f"model.layers.{i}.{name}"] = grid
    return model, grids


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_saved_folder_matches_accounting(tmp_path, one_thread) -> None:
    """Disk bytes of the weights = accounting + safetensors header; within 1% once headers are negligible."""
    for hidden, ffn, vocab, rel in [(64, 128, 512, None), (512, 1408, 512, 0.01)]:
        model, grids = _compressed_llama(hidden, ffn, vocab)
        acc = storage_accounting(model, grids, "unstructured")
        out = tmp_path / f"h{hidden}"
        sizes = save_packed(model, grids, out, compress_config={}, pattern="unstructured")
        assert sizes["payload_bytes"] == acc["bytes_by_kind"]
        weights = out / "model.safetensors"
        assert sizes["weights_bytes"] == acc["bytes_model"] + _header_bytes(weights)
        if rel is not None:
            assert sizes["weights_bytes"] == pytest.approx(acc["bits_per_param_disk_model"] * acc["parameters"] / 8, rel=rel)
    weight, grid = model.model.layers[0].mlp.up_proj.weight, grids["model.layers.0.mlp.up_proj"]
    packed = encode_layer(weight, grid, "unstructured")
    actual = {}
    for suffix, t in packed.tensors.items():
        actual[kind_of(suffix)] = actual.get(kind_of(suffix), 0) + t.numel() * t.element_size()
    assert {k: v for k, v in layer_bytes(weight, grid, "unstructured").items() if v} == actual
