"""The Hessian accumulated over its upper block triangle only (misq.algorithms.hessian_tiles)."""

from __future__ import annotations

import itertools

import pytest
import torch

from misq.algorithms import hessian_tiles
from misq.algorithms.sparsegpt import HessianAccumulator


@pytest.mark.parametrize("columns", [100, 5120, 13824, 28672])
def test_tiles_cover_the_columns_at_multiples_of_128(columns):
    edges = hessian_tiles.tile_edges(columns)
    assert edges[0] == 0 and edges[-1] == columns and edges == sorted(set(edges))
    assert all(e % 128 == 0 for e in edges[1:-1])
    widths = [b - a for a, b in itertools.pairwise(edges)]
    assert max(widths) <= 3200


def test_upper_tiles_then_mirror_is_the_whole_product():
    """In fp64 on the CPU: two running-mean updates on the upper tiles, then the mirror, give
    beta·H + alpha·xᵀx everywhere (the fp16-on-CUDA path is the same code with out_dtype)."""
    g = torch.Generator().manual_seed(0)
    C = 700
    edges = [0, 256, 512, C]
    H = torch.zeros(C, C, dtype=torch.float64)
    ref = torch.zeros(C, C, dtype=torch.float64)
    for beta, alpha in ((0.0, 1.0), (0.5, 0.25)):
        x = torch.randn(300, C, generator=g, dtype=torch.float64)
        hessian_tiles.add_upper(H, x, beta, alpha, edges)
        ref = beta * ref + alpha * x.t() @ x
    hessian_tiles.mirror_upper(H, edges)
    torch.testing.assert_close(H, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(H, H.t())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)")
def test_accumulator_uses_upper_tiles_on_cuda():
    assert hessian_tiles.view_out_supported(), "addmm into a strided fp32 view from fp16 inputs"
    g = torch.Generator(device="cuda").manual_seed(3)
    C = 4608
    acc = HessianAccumulator(C, "cuda")
    xs = [torch.randn(b, 256, C, device="cuda", dtype=torch.float16, generator=g) for b in (2, 3, 1)]
    for x in xs:
        acc.add(x)
    assert acc.tiles is not None and len(acc.tiles) > 2
    H = acc.free()
    X = torch.cat([x.reshape(-1, C) for x in xs]).double()
    ref = 2.0 / 6 * X.T @ X
    assert ((H.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert torch.equal(H, H.t())
