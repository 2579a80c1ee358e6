"""The packed runtime's Triton kernels run by Triton's CPU interpreter, against
dequantize-then-matmul: the arithmetic of every kernel path, checked without a GPU (CI).

tests/test_runtime_gpu.py checks the same paths on a GPU, but is skipped wherever there is none.
With ``TRITON_INTERPRET=1`` Triton runs each program of a launch in numpy, on CPU tensors, so
every decode config (CUDA-core fma, tensor-core mma with x gathered in the kernel or before it,
deep split-K through the workspace, per-tile dot), the fused prefill,
the dequantize kernel and the column gathers can be checked here for wrong numbers; not for
speed, nor for what only the compiler does (inline PTX, which misq.runtime.triton_common
replaces with plain fp16 operations under the interpreter).

The interpreter must be chosen before triton and misq.runtime are imported, so this runs as a
script in processes of its own (tests/test_kernels_interpreted.py starts it)::

    python tests/kernels_interpreted.py OUT.json [--jobs N]

OUT.json: ``{"meta": {...}, "cases": {case id: {"ratio": max error / fp16 tolerance (gather:
0, or inf where it differs from index_select), "error": exception or null, "skipped": reason or
null}}}``. Importing this module sets nothing up: :func:`cases` is pure, so the test module
builds its parameters from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (widths, group size, pattern), as tests/test_runtime_gpu.py's CASES: the fast paths (3/4-bit g128,
# 50% sparse, mixed, act-order g32, 2:4) and the exact path (uneven groups, 5/6/8 bits, 16-bit columns).
LAYERS: list[tuple[tuple[int, ...], int, str]] = [
    ((4,), 128, "dense"), ((3,), 128, "dense"), ((4,), 128, "unstructured"), ((3,), 32, "2:4"),
    ((3, 4), 128, "dense"), ((2, 3, 4, 6, 8, 16), 32, "unstructured"), ((8,), 0, "dense"), ((6,), 32, "dense"),
    ((5,), 0, "dense"), ((2,), 128, "dense")]
# Decode configs, name -> launch_plan.Config arguments: the GPU tests' (fma at M = 1 with x gathered in
# the kernel or before it, float32 and pre-scaled; mma with x gathered in the kernel or before it;
# deep split-K; per-tile dot; the fp16 pairs kernel with x gathered before it or in it), and a
# tensor-core run with no split-K at all.
DECODE_CONFIGS: dict[str, tuple[tuple[Any, ...], dict[str, bool]]] = {
    "fma": (("fma", 64, 2112, 4), {}), "mma": (("mma", 32, 64, 4), {}),
    "mma_pregather": (("mma", 64, 2112, 4), {"pregather": True}), "mma_split": (("mma", 64, 4096, 4), {}),
    "dot": (("dot", 128, 2112, 4), {}), "fma_pregather": (("fma", 64, 2112, 4), {"pregather": True}),
    "mma_nosplit": (("mma", 32, 1, 4), {}), "h2": (("h2", 128, 2112, 4), {"pregather": True}),
    "h2_nosplit": (("h2", 64, 1, 4), {"pregather": True}), "h2_fused": (("h2", 128, 2112, 4), {})}
DECODE_RUNS = [(1, "fma"), (1, "mma"), (5, "mma"), (5, "mma_pregather"), (16, "mma_split"), (3, "dot"),
               (1, "fma_pregather"), (5, "mma_nosplit"), (1, "h2"), (1, "h2_nosplit"), (1, "h2_fused")]
# merged layers: the batch-1 fp16-pairs path (one width; a mixed 3/4 pair) and the exact path with 16-bit columns
MERGED_LAYERS = [((4,), 128, "unstructured"), ((3, 4), 128, "dense"), ((2, 3, 4, 6, 8, 16), 32, "unstructured")]
PREFILL_ROWS = 40
# the gated gate/up layer's paths: (path, rows)
GLU_RUNS = [("decode:h2", 1), ("decode:h2_nosplit", 1), ("decode:h2_fused", 1), ("forward", 1), ("decode:fma", 1),
            ("decode:mma_split", 16), ("decode:mma_nosplit", 5), ("forward", 16), ("forward", PREFILL_ROWS)]
LAYER_ROWS = 72  # output features: two BLOCK_N slices of 64, the second partial
GATHERS = [(1, 389, 389), (16, 5120, 5120), (13, 13824, 7000)]  # (rows, columns of x, indices)


@dataclass(frozen=True)
class Case:
    """One layer, one kernel path, one number of rows of x."""

    path: str  # "forward" (PackedLinear's dispatch), "decode:<config>", "prefill_fused", "prefill_dequant"
    rows: int
    widths: tuple[int, ...]
    groupsize: int
    pattern: str
    bias: bool = False
    maskless: bool = False  # lightly pruned: zeros stored as codes at the zero point, no mask
    x_scale: float = 1.0  # x is randn times this (4096: the h2 kernel's per-block scaling of large x)
    merged: bool = False  # three act-order layers of one column order merged into one (misq.runtime.merge)
    cols: int = 0  # columns of the layer (0: 389, or 392 for 2:4)
    out_rows: int = 0  # output features (0: LAYER_ROWS); a multiple of 64 fills every BLOCK_N slice, none partial
    glu: bool = False  # gate and up of LAYER_ROWS rows each, merged gated (misq.runtime.merge.merge_gated)

    @property
    def id(self) -> str:
        layer = f"w{'.'.join(map(str, self.widths))}-g{self.groupsize}-{self.pattern}{'-maskless' * self.maskless}"
        big = f"-x{self.x_scale:g}" if self.x_scale != 1.0 else ""
        wide = f"-c{self.cols}" if self.cols else ""
        tall = f"-n{self.out_rows}" if self.out_rows else ""
        return (f"{self.path}-m{self.rows}{'-bias' * self.bias}{big}-{layer}{'-merged' * self.merged}{'-glu' * self.glu}"
                f"{wide}{tall}")


@dataclass(frozen=True)
class GatherCase:
    """The column gather (kernels.gather_columns) of ``picks`` of a row view's ``cols`` columns."""

    rows: int
    cols: int
    picks: int

    @property
    def id(self) -> str:
        return f"gather-m{self.rows}-c{self.cols}-k{self.picks}"


def cases() -> list[Case | GatherCase]:
    """Every check the script runs, in order (ids unique)."""
    out: list[Case | GatherCase] = []
    for layer in LAYERS:
        # the layer's own dispatch (default configs; at 5 rows that is decode:mma_pregather)
        out += [Case("forward", rows, *layer, bias=rows == 16) for rows in (1, 16)]
        out += [Case(f"decode:{name}", rows, *layer, bias=rows == 5) for rows, name in DECODE_RUNS]
        out += [Case(path, PREFILL_ROWS, *layer, bias=True) for path in ("prefill_fused", "prefill_dequant")]
    for widths, pattern in (((4,), "dense"), ((4,), "unstructured"), ((3,), "dense")):
        out += [Case(f"decode:{cfg}", 1, widths, 128, pattern, x_scale=4096.0)  # x past fp16's range for its sums
                for cfg in ("h2", "h2_fused")]
    for widths in ((4,), (3,), (3, 4)):  # h2 groups of several 128-column runs, or one group a row
        out += [Case("decode:h2_nosplit", 1, widths, g, "dense", cols=1100) for g in (0, 256, 512)]
    for widths in ((4,), (3,), (3, 4)):  # rows a multiple of BLOCK_N: every h2 program's slice full
        out += [Case(f"decode:{cfg}", 1, widths, 128, "dense", bias=cfg == "h2", out_rows=128) for cfg in ("h2", "h2_fused")]
    for widths in ((3,), (3, 4)):  # several 3-bit blocks (512 columns) a program, the last partial
        out += [Case("decode:h2_nosplit", 1, widths, 128, "dense", cols=1100),
                Case("decode:mma_nosplit", 16, widths, 128, "dense", cols=1100)]
    for widths in ((4,), (3, 4)):
        out += [Case("forward", rows, widths, 128, "unstructured", maskless=True) for rows in (1, 16)]
        out.append(Case("prefill_dequant", PREFILL_ROWS, widths, 128, "unstructured", maskless=True))
    for layer in MERGED_LAYERS:  # q/k/v-like layers merged: the layer's own dispatch at decode and prefill
        out += [Case(path, rows, *layer, bias=rows == 16, merged=True)
                for path, rows in (("forward", 1), ("forward", 16), ("prefill_dequant", PREFILL_ROWS))]
    # gate/up merged gated: SiLU(gate) * up made by the kernel that writes the output (direct, or the
    # split-K workspace's last program), by each decode path, and by torch after prefill's matmul
    for layer, runs in ((((4,), 128, "unstructured"), GLU_RUNS), (((3, 4), 128, "dense"), GLU_RUNS[:4]),
                        (((2, 3, 4, 6, 8, 16), 32, "unstructured"), GLU_RUNS[3:])):
        out += [Case(path, rows, *layer, bias=rows == 16, glu=True) for path, rows in runs]
    return out + [GatherCase(*g) for g in GATHERS]


def fp16_tolerance(x, W, ref):
    """What the fp16 roundings allow (as in tests/test_runtime_gpu.py): each dense weight is within
    half an fp16 ulp (2**-11 relative) of ``scale * (code - zero)``, which the decode kernel uses
    unrounded, so the outputs may differ by up to 2**-11 * (|x| @ |W|^T); the output itself is
    rounded to fp16 (half an ulp, doubled for the float32 sums' order)."""
    return 2.0 ** -11 * (x.abs().double() @ W.abs().double().t()) + 2.0 ** -10 * ref.abs() + 1e-5


def gated_tolerance(ref, tolerance):
    """(SiLU(gate) * up, its tolerance) from the gate/up pairs' exact outputs ref [M, 2n] and their
    tolerances: SiLU's slope is within [-0.1, 1.1], and the activation is rounded to fp16 (from
    float32 sums in the kernel, from fp16 gate and up after prefill's matmul: both within this)."""
    import torch

    gate, up = ref[:, 0::2], ref[:, 1::2]
    silu = gate * torch.sigmoid(gate)
    act = silu * up
    tol = 1.1 * tolerance[:, 0::2] * up.abs() + silu.abs() * tolerance[:, 1::2] + 2.0 ** -10 * act.abs() + 1e-5
    return act, tol


# The interpreter these scripts were written against: Triton 3.9's refuses masks that 3.6 and the
# compiled kernels take ("mask has unsupported dtype"); .ci/run installs 3.6.
TRITON_SERIES = "3.6."


def run_script(script: Path, out: Path, timeout_s: float = 300) -> dict[str, Any]:
    """Run an interpreted-kernel script (this one, or tests/solver_kernels_interpreted.py) as
    ``python SCRIPT OUT`` in a child process with the repository's src/ on PYTHONPATH (the
    interpreter must be chosen before triton is imported, which a pytest process may have done)
    and return OUT's JSON; RuntimeError with the child's output if it fails."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo / "src"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{script.name} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def select_interpreter() -> bool:
    """Select Triton's CPU interpreter in this process (before triton and any misq kernel module
    are imported) and mend one incompatibility: Triton 3.6's interpreter turns a tensor into a
    Python int (``range(lo, hi)`` over program-id arithmetic) with ``int(ndarray of shape (1,))``,
    which numpy >= 2.4 refuses; take the element instead (only where the interpreter has that
    hook). Returns whether the hook was there (shimmed)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is not None and not getattr(patch_tensor, "misq_index_shim", False):

        def patch_with_scalar_index(tensor, scope) -> None:
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        patch_with_scalar_index.misq_index_shim = True
        interpreter._patch_lang_tensor = patch_with_scalar_index
    return patch_tensor is not None


def install_interpreter() -> dict[str, Any]:
    """:func:`select_interpreter`, quieter warnings, and tests/ on the path; returns what was set
    up, for OUT.json's "meta"."""
    shimmed = select_interpreter()
    import triton
    # Masked-off lanes (x's padding rows, what a masked atomic returns) hold whatever the
    # interpreter left there, so arithmetic on them (the bias added, the cast to fp16) warns; they
    # are never stored. A valid lane's overflow or NaN shows as an infinite ratio.
    warnings.filterwarnings("ignore", "(overflow|invalid value) encountered", RuntimeWarning, r"triton\.runtime\.interpreter")
    tests_dir = str(Path(__file__).resolve().parent)
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)  # runtime_layers
    from misq.runtime import tile_kernel, triton_common

    return {"interpreted": os.environ.get("TRITON_INTERPRET") == "1" and triton_common._INTERPRET,
            "have_triton": triton_common.HAVE_TRITON, "kernel_type": type(tile_kernel._decode_mm).__name__,
            "index_shim": shimmed, "triton": triton.__version__}


def _layer(case: Case, cache: dict) -> tuple[Any, Any]:
    """(PackedLinear, dense fp16 weight), shaped as the GPU tests' (odd column counts, partial last
    groups and blocks); a fresh copy each case, as a case may set its bias."""
    from runtime_layers import random_layer

    key = (case.widths, case.groupsize, case.pattern, case.maskless, case.rows, case.merged, case.cols, case.out_rows,
           case.glu)
    if key not in cache and case.glu:  # gate and up of one act-order column order, rows interleaved
        import torch

        from misq.runtime.merge import merge_gated

        gate, up = (random_layer(LAYER_ROWS, 389, case.widths, case.groupsize, case.pattern, act_order=True,
                                 seed=case.rows + i, order_seed=98)[:2] for i in range(2))
        cache[key] = merge_gated(gate[0], up[0]), torch.stack([gate[1], up[1]], 1).flatten(0, 1)
    if key not in cache and case.merged:  # rows 72 + 24 + 40: q/k/v of unequal heights, one act-order column order
        import torch

        from misq.runtime.merge import merge_linears

        parts = [random_layer(r, 389, case.widths, case.groupsize, case.pattern, act_order=True, seed=case.rows + i,
                              order_seed=99)[:2] for i, r in enumerate((LAYER_ROWS, 24, 40))]
        cache[key] = merge_linears([lin for lin, _ in parts]), torch.cat([dense for _, dense in parts])
    if key not in cache:
        cols = case.cols or (392 if case.pattern == "2:4" else 389)
        kind = {"pruned": 0.05} if case.maskless else {"act_order": case.groupsize == 32}
        cache[key] = random_layer(case.out_rows or LAYER_ROWS, cols, case.widths, case.groupsize, case.pattern, seed=case.rows, **kind)[:2]
    lin, dense = cache[key]
    return copy.deepcopy(lin), dense


def _runner(case: Case, lin) -> tuple[Any, str | None]:
    """(x -> y through the case's kernel path, None) or (None, why the path does not apply)."""
    from misq.runtime.launch_plan import Config

    if case.path == "forward":  # the layer's own dispatch, as on CUDA
        lin._kernel_ok = lambda x: True
        return lin, None
    if case.path == "prefill_fused":
        ok = lin.fused_prefill_ok()
        return (lin._prefill_fused, None) if ok else (None, "the fused prefill kernel does not take this layer "
                                                            "(16-bit columns, > 2 widths or > 10 bits)")
    if case.path == "prefill_dequant":
        return lin._prefill_dequant, None
    args, flags = DECODE_CONFIGS[case.path.removeprefix("decode:")]
    configs = [Config(*args, **flags)] * len(lin.segments)
    return (lambda x: lin._decode(x, configs)), None


def _run_gather(case: GatherCase) -> dict[str, Any]:
    """kernels.gather_columns' launch (on CPU it calls index_select instead) on a view into a
    wider x, against index_select."""
    import torch
    import triton

    from misq.runtime import kernels

    torch.manual_seed(case.rows)
    x = torch.randn(case.rows, case.cols + 8, dtype=torch.float16)[:, 4:case.cols + 4]
    idx = torch.randperm(case.cols)[:case.picks].to(torch.int32)
    out = torch.empty(case.rows, case.picks, dtype=x.dtype)
    kernels._gather_cols[(triton.cdiv(case.picks, kernels.GATHER_BLOCK), case.rows)](
        x, idx, out, case.picks, x.stride(0), out.stride(0), BLOCK=kernels.GATHER_BLOCK)
    return {"ratio": 0.0 if torch.equal(out, x.index_select(1, idx)) else float("inf"), "error": None, "skipped": None}


def run_case(case: Case | GatherCase, cache: dict) -> dict[str, Any]:
    """{"ratio", "error", "skipped"}: max |y - ref| / tolerance over the calls (decode twice: the
    second finds the split-K workspace as the first left it)."""
    import torch

    if isinstance(case, GatherCase):
        return _run_gather(case)
    torch.manual_seed(case.rows)
    lin, dense = _layer(case, cache)
    if case.bias:
        lin.bias = torch.randn(lin.out_features, dtype=torch.float16)
    run, why_not = _runner(case, lin)
    if run is None:
        return {"ratio": None, "error": None, "skipped": why_not}
    x = (torch.randn(case.rows, lin.in_features) * case.x_scale).to(torch.float16)
    ref = x.double() @ dense.double().t()
    if lin.bias is not None:
        ref += lin.bias.double()
    tolerance = fp16_tolerance(x, dense, ref)
    if case.glu:
        ref, tolerance = gated_tolerance(ref, tolerance)
    ratio = 0.0
    for _ in range(1 if case.path.startswith("prefill") else 2):
        y = run(x)
        if y.dtype != torch.float16 or tuple(y.shape) != (case.rows, lin.output_features):
            return {"ratio": None, "error": f"output {y.dtype} {tuple(y.shape)}, expected float16 "
                                            f"{(case.rows, lin.output_features)}", "skipped": None}
        err = ((y.double() - ref).abs() / tolerance).nan_to_num(nan=float("inf"))
        ratio = max(ratio, err.max().item())
    return {"ratio": ratio, "error": None, "skipped": None}


def _failure(exc: Exception) -> str:
    """The exception and the innermost misq frame it passed through (a kernel line, usually)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f for f in reversed(frames) if "misq" in f.filename or "kernels_interpreted" in f.filename), frames[-1])
    return f"{type(exc).__name__}: {str(exc)[:500]} ({Path(where.filename).name}:{where.lineno})"


def run_cases(batch: list[Case | GatherCase]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({case id: result}, interpreter state) for one batch (in a worker process)."""
    state = install_interpreter()
    results, cache = {}, {}
    for case in batch:
        try:
            results[case.id] = run_case(case, cache)
        except Exception as exc:  # one failing path must not hide the others
            results[case.id] = {"ratio": None, "error": _failure(exc), "skipped": None}
    return results, state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the results (JSON)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (the interpreter is single-threaded Python)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    batches: dict[Any, list[Case | GatherCase]] = {}  # a layer's cases share a worker (and its copy of the layer)
    for case in cases():
        key = (case.widths, case.groupsize, case.pattern, case.maskless, case.merged) if isinstance(case, Case) else "gather"
        batches.setdefault(key, []).append(case)
    ordered = sorted(batches.values(), key=lambda b: -sum(len(getattr(c, "widths", ())) for c in b))  # longest first
    if args.jobs <= 1:
        done = [run_cases(b) for b in ordered]
    else:  # spawned, not forked: each worker selects the interpreter before it imports triton
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(run_cases, ordered, chunksize=1)
    by_id = {k: v for batch_results, _ in done for k, v in batch_results.items()}
    results = {case.id: by_id[case.id] for case in cases()}
    states = [state for _, state in done]
    meta = {**states[0], "interpreted": all(s["interpreted"] for s in states), "jobs": args.jobs,
            "seconds": round(time.perf_counter() - started, 1)}
    args.out.write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    failed = [k for k, r in results.items() if r["error"] is not None or (r["ratio"] is not None and r["ratio"] > 1.0)]
    skipped = sum(r["skipped"] is not None for r in results.values())
    print(f"{len(results)} cases, {len(failed)} failed, {skipped} skipped, {meta['seconds']} s "
          f"({args.jobs} jobs, interpreted: {meta['interpreted']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
