"""Instructions a weight in the batch-1 decode kernels' main loop, from sm_90 SASS compiled on any
machine (no GPU needed): Triton compiles ``tile_kernel._decode_mm`` (float32, ``fma``) and, at 3
and 4 bits, ``half2_kernel._decode_h2`` (fp16 pairs, ``h2``) for ``GPUTarget("cuda", 90, 32)``,
its bundled cuobjdump disassembles the cubin, and the loop is the span of the backward branch.

The fma kernel is issue-bound on an H200 (ncu, BENCHMARKS.md session 9), so this count is the
figure to watch when changing it. Each line also gives the registers a thread (they bound the
programs an SM holds), the spills and the barriers in the loop (a layout conversion through
shared memory: the 4-bit h2 loop at 2 warps has four a block, from its scales and zeros):

    python3 benchmarks/kernel_sass.py                 # 4-bit, BLOCK_N 64, 4 warps, every x path
    python3 benchmarks/kernel_sass.py --bits 3 --block-n 64 --warps 2

The tensor-core kernel at 2-16 rows (``mma_kernel._mma_mm``, BM 16) is latency-bound instead
(ncu, session 9), so for it ``--mma`` prints the order of the loop's memory operations, barriers
and wgmma: a global load issued after a shared-memory barrier waits for everything before it.

    python3 benchmarks/kernel_sass.py --mma --bits 3

The coordinate descent's block kernel (``fused_descent._descent_kernel``) walks a block's columns
in one dependent chain a row; ``--descent`` prints its instructions a thread a column step.

    python3 benchmarks/kernel_sass.py --descent
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile


def _compile(kern, ptrs: dict[str, str], consts: dict, aligned: tuple[str, ...], warps: int, stages: int = 1,
             fp_fusion: bool = True, maxnreg: int = 0):
    """Triton's compile of ``kern`` for sm_90 (no GPU needed), pointers and ``aligned`` ints taken
    as 16-divisible as on the GPU; ``fp_fusion`` as the launch's ``enable_fp_fusion``; ``maxnreg``
    > 0 as launch_plan.Config.maxnreg (registers capped)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexpr arguments left out take their defaults, as a launch's do (not an i32 argument's branch)
    consts = {**{p.name: p.default for p in kern.params if p.is_constexpr and p.has_default}, **consts}
    sig = {n: ("constexpr" if n in consts else ptrs.get(n, "i32")) for n in kern.arg_names}
    idx = [i for i, n in enumerate(kern.arg_names) if n in ptrs or n in aligned]
    src = ASTSource(fn=kern, signature=sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in idx})
    options = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": fp_fusion}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loop_sass(bits: int, block_n: int, warps: int, xprep: bool, h2: bool = False,
              maxnreg: int = 0) -> tuple[list[str], int]:
    """The SASS lines of the batch-1 kernel's main loop, and the kernel's registers a thread (groups of 128, split-K MODE 2):
    _decode_mm's fma path, or (h2) half2_kernel._decode_h2 (3 and 4 bits; xprep false: x gathered
    in the kernel, FUSED)."""
    from misq.runtime.half2_kernel import _decode_h2
    from misq.runtime.tile_kernel import _decode_mm

    if h2:
        seg = dict(xp="*i32", xs="*fp32", q="*i32", wa="*i32", wb="*i32", s="*fp16", z="*u8")
        ptrs = dict(x_ptr="*fp16", out_ptr="*fp16", ws_ptr="*fp32", cnt_ptr="*i32", bias_ptr="*fp16",
                    **{f"{k}{i}": v for i in (1, 2) for k, v in seg.items()})
        consts = dict(BITS1=bits, BITS2=bits, NSEG=1, BN=block_n, MODE=2, HAS_BIAS=False, FUSED=not xprep,
                      LIMIT_LOG2=8, PDL=False)  # one segment: the loop is the same for either of a pair's
        consts |= dict(u1=1, u2=1)  # groups of 128 columns: Triton specializes the argument 1
        compiled = _compile(_decode_h2, ptrs, consts, ("N", "stride_om"), warps, maxnreg=maxnreg)
    else:
        ptrs = dict(x_ptr="*fp32" if xprep else "*fp16", perm_ptr="*i32", out_ptr="*fp16", ws_ptr="*fp32",
                    cnt_ptr="*i32", bias_ptr="*fp16", wa="*i32", wb="*i32", wc="*i32", wd="*i32", s_ptr="*fp16",
                    z_ptr="*u8", g_ptr="*i32")
        consts = dict(BITS=bits, PA=bits, PB=0, PC=0, PD=0, GROUP=128, BM=1, BN=block_n, DOT=False, MODE=2,
                      HAS_BIAS=False, XPREP=xprep)
        compiled = _compile(_decode_mm, ptrs, consts, ("N", "n_cols", "stride_xm", "stride_om", "magic"), warps)
    return _loop(_sass(compiled)), registers(compiled)


def _cuobjdump(compiled, flag: str) -> str:
    """Triton's bundled cuobjdump run with ``flag`` on a compiled kernel's cubin."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, flag, cubin], capture_output=True, text=True, check=True).stdout


def _sass(compiled) -> list[str]:
    """The instruction lines of a compiled kernel's cubin."""
    sass = _cuobjdump(compiled, "-sass")
    return [ln for ln in sass.splitlines() if ln.strip().startswith("/*") and "*/" in ln and len(ln.split("*/")[1].split()) > 0]


def registers(compiled) -> int:
    """Registers a thread of the compiled kernel (cuobjdump -res-usage): with the warps a program,
    they bound how many programs an SM holds, and so the loads in flight."""
    return int(re.search(r"REG:(\d+)", _cuobjdump(compiled, "-res-usage")).group(1))


def _loop(lines: list[str], widest: bool = False) -> list[str]:
    """The lines of the first loop (``widest``: the longest one): from a backward branch's target
    to the branch."""

    def addr(ln: str) -> int:
        return int(ln.split("*/")[0].strip()[2:], 16)

    def target(ln: str) -> int | None:
        body = ln.split("*/")[1]
        if " BRA " not in f" {body} ":
            return None
        return int(next(w for w in body.split("BRA")[1].replace(",", " ").split() if w.startswith("0x")).rstrip(";"), 16)

    back = [ln for ln in lines if target(ln) is not None and target(ln) < addr(ln)]
    if not back:
        raise SystemExit("no loop found in the SASS")
    loop = max(back, key=lambda ln: addr(ln) - target(ln)) if widest else back[0]
    lo, hi = target(loop), addr(loop)
    return [ln for ln in lines if lo <= addr(ln) <= hi]


def mma_loop_sass(bits: int, block_n: int, warps: int, stages: int) -> tuple[list[str], int]:
    """The SASS lines of the tensor-core kernel's loop over layout blocks at BM 16 (2-16 rows of x,
    pregathered; groups of 128; one segment; split-K MODE 2), as the decode path launches it, and
    its registers a thread."""
    from misq.runtime.layout import chunk_tiles, pieces
    from misq.runtime.mma_kernel import _mma_mm

    names = ("PA", "PB", "PC", "PD")
    pc = dict.fromkeys(names, 0) | dict(zip(names, pieces(bits), strict=False))
    consts = dict(NSEG=1, BM=16, BN=block_n, GATHER=False, MODE=2, HAS_BIAS=False)
    ptrs = dict(out_ptr="*fp16", ws_ptr="*fp32", cnt_ptr="*i32", bias_ptr="*fp16")
    for i in (1, 2):
        consts |= {f"BITS{i}": bits, f"GROUP{i}": 128, f"TC{i}": chunk_tiles(bits), f"EVEN{i}": True,
                   **{f"{k}{i}": v for k, v in pc.items()}}
        ptrs |= {f"x{i}": "*fp16", f"q{i}": "*i32", f"s{i}": "*fp16", f"z{i}": "*u8", f"g{i}": "*i32",
                 **{f"{w}{i}": "*i32" for w in "abcd"}}
    compiled = _compile(_mma_mm, ptrs, consts, ("N", "stride_xm", "stride_om"), warps, stages)
    return _loop(_sass(compiled)), registers(compiled)


def descent_loop_sass(block_r: int, warps: int) -> list[str]:
    """The SASS lines of the coordinate descent's block kernel's column loop
    (``fused_descent._descent_kernel``, 128-column blocks), compiled as fused_descent_block launches
    it (strides unknown but rows 16-divisible, no fp fusion)."""
    from misq.algorithms.fused_descent import _descent_kernel

    ptrs = dict.fromkeys(("W", "P", "D", "H", "S", "Z", "MQ"), "*fp32") | {"K": "*u8"}
    aligned = ("s_wr", "s_pr", "s_dr", "s_hr", "s_kr", "s_sr", "s_zr", "s_mr")
    compiled = _compile(_descent_kernel, ptrs, dict(BLOCK_R=block_r, BLOCK_B=128), aligned, warps, fp_fusion=False)
    return _loop(_sass(compiled), widest=True)


def memory_order(body: list[str]) -> str:
    """The loop's global loads, shared-memory stores/loads, barriers and wgmma in order, runs of one
    kind counted: e.g. ``LDG x4, BAR, STS x8, BAR, LDS x8, HGMMA x8``."""
    kinds = ("LDG", "STS", "LDS", "BAR", "HGMMA", "DEPBAR", "RED", "ATOM")
    seq: list[list] = []
    for ln in body:
        op = opcode(ln)
        op = "DEPBAR" if op == "WARPGROUP" and "DEPBAR" in ln else op
        if op in kinds:
            if seq and seq[-1][0] == op:
                seq[-1][1] += 1
            else:
                seq.append([op, 1])
    return ", ".join(op if n == 1 else f"{op} x{n}" for op, n in seq)


def opcode(ln: str) -> str:
    words = ln.split("*/")[1].split()
    word = words[1] if words[0].startswith("@") else words[0]
    return word.split(".")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=None, help="warps a program (default 4; 1 with --descent)")
    ap.add_argument("--mma", action="store_true", help="the tensor-core kernel at 2-16 rows: its loop's memory order")
    ap.add_argument("--stages", type=int, default=1, help="with --mma: num_stages")
    ap.add_argument("--descent", action="store_true",
                    help="the coordinate descent's block kernel (8 rows, 1 warp by default): instructions a column step")
    ap.add_argument("--rows", type=int, default=8, help="with --descent: rows a program")
    ap.add_argument("--maxnreg", type=int, default=0,
                    help="h2: registers a thread capped at this (launch_plan.Config.maxnreg; 0: the compiler's choice)")
    args = ap.parse_args()
    from misq.runtime.layout import block_cols

    if args.descent:
        warps = args.warps or 1
        body = descent_loop_sass(args.rows, warps)
        ops = collections.Counter(opcode(ln) for ln in body).most_common(12)
        print(f"descent block kernel, {args.rows} rows, {warps} warp(s): {len(body)} instructions a thread a "
              f"column step\n{ops}\n{memory_order(body)}")
        return

    args.warps = args.warps or 4
    if args.mma:
        body, regs = mma_loop_sass(args.bits, args.block_n, args.warps, args.stages)
        print(f"{args.bits}-bit, BLOCK_N {args.block_n}, {args.warps} warps, {args.stages} stages: {len(body)} "
              f"instructions a thread a block, {regs} registers a thread\n{memory_order(body)}")
        return

    weights = block_cols(args.bits) * args.block_n / (32 * args.warps)  # a layout block's weights a thread
    runs = [(False, False), (True, False)] * (args.bits != 3) + [(True, True), (False, True)] * (args.bits in (3, 4))
    for xprep, h2 in runs:
        body, regs = loop_sass(args.bits, args.block_n, args.warps, xprep, h2, args.maxnreg if h2 else 0)
        spills = sum(opcode(ln) in ("LDL", "STL") for ln in body)  # local memory: registers spilled in the loop
        # a layout conversion through shared memory: its barriers make a program's warps wait for each other
        barriers = sum(opcode(ln).startswith("BAR") for ln in body)
        ops = collections.Counter(opcode(ln) for ln in body).most_common(10)
        if h2:
            how = f"h2 (fp16 pairs, x {'pregathered' if xprep else 'gathered in it'})"
        else:
            how = "x pregathered (float32, pre-scaled)" if xprep else "x gathered in the kernel"
        print(f"{how:<38} {len(body)} instructions a thread a block, {weights:.0f} weights: "
              f"{len(body) / weights:.2f} a weight, {regs} registers a thread, {spills} spills and {barriers} "
              f"barriers in the loop  {ops}")


if __name__ == "__main__":
    main()
