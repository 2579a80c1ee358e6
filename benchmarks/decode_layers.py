"""What the decode benchmarks share (decode_speed.py, decode_tune.py, decode_model.py,
decode_profile.py): the 13B shapes and the packed formats they time, random packed layers of
those formats with their honest size, the CUDA-graph timers (warm, and cold: over copies of a
layer larger than L2), and the launch_plan switches ``--flip`` times at their other setting."""

from __future__ import annotations

import contextlib

import torch

from misq.checkpoint.layer_format import layer_nbytes
from misq.runtime.layout import Segment, pack_words
from misq.runtime.linear import PackedLinear

SHAPES = {"qo_5120x5120": (5120, 5120), "gate_up_13824x5120": (13824, 5120), "down_5120x13824": (5120, 13824)}
# a 13B layer's q/k/v and gate/up as the runtime merges them (misq.runtime.merge): --merged-shapes
MERGED_SHAPES = {"qkv_15360x5120": (15360, 5120), "gate_up_merged_27648x5120": (27648, 5120)}
FORMATS = {  # name: (widths of the column halves, unstructured sparsity)
    "4bit_g128": ((4, 4), 0.0), "3bit_g128": ((3, 3), 0.0), "50pct_4bit_g128": ((4, 4), 0.5), "mixed_3_4_g128": ((3, 4), 0.0),
}
G = 128


def random_packed(rows: int, cols: int, widths: tuple[int, int], sparsity: float, device: str = "cuda",
                  perm: torch.Tensor | None = None) -> tuple[PackedLinear, int]:
    """(a random PackedLinear, the honest byte count its file would hold). Columns: a random
    permutation (act-order; or ``perm``), the first half at widths[0], the rest at widths[1], groups of 128."""
    perm = torch.randperm(cols, device=device).to(torch.int32) if perm is None else perm
    half = cols // 2
    segs, start, meta_bits, survivors = [], 0, [], {}
    for b in sorted(set(widths)):
        n = sum(half if i == 0 else cols - half for i, w in enumerate(widths) if w == b)
        k = -(-n // G)
        codes = torch.randint(0, 1 << b, (rows, n), device=device)
        zeros = torch.randint(0, 1 << b, (rows, k), device=device)
        gidx = torch.arange(n, device=device) // G
        if sparsity:  # pruned weights hold their zero-point code
            codes = torch.where(torch.rand(rows, n, device=device) < sparsity, zeros[:, gidx], codes)
        segs.append(Segment(bits=b, start=start, n=n, words=pack_words(codes, b),
                            scales=(torch.rand(k, rows, device=device) * 0.01 + 1e-3).half(),
                            zeros=zeros.t().contiguous().to(torch.uint8), gidx=gidx.to(torch.int32), group_len=G))
        start += n
        meta_bits += [b] * k
        survivors[str(b)] = round(rows * n * (1 - sparsity))
    meta = {"rows": rows, "cols": cols, "groups": len(meta_bits), "group_bits": meta_bits, "permuted": True,
            "survivors": survivors}
    honest = sum(layer_nbytes(meta, "unstructured" if sparsity else "dense").values())
    return PackedLinear(perm, segs, None, rows), honest


def bench(fn, rep: int = 20) -> float:
    """Microseconds per call, CUDA-graph replayed. The same call repeats with nothing in between,
    so weights that fit in L2 (50 MB on an H200) are read from it after the first call: see
    bench_cold for the figure a model, whose every layer has its own weights, sees."""
    import triton.testing

    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=rep)


def copies_for(nbytes: int, cold_bytes: int) -> int:
    """How many copies of a weight of ``nbytes`` make at least ``cold_bytes`` (at least 1)."""
    return max(1, -(-cold_bytes // max(nbytes, 1)))


def with_copies(lin: PackedLinear, fmt: str, cold_bytes: int) -> list[PackedLinear]:
    """``lin`` and further random layers of its shape and format, together at least ``cold_bytes``
    (just ``lin`` for 0): the layers bench_cold cycles through."""
    R, C = lin.out_features, lin.in_features
    return [lin] + [random_packed(R, C, *FORMATS[fmt])[0] for _ in range(copies_for(lin.weight_nbytes, cold_bytes) - 1)]


def bench_cold(fns: list) -> float:
    """Microseconds per call of one of ``fns`` (the same operation on different copies of its
    weights, together larger than L2), CUDA-graph replayed one after the other: each call reads
    its weights from memory, as a decoder layer does."""
    return bench(lambda: [f() for f in fns]) / len(fns)


# launch_plan's module switches --flip may time with the other setting (read when a layer plans its launches)
FLIPPABLE = ("H2_PDL", "GATHER_PDL")


@contextlib.contextmanager
def flipped(name: str):
    """launch_plan.<name> set to its other setting for the block, then back; the layers plan their
    launches again both times (the settings' version moves). Yields the setting in force."""
    from misq.runtime import launch_plan

    default = getattr(launch_plan, name)
    setattr(launch_plan, name, not default)
    launch_plan.TUNED.update()
    try:
        yield not default
    finally:
        setattr(launch_plan, name, default)
        launch_plan.TUNED.update()
