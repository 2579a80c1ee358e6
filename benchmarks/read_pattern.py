"""How fast a GPU streams weights read the way the batch-1 h2 kernel reads them (issue 14).

The h2 kernel (misq.runtime.half2_kernel) reaches about 3.3 TB/s marginal with 4-bit weights from
memory, fp16 cuBLAS's GEMV about 3.9 (BENCHMARKS.md, session 19). This asks whether the access
pattern alone explains part of the gap, with the kernel's math taken out: a Triton kernel with the
h2 kernel's grid (programs of BLOCK_N output features, split-K runs of ``bps`` layout blocks,
2 warps) that loads each block's 16 word rows and only folds them together (an xor, so that no load
is dead), over a weight array of about 0.5 GB (10x an H200's L2, so every byte comes from memory):

* ``strided``: the runtime's layout, words [16 blocks, N] row-major, so a block is 16 pieces of
  BLOCK_N x 4 bytes, N x 4 bytes apart (misq.runtime.layout);
* ``tiled``: the same words stored so that each (feature tile, block) is one contiguous
  16 x BLOCK_N x 4 bytes;
* ``strided_x2``: the runtime's layout, two blocks' loads issued before either is folded (twice
  the bytes in flight a program, as the dropped loads-ahead option aimed at);

against torch's fp16 GEMV (cuBLAS) over the same number of bytes. GB/s = bytes read / time.

    PYTHONPATH=src python3 benchmarks/read_pattern.py --out read_pattern.json
"""

from __future__ import annotations

import argparse
import json

import torch

from misq.runtime.triton_common import HAVE_TRITON

ROWS = 16  # word rows of a 4-bit layout block (128 columns, 8 codes a word, two halves); the kernel's 16


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _xor(a, b):
        return a ^ b

    @triton.jit
    def _block(w_ptr, blk, b_hi, pid_n, n_blocks, N, offs_n, BN: tl.constexpr, TILED: tl.constexpr):
        """int32 [16, BN]: block blk's word rows for features offs_n (zeros past b_hi)."""
        r = tl.arange(0, 16)
        if TILED:  # tile (pid_n, blk): 16 x BN words in a row
            p = w_ptr + ((pid_n * n_blocks + blk) * 16 + r)[:, None] * BN + tl.arange(0, BN)[None, :]
        else:  # the runtime's layout: word row blk * 16 + r, feature n at row * N + n
            p = w_ptr + (blk * 16 + r)[:, None] * N + offs_n[None, :]
        return tl.load(p, mask=blk < b_hi, other=0)

    @triton.jit
    def read_blocks(w_ptr, out_ptr, N, n_blocks, bps, BN: tl.constexpr, TILED: tl.constexpr, TWO: tl.constexpr):
        """out[pid_s, features] = xor over split-K run pid_s's blocks of their word rows, int32;
        TWO: two blocks' loads issued before either is folded."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((16, BN), dtype=tl.int32)
        b_lo = pid_s * bps
        b_hi = tl.minimum(b_lo + bps, n_blocks)
        if TWO:
            for blk in range(b_lo, b_hi, 2):
                a = _block(w_ptr, blk, b_hi, pid_n, n_blocks, N, offs_n, BN, TILED)
                b = _block(w_ptr, blk + 1, b_hi, pid_n, n_blocks, N, offs_n, BN, TILED)
                acc = acc ^ a ^ b
        else:
            for blk in range(b_lo, b_hi):
                acc = acc ^ _block(w_ptr, blk, b_hi, pid_n, n_blocks, N, offs_n, BN, TILED)
        tl.store(out_ptr + pid_s * N + offs_n, tl.reduce(acc, 0, _xor))


def run(n_features: int, n_blocks: int, bps: int, block_n: int, warps: int) -> dict:
    """GB/s of each pattern and of fp16 cuBLAS GEMV over the same bytes."""
    from triton.testing import do_bench

    words = torch.randint(-2**31, 2**31 - 1, (n_blocks * ROWS, n_features), dtype=torch.int32, device="cuda")
    nbytes = words.numel() * 4
    split = -(-n_blocks // bps)
    grid = (n_features // block_n, split)
    out = torch.empty(split, n_features, dtype=torch.int32, device="cuda")
    # the tiled copy: [feature tiles, blocks, ROWS, BN]
    tiled = words.view(n_blocks, ROWS, n_features // block_n, block_n).permute(2, 0, 1, 3).contiguous()
    res = {"bytes": nbytes, "grid": list(grid), "bps": bps, "block_n": block_n, "warps": warps}

    def launch(w, is_tiled: bool, two: bool):
        read_blocks[grid](w, out, n_features, n_blocks, bps, BN=block_n, TILED=is_tiled, TWO=two, num_warps=warps)

    launch(words, False, False)
    ref = out.clone()
    launch(tiled, True, False)
    assert torch.equal(out, ref), "the tiled copy read other words"
    launch(words, False, True)
    assert torch.equal(out, ref), "two blocks a step read other words"
    for name, w, t, u in (("strided", words, False, False), ("tiled", tiled, True, False),
                          ("strided_x2", words, False, True)):
        ms = do_bench(lambda w=w, t=t, u=u: launch(w, t, u), warmup=50, rep=400)
        res[name] = {"us": ms * 1e3, "GB_s": nbytes / ms / 1e6}
    del tiled
    mat = words.view(torch.float16)  # the same bytes as fp16 [rows, 2 N] (timing only: any bits will do)
    x = torch.randn(mat.shape[1], dtype=torch.float16, device="cuda")
    ms = do_bench(lambda: torch.mv(mat, x), warmup=50, rep=400)
    res["fp16_cublas_gemv"] = {"us": ms * 1e3, "GB_s": mat.numel() * 2 / ms / 1e6}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=13824, help="N, output features (a multiple of --block-n)")
    ap.add_argument("--blocks", type=int, default=600, help="layout blocks along K (default: about 0.5 GB of words)")
    ap.add_argument("--bps", default="6,3,12", help="blocks a split-K program, comma-separated (the 4-bit default on "
                    "13824 x 5120 takes 6)")
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    if args.features % args.block_n:
        ap.error(f"--features {args.features} is not a multiple of --block-n {args.block_n}")
    rows = []
    for bps in (int(b) for b in args.bps.split(",")):
        rows.append(run(args.features, args.blocks, bps, args.block_n, args.warps))
        r = rows[-1]
        print(f"bps {bps}: " + ", ".join(f"{k} {r[k]['GB_s']:.0f} GB/s ({r[k]['us']:.1f} us)"
                                        for k in ("strided", "tiled", "strided_x2", "fp16_cublas_gemv")), flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
