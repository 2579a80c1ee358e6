"""Decode speed of the packed runtime on one GPU (issue 14).

Per 13B-shaped linear (out x in: 5120x5120 q/o, 13824x5120 gate/up, 5120x13824 down), at batch
1 and 16: misq's kernel vs fp16 cuBLAS vs torch's int4 tinygemm (groups of 128), CUDA-graph
timed (triton.testing.do_bench_cudagraph), for dense 4-bit g128, 3-bit g128, 50% + 4-bit g128
and mixed 3/4-bit g128; the weights' GPU bytes against the honest (file) size; then end-to-end
greedy decode tokens/s of a small-depth 13B-shaped LLaMA (random weights) in fp16 and packed,
in the same static-cache loop, one decode step replayed as a CUDA graph.

    PYTHONPATH=src python3 benchmarks/decode_speed.py --out decode.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from misq.checkpoint.layer_format import layer_nbytes
from misq.runtime.layout import Segment, pack_words
from misq.runtime.linear import PackedLinear

SHAPES = {"qo_5120x5120": (5120, 5120), "gate_up_13824x5120": (13824, 5120), "down_5120x13824": (5120, 13824)}
FORMATS = {  # name: (widths of the column halves, unstructured sparsity)
    "4bit_g128": ((4, 4), 0.0), "3bit_g128": ((3, 3), 0.0), "50pct_4bit_g128": ((4, 4), 0.5), "mixed_3_4_g128": ((3, 4), 0.0),
}
G = 128


def random_packed(rows: int, cols: int, widths: tuple[int, int], sparsity: float, device: str = "cuda") -> tuple[PackedLinear, int]:
    """(a random PackedLinear, the honest byte count its file would hold). Columns: a random
    permutation (act-order), the first half at widths[0], the rest at widths[1], groups of 128."""
    perm = torch.randperm(cols, device=device).to(torch.int32)
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


def bench(fn) -> float:
    """Microseconds per call, CUDA-graph replayed."""
    import triton.testing

    return 1000 * triton.testing.do_bench_cudagraph(fn, rep=50)


def tinygemm(rows: int, cols: int):
    """fn(x) running torch's int4 kernel on a random [rows, cols] weight, or None if unavailable."""
    try:
        w = torch.randint(0, 16, (rows, cols), dtype=torch.int32, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(cols // G, rows, 2, device="cuda", dtype=torch.bfloat16)
        fn = lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, G, sz)  # noqa: E731
        fn(torch.randn(1, cols, device="cuda", dtype=torch.bfloat16))
        return fn
    except (RuntimeError, AttributeError) as err:
        print("tinygemm unavailable:", str(err).splitlines()[0])
        return None


def candidates(M: int) -> list:
    from misq.runtime.kernels import Config

    if M == 1:
        return [Config("fma", 128, 1056, 4), Config("fma", 128, 2112, 4), Config("fma", 256, 2112, 8),
                Config("fma", 64, 2112, 4), Config("dot", 128, 2112, 4)]
    return [Config("dot", 128, 1056, 4), Config("dot", 128, 2112, 4), Config("dot", 64, 2112, 4),
            Config("dot", 128, 2112, 8)]


def _warm(job) -> str:
    """Compile (into Triton's disk cache) what one (shape, format, batch, config) needs."""
    R, C, fmt, M, cfg = job
    from misq.runtime import kernels

    torch.manual_seed(0)
    lin = random_packed(R, C, *FORMATS[fmt])[0]
    if cfg is not None:
        for seg in lin.segments:
            kernels.TUNED[("m1" if M == 1 else "m16", seg.bits, R, seg.n)] = cfg
    try:
        lin(torch.randn(M, C, device="cuda", dtype=torch.float16))
        torch.cuda.synchronize()
        return "ok"
    except Exception as err:  # reported, and skipped later
        return f"{job}: {str(err).splitlines()[0][:100]}"


def prewarm(jobs: list, workers: int) -> None:
    """Compile every kernel variant in parallel processes (Triton's cache is on disk)."""
    import multiprocessing as mp

    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        bad = [r for r in pool.map(_warm, jobs, chunksize=1) if r != "ok"]
    print(f"prewarm: {len(jobs)} jobs in {time.time() - t:.0f}s", *bad, sep="\n", flush=True)


def tune(shapes: dict, batches: tuple) -> dict:
    """Time the candidate launch settings per (batch bucket, bits, N, K) on the dense 3/4-bit g128
    layers and keep the best in kernels.TUNED."""
    from misq.runtime import kernels

    out = {}
    for R, C in shapes.values():
        for fmt in ("4bit_g128", "3bit_g128"):
            lin = random_packed(R, C, *FORMATS[fmt])[0]
            bits = lin.segments[0].bits
            for M in batches:
                key = ("m1" if M == 1 else "m16", bits, R, C)
                x = torch.randn(M, C, device="cuda", dtype=torch.float16)
                trials = []
                for cfg in candidates(M):
                    kernels.TUNED[key] = cfg
                    try:
                        trials.append((bench(lambda x=x, lin=lin: lin(x)), cfg))
                    except Exception as err:  # a setting that does not compile or fit is skipped
                        print("skip", cfg, str(err).splitlines()[0][:80])
                trials.sort(key=lambda r: r[0])
                kernels.TUNED[key] = trials[0][1]
                out[str(key)] = [{"us": t, **vars(c)} for t, c in trials[:4]]
                print("tuned", key, f"{trials[0][0]:.2f}us", trials[0][1], "| next", [f"{t:.2f}" for t, _ in trials[1:4]],
                      flush=True)
    return out


def linears(shapes: dict, formats: list, batches: tuple) -> list[dict]:
    rows_out = []
    for shape_name, (R, C) in shapes.items():
        Wd = torch.randn(R, C, device="cuda", dtype=torch.float16) * 0.02
        tg = tinygemm(R, C)
        for fmt in formats:
            lin, honest = random_packed(R, C, *FORMATS[fmt])
            for M in batches:
                x = torch.randn(M, C, device="cuda", dtype=torch.float16)
                xb = x.to(torch.bfloat16)
                W = lin.dequantize(torch.float16)
                ref = x.double() @ W.double().t()
                tol = 2.0 ** -11 * (x.abs().double() @ W.abs().double().t()) + 2.0 ** -10 * ref.abs() + 1e-5
                err_rel = ((lin(x).double() - ref).abs() / tol).max().item()  # <= 1: within fp16 rounding
                err = (lin(x).double() - ref).abs().max().item()
                del W
                r = {"shape": shape_name, "format": fmt, "batch": M, "misq_us": bench(lambda x=x, lin=lin: lin(x)),
                     "fp16_cublas_us": bench(lambda x=x, Wd=Wd: F.linear(x, Wd)),
                     "int4_tinygemm_us": bench(lambda xb=xb, tg=tg: tg(xb)) if tg is not None else None,
                     "max_abs_err_vs_dequant": err, "err_over_fp16_tolerance": err_rel, "gpu_bytes": lin.weight_nbytes, "honest_bytes": honest,
                     "gpu_over_honest": lin.weight_nbytes / honest}
                r["speedup_vs_fp16"] = r["fp16_cublas_us"] / r["misq_us"]
                print(json.dumps(r), flush=True)
                rows_out.append(r)
            del lin
        del Wd
    return rows_out


def decode_tps(model, steps: int = 64, prompt: int = 16) -> tuple[float, str]:
    """(tokens/s of greedy decode, how): static KV cache, the decode step as a CUDA graph
    (eager if capture fails)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), use_cache=True)
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        cpos = torch.tensor([prompt], device="cuda")

        def step():
            return model(tok, past_key_values=cache, cache_position=cpos, use_cache=True).logits

        how = "cuda_graph"
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            run = graph.replay
        except RuntimeError as err:
            print("CUDA graph capture failed, timing eager:", str(err).splitlines()[0])
            how, out = "eager", None
            torch.cuda.synchronize()

            def run():
                nonlocal out
                out = step()
        for i in range(4):  # warm-up
            cpos.fill_(prompt + i)
            run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            cpos.fill_(prompt + 4 + i)
            run()
            tok.copy_(out[:, -1:].argmax(-1))
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t), how


def end_to_end(layers: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    out = []
    tps, how = decode_tps(model)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers." in n)
    out.append({"model": f"13B-shaped, {layers} layers, fp16", "tokens_per_s": tps, "loop": how,
                "decoder_weights_gpu_bytes": dense_bytes})
    print(json.dumps(out[-1]), flush=True)
    for fmt in ("3bit_g128", "50pct_4bit_g128", "mixed_3_4_g128"):
        widths, sp = FORMATS[fmt]
        total = honest_total = 0
        for i in range(layers):
            for name, mod in list(model.model.layers[i].named_modules()):
                if isinstance(mod, (torch.nn.Linear, PackedLinear)):
                    lin, honest = random_packed(mod.out_features, mod.in_features, widths, sp)
                    model.model.layers[i].set_submodule(name, lin)
                    total, honest_total = total + lin.weight_nbytes, honest_total + honest
        torch.cuda.empty_cache()
        tps_p, how = decode_tps(model)
        out.append({"model": f"13B-shaped, {layers} layers, packed {fmt}", "tokens_per_s": tps_p, "loop": how,
                    "speedup_vs_fp16": tps_p / tps, "decoder_weights_gpu_bytes": total, "honest_bytes": honest_total})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="decode_speed.json")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the end-to-end model")
    ap.add_argument("--skip-linears", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true", help="time the linears only")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tune", action="store_true", help="sweep the decode kernel's launch settings first")
    ap.add_argument("--workers", type=int, default=12, help="processes compiling kernels up front (0: none)")
    args = ap.parse_args()
    formats, batches = args.formats.split(","), tuple(int(b) for b in args.batches.split(","))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.workers:
        jobs = []
        for R, C in SHAPES.values():
            if args.tune:
                jobs += [(R, C, f, M, cfg) for f in ("4bit_g128", "3bit_g128") for M in batches for cfg in candidates(M)]
            jobs += [(R, C, f, M, None) for f in formats for M in batches]
        if not args.skip_e2e:
            jobs += [(R, C, f, M, None) for R, C in SHAPES.values() for f in ("3bit_g128", "50pct_4bit_g128", "mixed_3_4_g128")
                     for M in (1, 16)]
        prewarm(sorted(set(jobs), key=str), args.workers)
    if args.tune:
        res["tune"] = tune(SHAPES, batches)
    if not args.skip_linears:
        res["linears"] = linears(SHAPES, formats, batches)
    if not args.skip_e2e:
        try:
            res["end_to_end"] = end_to_end(args.layers)
        except Exception as err:  # report what failed, keep the linear results
            res["end_to_end_error"] = repr(err)
            print("end-to-end failed:", repr(err))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
