"""Random packed layers for the runtime tests: a weight exactly on a random grid, pruned, then
encoded by the checkpoint's own encoder (so the tests cover file -> runtime layout too)."""

from __future__ import annotations

import torch

from misq.algorithms.quantizer import FP_BITS, QuantGrid
from misq.checkpoint.layer_format import decode_layer, encode_layer
from misq.runtime.linear import PackedLinear


def random_layer(rows: int, cols: int, widths: tuple[int, ...], groupsize: int, pattern: str, *,
                 act_order: bool = False, seed: int = 0, pruned: float = 0.5, order_seed: int | None = None):
    """(PackedLinear, dense fp16 weight [rows, cols] as decode_layer gives it). Groups of
    ``groupsize`` columns (0: one group per width), widths cycled over the groups. ``order_seed``:
    draw the act-order permutation from its own seed (layers of one step share it), not ``seed``."""
    g = torch.Generator().manual_seed(seed)
    order_g = g if order_seed is None else torch.Generator().manual_seed(order_seed)
    order = torch.randperm(cols, generator=order_g) if act_order else torch.arange(cols)
    if groupsize:
        pos_group = torch.arange(cols) // groupsize
    else:  # one group per width: split the columns into len(widths) runs
        pos_group = torch.arange(cols) * len(widths) // cols
    K = int(pos_group.max()) + 1
    bits = torch.tensor([widths[k % len(widths)] for k in range(K)])
    groups = torch.empty(cols, dtype=torch.long)
    groups[order] = pos_group
    maxq = (2 ** bits.clamp(max=15) - 1).float()
    scale = (torch.rand(rows, K, generator=g) * 0.02 + 0.001).half().float()
    zero = torch.floor(torch.rand(rows, K, generator=g) * (maxq + 1)).clamp(max=maxq)
    codes = torch.floor(torch.rand(rows, cols, generator=g) * (maxq[groups] + 1)).clamp(max=maxq[groups])
    W = scale[:, groups] * (codes - zero[:, groups])
    fp = bits[groups] >= FP_BITS
    W[:, fp] = torch.randn(rows, int(fp.sum()), generator=g) * 0.02
    scale[:, bits >= FP_BITS] = 0.0
    zero[:, bits >= FP_BITS] = 0.0
    W = W.half()
    if pattern == "unstructured":
        W = W * (torch.rand(rows, cols, generator=g) > pruned)
    elif pattern == "2:4":
        r = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)
        W = (W.reshape(rows, cols // 4, 4) * (r < 2)).reshape(rows, cols)
    grid = QuantGrid(scale=scale, zero=zero, groups=groups, bits=bits, order=order if act_order else None)
    packed = encode_layer(W, grid, pattern)
    dense = decode_layer(packed.tensors, packed.meta, pattern, torch.float16)
    return PackedLinear.from_file(packed.tensors, packed.meta, pattern), dense, packed


def stand_in_kernels(monkeypatch) -> list:
    """Make PackedLinear take its GPU path on the CPU, its kernels stood in for by dequantize +
    F.linear (they need CUDA). Returns the list every stood-in call appends its layer to."""
    from misq.runtime import linear
    from misq.runtime.decode_plan import gated

    calls = []

    def kernels_on_cpu(self, x):
        calls.append(self)
        y = torch.nn.functional.linear(x, self.dequantize(x.dtype))
        return gated(y) if self.glu else y

    monkeypatch.setattr(linear.PackedLinear, "kernel_forward", kernels_on_cpu)
    monkeypatch.setattr(linear.PackedLinear, "_kernel_ok", lambda self, x: True)
    return calls
