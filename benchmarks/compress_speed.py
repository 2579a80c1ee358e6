#!/usr/bin/env python3
"""Per-layer compression speed of misq on a LLaMA-13B-shaped model (issue 3).

Builds a LlamaForCausalLM with LLaMA-13B's shapes (hidden 5120, FFN 13824, 40 heads, vocab 32000)
and a few randomly initialised decoder layers, in fp16, and times ``misq.compress.driver.compress_model``
at 128 x 2048 random calibration tokens, 50% unstructured sparsity + 4-bit uniform quantization:

  fused     the default driver path (fused Triton block sweep, batched forwards), all layers;
            layer 0 is warm-up and reported apart
  profile   the same on a fresh 2-layer model with synchronising timers inside the solve and the
            Hessian accumulation, for a breakdown of the measured layer
  straight  the straightforward path in the same process: eager per-column loop
            (block_fn=block_loop) and one sequence per forward (batch_size=1)
  stepwise  the default path but every step's forward starting from the layer's input (the
            driver before issue 17: ~4 partial forwards + 1 per layer instead of one), for the
            speed-up of continuing each step from the previous one's activations

plus micro-benchmarks of the pieces (block sweep configs, Hessian GEMM, inverse Cholesky, fp32
GEMM). Run from the repository root on a CUDA machine:

    PYTHONPATH=src python3 benchmarks/compress_speed.py --out "$OUT"

A short table is printed last; full numbers go to ``<out>/compress_speed.json``. ``--small``
shrinks everything for a smoke test (also on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from timing import cuda, now, sync  # benchmarks/ is on sys.path when a script runs

GIB = 1024**3
NOTES: list[str] = []


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if cuda() else float("nan")


def reset_peak() -> None:
    if cuda():
        torch.cuda.reset_peak_memory_stats()


def import_misq():
    from misq.compress import driver

    return driver


# --------------------------------------------------------------------------- model


def build_model(args, layers: int, seed: int, keep: int | None = None):
    """A random LLaMA of ``layers`` decoder layers; with ``keep``, only its first ``keep`` layers
    are kept (so that runs of different depths see identical first layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=max(2048, args.seqlen),
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(seed)
    dev = "cuda" if cuda() else "cpu"
    with torch.device(dev):  # random init on the GPU is seconds; on the host it is minutes
        model = LlamaForCausalLM(cfg)
    dtype = torch.float16 if cuda() else torch.float32
    model = model.to(dtype=dtype).to("cpu").eval()
    if keep is not None and keep < layers:
        model.model.layers = model.model.layers[:keep]
        model.config.num_hidden_layers = keep
    model.config.use_cache = False
    if cuda():
        torch.cuda.empty_cache()
    return model


# --------------------------------------------------------------------------- timers


class Timers:
    """Wall time (synchronised) of named phases, attributed to the current layer."""

    def __init__(self):
        self.layer = 0
        self.by_layer: dict[int, dict[str, float]] = {}
        self.patches: list[tuple[object, str, object]] = []

    def add(self, name: str, dt: float) -> None:
        d = self.by_layer.setdefault(self.layer, {})
        d[name] = d.get(name, 0.0) + dt

    def wrap(self, owner, attr: str, name: str, key=None) -> None:
        """Time ``owner.attr`` as ``name``; with ``key(args)`` also as ``name [key]`` (a per-step split)."""
        fn = getattr(owner, attr)
        timers = self

        def timed(*a, **k):
            t = now()
            try:
                return fn(*a, **k)
            finally:
                dt = now() - t
                timers.add(name, dt)
                if key is not None:
                    timers.add(f"  {name} [{key(a)}]", dt)

        timed.__wrapped__ = fn
        self.patches.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def patch(self, owner, attr: str, fn) -> None:
        self.patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, fn)

    def wrap_cm(self, owner, attr: str, enter_name: str, exit_name: str) -> None:
        """Time the entry and the exit of a context-manager function separately."""
        cm = getattr(owner, attr)
        timers = self

        @contextlib.contextmanager
        def timed(*a, **k):
            t = now()
            ctx = cm(*a, **k)
            ctx.__enter__()
            timers.add(enter_name, now() - t)
            try:
                yield a[0] if a else None
            except BaseException:
                if not ctx.__exit__(*sys.exc_info()):
                    raise
            else:
                t = now()
                ctx.__exit__(None, None, None)
                timers.add(exit_name, now() - t)

        self.patch(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, fn in reversed(self.patches):
            setattr(owner, attr, fn)
        self.patches.clear()


def run_compress(args, model, calib, *, straight: bool, fine: bool, driver, stepwise: bool = False, trace_dir: Path | None = None):
    """compress_model over every layer of ``model``; returns per-layer times, peaks and breakdowns.
    ``stepwise``: every step's forward starts from the layer's input (the path before issue 17).
    ``trace_dir``: torch.profiler runs over the last layer only; its tables are written there."""
    from misq.algorithms import hessian, sparsegpt
    from misq.config import CompressConfig
    from misq.models import execution, step_activations

    # SparseGPT's own recipe, as every earlier row of this benchmark: no descent passes after the
    # solve (misq's default with pruning adds 4; benchmarks/refine_speed.py times one pass).
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, groupsize=0, act_order=False, mse=False, nsamples=calib.shape[0],
                         batch_size=1 if straight else args.batch_size, refine_passes=args.refine_passes)
    device = "cuda" if cuda() else "cpu"
    timers = Timers()
    marks: dict[str, float] = {}
    layer_s: list[float] = []
    layer_peak: list[float] = []

    capture = execution.capture_layer0_inputs

    def timed_capture(*a, **k):
        out = capture(*a, **k)
        marks["capture_end"] = now()
        marks["last"] = marks["capture_end"]
        marks["capture_s"] = marks["capture_end"] - marks["start"]
        marks["capture_peak"] = peak_gib()
        reset_peak()
        return out

    n_layers = len(model.model.layers)
    prof = None
    if trace_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        # Shapes and stacks say which line of misq (or of the model) issues each copy and kernel.
        prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else []),
                       record_shapes=True, with_stack=True)

    def on_layer_done(i, _layer_state, _out):
        if prof is not None and i == n_layers - 1:
            prof.stop()
        t = now()
        layer_s.append(t - marks["last"])
        marks["last"] = t
        layer_peak.append(peak_gib())
        reset_peak()
        timers.layer = i + 1
        if prof is not None and i == n_layers - 2:
            prof.start()  # after the timers' bookkeeping: the traced span is the last layer

    # Coarse timers: each sits where the driver synchronises anyway (solve checks its result,
    # the Hessian hook checks its input), so they barely perturb the run.
    # Per step: the forward to the step's first linear (+ its Hessian); "attention output" is
    # o_proj applied to its cached input once it is solved; "final forward" the layer's output pass.
    timers.wrap(driver, "_accumulate_step_hessian", "forward+hessian", key=lambda a: a[1].split(".")[-1])
    timers.wrap(step_activations.LayerPasses, "solved", "attention output")
    timers.wrap(driver, "solve", "solve")
    timers.wrap(driver.bitplan, "plan_step", "plan+grid")
    timers.wrap(driver.bitplan, "grid_for", "plan+grid")
    timers.wrap(driver, "column_params", "plan+grid")
    timers.wrap(execution, "run_layer", "final forward")
    if fine:  # these add synchronisations inside the loops
        timers.wrap(hessian.HessianAccumulator, "add", "hessian GEMM")
        timers.wrap(sparsegpt, "damped_inverse_cholesky", "solve: inverse Cholesky")
        timers.wrap(sparsegpt, "solver_rel_errors", "solve: rel. error")
        timers.wrap(sparsegpt, "unstructured_keep", "solve: masks")
    if fine:
        timers.wrap_cm(execution, "on_device", "layer to GPU", "layer back to CPU")
    execution.capture_layer0_inputs = timed_capture
    if straight:
        block_fn = sparsegpt.block_loop
    else:
        from misq.algorithms.fused import get_block_fn

        block_fn = get_block_fn(device)
    if fine:
        inner = block_fn or sparsegpt.block_loop

        def timed_block(*a, **k):
            t = now()
            try:
                return inner(*a, **k)
            finally:
                timers.add("solve: block sweeps", now() - t)

        block_fn = timed_block
    reset_peak()
    reuse = step_activations._REUSE
    step_activations._REUSE = not stepwise
    try:
        marks["start"] = now()
        out = driver.compress_model(model, calib, cfg, device, on_layer_done=on_layer_done, block_fn=block_fn,
                                    solver=sparsegpt.SolverOptions(hinv_method=args.hinv))
        total = now() - marks["start"]
        if prof is not None:
            write_trace(prof, trace_dir)
    finally:
        step_activations._REUSE = reuse
        execution.capture_layer0_inputs = capture
        timers.restore()
    breakdown = {}
    for i, d in timers.by_layer.items():
        if i >= len(layer_s):
            continue
        d = dict(d)
        if "hessian GEMM" in d:
            d["forwards to step inputs"] = d["forward+hessian"] - d["hessian GEMM"]
        inner_solve = sum(v for k, v in d.items() if k.startswith("solve: "))
        if inner_solve:
            d["solve: lazy updates + rest"] = d["solve"] - inner_solve
        moves = d.get("layer to GPU", 0) + d.get("layer back to CPU", 0)
        d["other (copies, checks, progress)" if moves else "other (layer H2D/D2H, copies, checks)"] = (
            layer_s[i] - d.get("forward+hessian", 0) - d.get("solve", 0) - d.get("plan+grid", 0) - d.get("final forward", 0)
            - d.get("attention output", 0) - moves)
        # The forwards alone: to each step's input, the attention output, the layer's output.
        if fine:
            d["forwards (all passes)"] = (d["forward+hessian"] - d.get("hessian GEMM", 0) + d.get("attention output", 0)
                                          + d.get("final forward", 0))
        breakdown[i] = {k: round(v, 4) for k, v in sorted(d.items())}
    records = [{k: r[k] for k in ("name", "rel_error", "sparsity", "solve_s") if k in r} for r in out.records]
    return {
        "batch_size": cfg.batch_size,
        "block_fn": getattr(block_fn, "__name__", str(block_fn)),
        "capture_s": marks.get("capture_s"),
        "capture_peak_gib": marks.get("capture_peak"),
        "layer_s": layer_s,
        "layer_peak_gib": layer_peak,
        "total_s": total,
        "breakdown": breakdown,
        "records": records,
    }


def write_trace(prof, out_dir: Path) -> None:
    """The traced layer's top kernels (by device time) and host ops (by CPU time) as text tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    avg = prof.key_averages()
    if cuda():
        (out_dir / "trace_cuda.txt").write_text(avg.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))
    (out_dir / "trace_cpu.txt").write_text(avg.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=70))
    if cuda():
        key = "self_cuda_time_total"
        by_shape = prof.key_averages(group_by_input_shape=True)
        (out_dir / "trace_shapes.txt").write_text(by_shape.table(sort_by=key, row_limit=70, max_name_column_width=40,
                                                                  max_shapes_column_width=90))
        # The GPU's idle gaps, charged to the host code that caused them (benchmarks/gpu_gaps.py).
        from gpu_gaps import format_gaps, gaps

        chrome = out_dir / "trace_chrome.json"
        prof.export_chrome_trace(str(chrome))
        try:
            (out_dir / "trace_gaps.txt").write_text(format_gaps(gaps(json.loads(chrome.read_text())), top=40))
        finally:
            chrome.unlink()


# --------------------------------------------------------------------------- micro-benchmarks


def bench(fn, reps: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up (synchronised; CUDA events when on a GPU)."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        if cuda():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def micro(args) -> dict:
    from misq.algorithms import fused, hessian, output_error, sparsegpt
    from misq.algorithms.quantizer import find_grid

    dev = "cuda" if cuda() else "cpu"
    res: dict = {}
    g = torch.Generator(device=dev).manual_seed(0)
    C = args.hidden
    X = torch.randn(4 * C, C, device=dev, generator=g) * (torch.rand(C, device=dev, generator=g) + 0.1)
    H = X.T @ X / X.shape[0]
    del X
    U, _ = sparsegpt.damped_inverse_cholesky(H.clone(), 0.01)

    # Block sweep: one 128-column block of the stacked gate/up (R = 2 x FFN) and of o_proj.
    sweep = {}
    for R in (2 * args.ffn, args.hidden):
        W1 = torch.randn(R, 128, device=dev, generator=g) * 0.02
        o = min(256, C - 128)
        Hinv1 = U[o : o + 128, o : o + 128]
        grid = find_grid(W1, torch.zeros(128, dtype=torch.long, device=dev), torch.tensor([4], device=dev))
        scale, zero, maxq = sparsegpt.column_params([grid]).columns(slice(None), dev)
        keep1 = sparsegpt.unstructured_keep(W1, torch.diag(Hinv1), 0.5, [R])
        Wr, Kr = W1.clone(), keep1.clone()
        Qr, Er = sparsegpt.block_loop(Wr, Hinv1, Kr, scale, zero, maxq)
        row = {"eager_ms": 1e3 * bench(lambda: sparsegpt.block_loop(W1.clone(), Hinv1, keep1.clone(), scale, zero, maxq), reps=3)}
        if fused.get_block_fn(dev) is not None:
            for conf in args.sweep_configs:
                launch = tuple(int(x) for x in conf.split(","))  # (rows per program, warps)
                try:
                    Wf, Kf = W1.clone(), keep1.clone()
                    Qf, Ef = fused.fused_block_loop(Wf, Hinv1, Kf, scale, zero, maxq, launch=launch)
                    sync()
                    row[f"fused[{conf}]_ms"] = 1e3 * bench(
                        lambda: fused.fused_block_loop(W1.clone(), Hinv1, keep1, scale, zero, maxq, launch=launch), reps=10)
                    row[f"fused[{conf}]_Q_mismatch"] = int((Qf != Qr).sum())
                    row[f"fused[{conf}]_Err_maxdiff"] = float((Ef - Er).abs().max())
                except Exception as err:  # a config that does not compile (registers) is skipped
                    row[f"fused[{conf}]_error"] = repr(err)[:200]
            # N:M 2:4 with the default config
            Kn = torch.ones_like(keep1)
            Wr2, Kr2 = W1.clone(), Kn.clone()
            Qr2, _ = sparsegpt.block_loop(Wr2, Hinv1, Kr2, scale, zero, maxq, 2, 4)
            Wf2, Kf2 = W1.clone(), Kn.clone()
            Qf2, _ = fused.fused_block_loop(Wf2, Hinv1, Kf2, scale, zero, maxq, 2, 4)
            row["fused_2:4_ms"] = 1e3 * bench(lambda: fused.fused_block_loop(W1.clone(), Hinv1, Kn.clone(), scale, zero, maxq, 2, 4), reps=10)
            row["fused_2:4_Q_mismatch"] = int((Qf2 != Qr2).sum())
            row["fused_2:4_keep_mismatch"] = int((Kf2 != Kr2).sum())
        sweep[f"R={R},B=128"] = row
    res["block_sweep"] = sweep

    # Hessian accumulation of one batch (batch_size x seqlen tokens) at the FFN width.
    if cuda():
        n = args.batch_size * args.seqlen
        F = args.ffn
        x = torch.randn(n, F, device=dev, generator=g).half()
        Hf = torch.zeros(F, F, device=dev)
        hess = {"tokens": n, "columns": F, "addmm_out_dtype": hessian.addmm_out_dtype_supported(),
                "mm_out_dtype": hessian.mm_out_dtype_supported()}
        hess["fp16_mm_fp16_out_ms"] = 1e3 * bench(lambda: torch.mm(x.t(), x))
        if hessian.mm_out_dtype_supported():
            hess["mm_out_fp32_plus_add_ms"] = 1e3 * bench(lambda: (Hf.mul_(0.5), Hf.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=1e-3)))
        if hessian.addmm_out_dtype_supported():
            hess["addmm_out_fp32_inplace_ms"] = 1e3 * bench(lambda: torch.addmm(Hf, x.t(), x, out_dtype=torch.float32, beta=0.5, alpha=1e-3, out=Hf))
        xs = x[: n // 4].float()
        hess["fp32_upcast_addmm_quarter_ms"] = 1e3 * bench(lambda: Hf.addmm_(xs.t(), xs, alpha=1e-3), reps=3)
        hess["tflops_addmm_or_mm"] = 2 * n * F * F / (hess.get("addmm_out_fp32_inplace_ms", hess.get("mm_out_fp32_plus_add_ms", float("nan"))) / 1e3) / 1e12
        del x, xs, Hf
        res["hessian"] = hess

    # Inverse Cholesky at both widths, both methods.
    inv = {}
    for Cw in (args.hidden, args.ffn):
        Xw = torch.randn(2 * Cw, Cw, device=dev, generator=g)
        Hw = Xw.T @ Xw / Xw.shape[0]
        del Xw
        Us = {}
        for method in ("inverse", "reverse"):
            inv[f"C={Cw},{method}_ms"] = 1e3 * bench(lambda: sparsegpt.damped_inverse_cholesky(Hw.clone(), 0.01, method=method), reps=3)
            Us[method] = sparsegpt.damped_inverse_cholesky(Hw.clone(), 0.01, method=method)[0]
        inv[f"C={Cw},reverse_vs_inverse_reldiff"] = float((Us["reverse"] - Us["inverse"]).norm() / Us["inverse"].norm())
        del Hw, Us
    res["inverse_cholesky"] = inv

    # Pieces of the "reverse" inverse Cholesky at the FFN width.
    Xw = torch.randn(2 * args.ffn, args.ffn, device=dev, generator=g)
    Hw = Xw.T @ Xw / Xw.shape[0]
    del Xw
    Hw.diagonal().add_(0.01 * Hw.diagonal().mean())
    inv["C=%d,flip+cholesky_ms" % args.ffn] = 1e3 * bench(lambda: torch.linalg.cholesky_ex(Hw.flip(0, 1)), reps=3)
    V = torch.linalg.cholesky_ex(Hw.flip(0, 1))[0].flip(0, 1)
    Vi = torch.empty_like(V)
    inv["C=%d,invert_upper_ms" % args.ffn] = 1e3 * bench(lambda: sparsegpt._invert_upper_into(V, Vi), reps=3)
    eye = torch.eye(args.ffn, device=dev)
    inv["C=%d,solve_triangular_ms" % args.ffn] = 1e3 * bench(lambda: torch.linalg.solve_triangular(V, eye, upper=True), reps=3)
    del V, Vi, eye

    # Reported rel. error of a down_proj-shaped solve by the direct formula (fp32 GEMMs); the solver's
    # own (output_error.solver_rel_errors) needs one TF32 product, timed in the profile breakdown.
    W0 = torch.randn(args.hidden, args.ffn, device=dev, generator=g) * 0.02
    W = W0 + torch.randn(args.hidden, args.ffn, device=dev, generator=g) * 0.004
    rel = {}
    rel["fp32_ms"] = 1e3 * bench(lambda: output_error.relative_output_error(W0, W, Hw), reps=3)
    ref = output_error.relative_output_error(W0.double(), W.double(), Hw.double())
    rel["fp32_value_reldiff"] = abs(output_error.relative_output_error(W0, W, Hw) / ref - 1)
    res["rel_error"] = rel
    del W0, W, Hw

    # Grids of the stacked gate/up weight: uniform 4-bit, and 10 groups of mixed widths.
    from misq.algorithms import quantizer as qz

    Wg = torch.randn(2 * args.ffn, args.hidden, device=dev, generator=g) * 0.02
    groups = torch.zeros(args.hidden, dtype=torch.long, device=dev)
    bits = torch.tensor([4], device=dev)
    grid = {"find_grid_ms": 1e3 * bench(lambda: qz.find_grid(Wg, groups, bits), reps=3)}
    groups10 = torch.randint(0, 10, (args.hidden,), device=dev, generator=g)
    bits10 = torch.tensor([2, 3, 4, 6, 8, 4, 3, 16, 2, 4], device=dev)
    grid["K=10,find_grid_ms"] = 1e3 * bench(lambda: qz.find_grid(Wg, groups10, bits10), reps=3)
    res["find_grid"] = grid
    del Wg

    # Moving one decoder layer to the GPU and back (execution.on_device).
    if cuda():
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from misq.models import execution

        lcfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_attention_heads=args.heads,
                           num_key_value_heads=args.heads, vocab_size=args.vocab)
        with torch.device("cuda"):
            layer = LlamaDecoderLayer(lcfg, 0)
        layer = layer.half().cpu()
        moves = {"layer_gib": sum(p.numel() * p.element_size() for p in layer.parameters()) / GIB}
        for name, cm in (("on_device", execution.on_device),):
            ins, outs = [], []
            for _ in range(4):
                t = now()
                ctx = cm(layer, "cuda", torch.float16)
                ctx.__enter__()
                t1 = now()
                ctx.__exit__(None, None, None)
                t2 = now()
                ins.append(t1 - t)
                outs.append(t2 - t1)
            moves[f"{name}_to_gpu_s"] = sorted(ins[1:])[1]
            moves[f"{name}_to_cpu_s"] = sorted(outs[1:])[1]
        res["layer_moves"] = moves
        del layer

    # fp32 GEMM [hidden, ffn] @ [ffn, ffn] (down_proj's rel. error / lazy-update shape class).
    if cuda():
        A = torch.randn(args.hidden, args.ffn, device=dev, generator=g)
        B = torch.randn(args.ffn, args.ffn, device=dev, generator=g)
        fl = 2 * args.hidden * args.ffn * args.ffn
        gemm = {"fp32_ms": 1e3 * bench(lambda: A @ B, reps=3)}
        gemm["fp32_tflops"] = fl / (gemm["fp32_ms"] / 1e3) / 1e12
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        gemm["tf32_ms"] = 1e3 * bench(lambda: A @ B, reps=3)
        torch.backends.cuda.matmul.allow_tf32 = prev
        res["gemm"] = gemm
        del A, B
    del H, U
    if cuda():
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- main


def env_info() -> dict:
    from misq.algorithms import fused, hessian

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        pass
    if fused.HAVE_TRITON:
        info["triton"] = fused.triton.__version__
    if cuda():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_mem_gib"] = round(p.total_memory / GIB, 1)
        info["sms"] = p.multi_processor_count
    info["mm_out_dtype"] = hessian.mm_out_dtype_supported()
    info["addmm_out_dtype"] = hessian.addmm_out_dtype_supported()
    info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


@contextlib.contextmanager
def _patched(owner, attr: str, value):
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, old)


def _variant(name: str):
    """The code before one of the speed changes, for an A/B in the same process (``--variants``)."""
    import torch as _torch

    from misq.compress import driver
    from misq.models import execution

    if name == "hessian-per-window":  # one Hessian GEMM per calibration window
        return _patched(driver, "hessian_batch_rows", lambda cfg: 0)
    if name == "full-hessian-gemm":  # cuBLAS over all of H instead of its lower triangle
        from misq.algorithms import hessian

        return _patched(hessian, "syrk_runs", lambda x, H: False)
    if name == "sorted-threshold":  # every mask threshold from a full sort
        from misq.algorithms import pruning_mask

        return _patched(pruning_mask, "_sorted_at", lambda parts, k: _torch.sort(parts, dim=1)[0][:, k])
    if name == "pageable-prefetch":  # the next layer copied ahead straight from pageable memory
        return _patched(execution, "PINNED_PREFETCH", False)
    if name == "no-prefetch":  # each layer copied to the GPU when its turn comes
        return _patched(execution.Prefetcher, "start", lambda self, module, dtype=None: None)
    if name == "pageable-writeback":  # the layer copied straight back into pageable host memory
        return _patched(execution, "PINNED_MAX_BYTES", 0)
    if name == "fp32-descent-update":  # the descent's update outside each block as one fp32 GEMM
        from misq.algorithms import coordinate_descent

        return _patched(coordinate_descent, "SPLIT_TF32", False)
    if name == "all-before":
        stack = contextlib.ExitStack()
        for part in ("full-hessian-gemm", "hessian-per-window", "sorted-threshold", "pageable-writeback",
                     "pageable-prefetch"):
            stack.enter_context(_variant(part))
        return stack
    raise SystemExit(f"unknown variant {name!r}")


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3, help="decoder layers of the fused run (layer 0 is warm-up)")
    ap.add_argument("--straight-layers", type=int, default=1, help="layers timed on the straightforward path (0: skip)")
    ap.add_argument("--profile-layers", type=int, default=2, help="layers of the instrumented run (0: skip); the last is reported")
    ap.add_argument("--stepwise-layers", type=int, default=2,
                    help="layers of an instrumented run whose steps each start from the layer's input (0: skip); the last is reported")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="calibration windows per forward on the fused path (1: misq's default, the issue's target)")
    ap.add_argument("--trace", action="store_true",
                    help="torch.profiler over the fused run's last layer: the top kernels and ops go to trace_*.txt in --out")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hinv", choices=("inverse", "reverse"), default=None,
                    help="SolverOptions.hinv_method of the compress runs (default: the solver's)")
    ap.add_argument("--variants", default="",
                    help="comma-separated earlier versions of the speed changes to time after the fused run, each on "
                         "a fresh copy of the same model: full-hessian-gemm, hessian-per-window, sorted-threshold, pageable-writeback, pageable-prefetch, no-prefetch, fp32-descent-update, all-before")
    ap.add_argument("--syrk-config", default=None,
                    help="BLOCK,BLOCK_K,warps,stages of the Hessian's lower-triangle kernel (default: fused_hessian.SYRK_CONFIG)")
    ap.add_argument("--refine-passes", type=int, default=0,
                    help="coordinate-descent passes after each solve (0, SparseGPT's own recipe, as every earlier row; "
                         "misq's default with pruning is 4)")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--sweep-configs", default="4,4;8,4;8,2;16,4;4,2", help="rows,warps;... for the block-sweep micro-benchmark")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test, CPU too)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for compress_speed.json")
    args = ap.parse_args()
    if args.small:
        args.hidden, args.ffn, args.heads, args.vocab, args.nsamples, args.seqlen = 256, 512, 4, 1000, 8, 128
    args.sweep_configs = [c.strip() for c in args.sweep_configs.split(";") if c.strip()]

    compress = import_misq()
    if args.syrk_config:
        from misq.algorithms import fused_hessian

        fused_hessian.SYRK_CONFIG = tuple(int(v) for v in args.syrk_config.split(","))
    from misq.algorithms import sparsegpt

    args.hinv = args.hinv or sparsegpt.DEFAULT_OPTIONS.hinv_method
    result: dict = {"args": {k: v for k, v in vars(args).items()}, "env": env_info(), "notes": NOTES}
    print("env:", json.dumps(result["env"]), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        (out_dir / "compress_speed.json").write_text(json.dumps(result, indent=2, default=str))

    def section(name, fn):
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()}
            print(f"[{name}] FAILED:\n{result[name]['error']}", flush=True)
        print(f"[{name}] done in {time.perf_counter() - t:.1f} s", flush=True)
        save()

    if not args.no_micro:
        section("micro", lambda: micro(args))
        print("micro:", json.dumps(result.get("micro"), indent=1, default=str), flush=True)

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=gen)

    def fused_run():
        model = build_model(args, args.layers, seed=0)
        r = run_compress(args, model, calib, straight=False, fine=False, driver=compress,
                         trace_dir=out_dir if args.trace else None)
        del model
        return r

    def profile_run():
        model = build_model(args, args.profile_layers, seed=1)
        r = run_compress(args, model, calib, straight=False, fine=True, driver=compress)
        del model
        return r

    def stepwise_run():
        model = build_model(args, args.stepwise_layers, seed=1)
        r = run_compress(args, model, calib, straight=False, fine=True, driver=compress, stepwise=True)
        del model
        return r

    def straight_run():
        model = build_model(args, max(args.layers, args.straight_layers), seed=0, keep=args.straight_layers)
        r = run_compress(args, model, calib, straight=True, fine=False, driver=compress)
        del model
        return r

    section("fused", fused_run)
    print("fused:", json.dumps(result["fused"], indent=1, default=str), flush=True)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        def variant_run(name: str = name):
            model = build_model(args, args.layers, seed=0)
            with _variant(name):
                r = run_compress(args, model, calib, straight=False, fine=False, driver=compress)
            del model
            return r

        section(f"variant {name}", variant_run)
    if args.profile_layers:
        section("profile", profile_run)
        print("profile:", json.dumps(result["profile"].get("breakdown", result["profile"]), indent=1, default=str), flush=True)
    if args.stepwise_layers:
        section("stepwise", stepwise_run)
        print("stepwise:", json.dumps(result["stepwise"].get("breakdown", result["stepwise"]), indent=1, default=str), flush=True)
    if args.straight_layers:
        section("straight", straight_run)
        print("straight:", json.dumps(result["straight"], indent=1, default=str), flush=True)

    # Summary.
    f, s = result.get("fused", {}), result.get("straight", {})
    summary = {}
    if "layer_s" in f:
        steady = f["layer_s"][1:] or f["layer_s"]
        if args.trace and len(steady) > 1:  # the traced (last) layer runs under the profiler
            steady = steady[:-1]
        summary["fused_s_per_layer"] = mean(steady)
        summary["fused_first_layer_s"] = f["layer_s"][0]
        summary["fused_peak_gib"] = max(f["layer_peak_gib"] + [f.get("capture_peak_gib") or 0])
    variants = {k.split(" ", 1)[1]: v for k, v in result.items() if k.startswith("variant ") and "layer_s" in v}
    if variants and "fused_s_per_layer" in summary:
        summary["variants_s_per_layer"] = {k: mean(v["layer_s"][1:] or v["layer_s"]) for k, v in variants.items()}
        summary["variants_vs_default"] = {k: t / summary["fused_s_per_layer"] for k, t in summary["variants_s_per_layer"].items()}
    if "layer_s" in s:
        summary["straight_s_per_layer"] = mean(s["layer_s"])
        summary["straight_peak_gib"] = max(s["layer_peak_gib"] + [s.get("capture_peak_gib") or 0])
    if "fused_s_per_layer" in summary:
        summary["speedup_vs_reference_15.9s"] = 15.9 / summary["fused_s_per_layer"]
        if "straight_s_per_layer" in summary:
            summary["speedup_vs_straight"] = summary["straight_s_per_layer"] / summary["fused_s_per_layer"]
    if "records" in f and "records" in s:
        n = len(s["records"])
        summary["layer0_rel_error_fused_vs_straight"] = [
            (a["name"], round(a["rel_error"], 6), round(b["rel_error"], 6)) for a, b in zip(f["records"][:n], s["records"])
        ]
    p, w = result.get("profile", {}), result.get("stepwise", {})
    if p.get("layer_s") and w.get("layer_s"):  # the same seed and depth: the same layers, both instrumented
        summary["profiled_s_per_layer"] = p["layer_s"][-1]
        summary["stepwise_s_per_layer"] = w["layer_s"][-1]
        summary["speedup_one_forward_vs_stepwise"] = w["layer_s"][-1] / p["layer_s"][-1]
        pb, wb = p["breakdown"].get(max(p["breakdown"], default=None), {}), w["breakdown"].get(max(w["breakdown"], default=None), {})
        if "forwards (all passes)" in pb and "forwards (all passes)" in wb:
            summary["forwards_s_per_layer"] = {"one forward": pb["forwards (all passes)"], "stepwise": wb["forwards (all passes)"]}
        summary["peak_gib"] = {"one forward": max(p["layer_peak_gib"]), "stepwise": max(w["layer_peak_gib"])}
    result["summary"] = summary
    save()

    print("\n== compression speed (LLaMA-13B-shaped layers, %d x %d tokens, 50%% + 4-bit) ==" % (args.nsamples, args.seqlen))
    print(f"env: torch {result['env'].get('torch')}, triton {result['env'].get('triton')}, {result['env'].get('gpu', 'cpu')}")
    rows = [("path", "s/layer", "first layer s", "peak GiB")]
    if "fused_s_per_layer" in summary:
        rows.append(("fused (default)", f"{summary['fused_s_per_layer']:.3f}", f"{summary['fused_first_layer_s']:.3f}", f"{summary['fused_peak_gib']:.2f}"))
    if "straight_s_per_layer" in summary:
        rows.append(("straightforward", f"{summary['straight_s_per_layer']:.3f}", "-", f"{summary['straight_peak_gib']:.2f}"))
    rows.append(("SparseGPT reference", "15.9", "-", "8.6"))
    for r in rows:
        print(f"{r[0]:<22}{r[1]:>10}{r[2]:>16}{r[3]:>10}")
    for k, t in summary.get("variants_s_per_layer", {}).items():
        rows_v = f"{k:<22}{t:>10.3f}  ({summary['variants_vs_default'][k]:.3f}x the default's time)"
        print(rows_v)
    for k in ("forwards_s_per_layer", "peak_gib"):
        if k in summary:
            print(f"{k}: {json.dumps({a: round(b, 3) for a, b in summary[k].items()})}")
    for k in ("speedup_vs_straight", "speedup_vs_reference_15.9s", "speedup_one_forward_vs_stepwise"):
        if k in summary:
            print(f"{k}: {summary[k]:.2f}x")
    prof = result.get("profile", {}).get("breakdown", {})
    if prof:
        last = prof[max(prof)]
        print(f"breakdown of profiled layer {max(prof)} (s, with sync timers):")
        for k, v in sorted(last.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<42}{v:8.3f}")
    for note in NOTES:
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
