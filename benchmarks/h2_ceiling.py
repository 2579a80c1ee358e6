"""How fast could the batch-1 4-bit kernel be with its own loads? A diagnostic for issue 14.

The h2 kernel (misq.runtime.half2_kernel) streams 4-bit layers at about 3.3 TB/s marginal plus a
fixed cost a call (BENCHMARKS.md, session 20), against the H200's 4.8 TB/s. ncu (session 23) saw its
warps waiting on their loads about half the time. This script separates what the loads cost from
what the math and the split-K exchange add: kernels that read exactly the h2 kernel's bytes, in its
order, on its grid (launch_plan's default settings: BLOCK_N, split-K, warps, register cap), and do
next to nothing with them:

* ``words``: each program's word rows, block after block, XORed together (the loop's loads and
  their round trips, no math);
* ``words at once``: the same with all of a program's blocks loaded together (what more bytes
  in flight a program would give, whatever the registers);
* ``words+groups``: the same plus each block's scales and zeros, as ``_words4`` reads them;
* ``words+groups+exchange``: the same ending in the runtime's split-K exchange (write_out MODE 2:
  an atomic add into the workspace, the counter, the last program's read-back);

next to the runtime's own call (x's gather + the h2 kernel), fp16 cuBLAS, and a device copy of the
layer's words (torch, read + write). Each is timed cold (CUDA graph over copies of the layer of at
least --cold-mib, so no weight is read from L2). If ``words`` is already far from the copy's rate,
the layout or the grid is the limit; if ``words`` is near it, the math and the exchange are.

    PYTHONPATH=src:benchmarks python3 benchmarks/h2_ceiling.py --out h2_ceiling.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from decode_layers import MERGED_SHAPES, SHAPES, bench_cold, copies_for, random_packed, with_copies

from misq.runtime import launch_plan
from misq.runtime.layout import block_cols
from misq.runtime.triton_common import write_out


@triton.jit
def _stream4(wa, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, N, n_blocks, blocks_per_split, BN: tl.constexpr,
             GROUPS: tl.constexpr, EXCHANGE: tl.constexpr, AT_ONCE: tl.constexpr = 0):
    """Program (pid_n, pid_s) reads what _decode_h2 reads for a 4-bit segment with groups of 128
    (word rows r and r + 8 of its blocks, int32 [8, BN] each; GROUPS: the blocks' scales and
    zeros [BN]) and folds them into int32 [BN]: stored to out [split, N] as float32, or (EXCHANGE)
    summed through write_out's split-K exchange into out [1, N]. AT_ONCE > 0 (= blocks_per_split,
    words only): the loop unrolled, so that all of a program's loads are in flight together (one
    round trip a program instead of one a block, at AT_ONCE times the registers)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    r = tl.arange(0, 8)
    acc = tl.zeros((8, BN), dtype=tl.int32)
    b_lo = pid_s * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, n_blocks)
    if AT_ONCE > 0:
        for i in tl.static_range(AT_ONCE):
            wp = wa + ((b_lo + i) * 16 + r)[:, None] * N + offs_n[None, :]
            m = n_ok[None, :] & (b_lo + i < b_hi)
            acc = acc ^ (tl.load(wp, mask=m, other=0) + tl.load(wp + 8 * N, mask=m, other=0))
    for blk in range(b_lo, b_hi if AT_ONCE == 0 else b_lo):
        wp = wa + (blk * 16 + r)[:, None] * N + offs_n[None, :]
        v = tl.load(wp, mask=n_ok[None, :], other=0)
        u = tl.load(wp + 8 * N, mask=n_ok[None, :], other=0)
        acc = acc ^ (v + u)
        if GROUPS:
            s = tl.load(s_ptr + blk * N + offs_n, mask=n_ok, other=0.0)
            z = tl.load(z_ptr + blk * N + offs_n, mask=n_ok, other=0)
            acc = acc + (s.to(tl.int16, bitcast=True).to(tl.int32) + z.to(tl.int32))[None, :]
    y = tl.sum(acc, axis=0).to(tl.float32)[None, :]
    om = tl.arange(0, 1)
    if EXCHANGE:
        write_out(y, om, om < 1, offs_n, n_ok, N, pid_n, out_ptr, N, ws_ptr, cnt_ptr, out_ptr, False, 2)
    else:
        tl.store(out_ptr + pid_s * N + offs_n[None, :] + om[:, None], y, mask=n_ok[None, :])


def _stream_call(lin, variant: str):
    """A callable launching _stream4 (``variant``) over ``lin``'s one 4-bit segment, on the grid
    and settings the runtime's batch-1 plan gives it."""
    seg = lin.segments[0]
    R = lin.out_features
    cfg = launch_plan.config_for(1, seg.bits, R, seg.n)
    lc = launch_plan.plan([seg], cfg, R, 1)
    groups, exchange = variant.startswith("words+groups"), variant.endswith("exchange")
    at_once = lc.bps[0] if variant == "words at once" else 0
    out = torch.zeros(1 if exchange else lc.split, R, dtype=torch.float32, device="cuda")
    ws = torch.zeros(1, R, dtype=torch.float32, device="cuda")
    cnt = torch.zeros(lc.n_nblk, dtype=torch.int32, device="cuda")
    opts = {"num_warps": cfg.num_warps}
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    kern = _stream4[(lc.n_nblk, lc.split)]
    n_blocks = -(-seg.n // block_cols(seg.bits))
    return lambda: kern(seg.words[4], seg.scales, seg.zeros, out, ws, cnt, R, n_blocks, lc.bps[0], BN=cfg.block_n,
                        GROUPS=groups, EXCHANGE=exchange, AT_ONCE=at_once, **opts)


def run(shapes: dict, cold_bytes: int) -> list[dict]:
    rows = []
    for name, (R, C) in shapes.items():
        lin, _ = random_packed(R, C, (4, 4), 0.0)
        seg = lin.segments[0]
        nbytes = sum(t.numel() * t.element_size() for t in (*seg.words.values(), seg.scales, seg.zeros))  # what h2 reads
        copies = with_copies(lin, "4bit_g128", cold_bytes)
        x = torch.randn(1, C, device="cuda", dtype=torch.float16)
        row = {"shape": name, "bytes": nbytes, "copies": len(copies)}
        with torch.no_grad():
            row["runtime_us"] = bench_cold([lambda m=m, x=x: m(x) for m in copies])
            for variant in ("words", "words at once", "words+groups", "words+groups+exchange"):
                row[f"{variant}_us"] = bench_cold([_stream_call(m, variant) for m in copies])
            dense = [torch.randn(R, C, device="cuda", dtype=torch.float16) for _ in range(copies_for(2 * R * C, cold_bytes))]
            row["fp16_cublas_us"] = bench_cold([lambda w=w, x=x: x @ w.t() for w in dense])
            del dense
            words = [m.segments[0].words[4] for m in copies]
            dst = torch.empty_like(words[0])
            row["copy_words_us"] = bench_cold([lambda w=w, d=dst: d.copy_(w) for w in words])
        for k in [k for k in row if k.endswith("_us")]:
            moved = 2 * words[0].numel() * 4 if k == "copy_words_us" else (2 * R * C if k == "fp16_cublas_us" else nbytes)
            row[k.replace("_us", "_tb_s")] = moved / row[k] / 1e6
        print(json.dumps(row), flush=True)
        rows.append(row)
        del copies, words
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="h2_ceiling.json")
    ap.add_argument("--cold-mib", type=int, default=256)
    ap.add_argument("--merged-shapes", action="store_true", help="also the merged q/k/v and gate/up shapes")
    args = ap.parse_args()
    shapes = SHAPES | (MERGED_SHAPES if args.merged_shapes else {})
    res = {"device": torch.cuda.get_device_name(), "rows": run(shapes, args.cold_mib << 20)}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
