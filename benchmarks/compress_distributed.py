#!/usr/bin/env python3
"""Speed-up of misq's compression on K = 1, 2, 4 GPUs through torch.distributed (issues 8, 17).

One call runs everything, so that one machine start covers all K. From the repository root of
a 4-GPU machine (misq need not be installed; the launcher sets PYTHONPATH=src for its children):

    python3 benchmarks/compress_distributed.py --out "$OUT"

and on a 2-GPU machine ``--nprocs 1,2``. Every solve (q/k/v, o, gate/up, down) is split by rows
over the K ranks (:mod:`misq.distributed`), the calibration windows too.

1. **Speed**, for each K: ``torchrun --standalone --nproc-per-node K`` of this file in worker
   mode. Every rank builds the same LLaMA-13B-shaped model (hidden 5120, FFN 13824, 40 heads,
   vocab 32000; ``--layers`` random decoder layers in fp16, broadcast from rank 0) and runs
   ``misq.compress.compress_model`` at 128 x 2048 random tokens, 50% unstructured + 4-bit
   uniform. Seconds per layer are rank 0's wall time between ``on_layer_done`` callbacks
   (synchronised; layer 0 is warm-up and left out of the mean). Peak GPU memory is
   ``torch.cuda.max_memory_allocated`` of every rank. A coarse breakdown (forwards + Hessian,
   all-reduce, planning, the row-split solves with their mask gathers, all row gathers, final
   forward) comes from synchronising timers around the driver's functions.
2. **Agreement** with K = 1: every compressed weight of every K is compared with K = 1's
   (fraction bitwise equal, largest difference), and the layers' relative errors. The Hessian
   all-reduce sums in another order, so masks near the threshold may flip; ``--exact-check``
   (on by default) therefore also runs the largest K with every rank running every window and
   keeping its own Hessian (the K = 1 Hessian, no all-reduce): then only the row split differs
   from K = 1, and the weights should be bitwise equal (its speed means nothing).
3. **PPL** (``--ppl-check``, on by default): a small LLaMA is trained on a synthetic corpus
   (misq.demo.toy), then ``torchrun -m misq compress ... --eval`` runs for every K, as a user would
   run it (NCCL, fused kernels, the CLI's rank-0-only outputs); the PPLs and bit plans are
   compared with K = 1's (the issue asks for PPL within 0.1%).

Everything goes to ``<out>/compress_distributed.json`` (and each run's log to
``<out>/k<K>.log``); a table is printed last. ``--tiny`` shrinks everything to run on the CPU
with gloo (``--nprocs 1,2`` there), as a smoke test. Took about 5 minutes on 4 x H200 with
``--nprocs 1,2,4`` (issue 8); ``--nprocs 1,2 --no-ppl-check`` should take about 3 minutes on 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if int(os.environ.get("RANK", "0") or 0):  # a worker other than rank 0: no progress bars (read when torch imports tqdm)
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from timing import cuda, now

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # misq from this checkout, installed or not
GIB = 1024**3
log = logging.getLogger("compress_distributed")


# --------------------------------------------------------------------------- worker (one rank)


def build_model(args, dist):
    """The benchmark model on the host, identical on every rank (rank 0's values broadcast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(2048, args.seqlen), rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    dev = dist.device or ("cuda" if cuda() else "cpu")
    with torch.device(dev):  # random init on the GPU takes seconds; on the host, minutes
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=torch.float16 if cuda() else torch.float32).eval()
    if dist.active:
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)
    model = model.to("cpu")
    model.config.use_cache = False
    if cuda():
        torch.cuda.empty_cache()
    return model


def worker(args) -> None:
    from misq import distributed

    class EveryWindow(distributed.Dist):
        """Each rank runs all windows and keeps its own Hessian: the one-process H everywhere."""

        def shard_windows(self, calib):
            return calib

        def reduce_hessian(self, H, nsamples):
            return H

    dist = distributed.from_env("cuda" if cuda() else "cpu")  # pins this rank's GPU before any CUDA work
    from misq.compress import driver
    from misq.config import CompressConfig
    from misq.models import execution

    if args.same_hessian:  # every rank: every window, its own (the one-process) Hessian
        dist = EveryWindow(rank=dist.rank, world_size=dist.world_size, local_rank=dist.local_rank, device=dist.device,
                           backend=dist.backend, owns_group=dist.owns_group)
    device = dist.device or ("cuda" if cuda() else "cpu")
    model = build_model(args, dist)
    calib = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, groupsize=0, act_order=False, mse=False, nsamples=args.nsamples, batch_size=args.batch_size,
                         refine_passes=0)  # as the recorded rows; the descent is row-parallel and would flatter the speed-up

    phases: dict[str, float] = {}
    per_layer: list[dict[str, float]] = []
    patches = []

    def timed(owner, attr, name):
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            t = now()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + now() - t

        patches.append((owner, attr, fn))
        setattr(owner, attr, wrapper)

    # Each sits where the driver synchronises anyway (or waits on the other ranks).
    timed(driver, "_accumulate_step_hessian", "forwards + hessian (incl. all-reduce)")
    timed(dist, "reduce_hessian", "hessian all-reduce")
    timed(driver, "_plan_layers", "planning (+ gathering plans)")
    timed(driver, "solve", "solves (own rows, incl. mask gathers)")
    timed(dist, "gather_rows", "row gathers (masks in solves; weights, grids, records)")
    timed(execution, "run_layer", "final forward")
    timed(execution, "capture_layer0_inputs", "capture")
    marks = {"last": now()}

    def on_layer_done(i, _layer_state, _out):
        t = now()
        row = {"layer_s": t - marks["last"], "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda() else float("nan")}
        row.update({k: round(v, 4) for k, v in phases.items()})
        per_layer.append(row)
        phases.clear()
        if cuda():
            torch.cuda.reset_peak_memory_stats()
        marks["last"] = now()

    capture = execution.capture_layer0_inputs

    def capture_then_mark(*a, **k):  # layer 0's time starts after the capture
        out = capture(*a, **k)
        marks["capture_s"] = phases.pop("capture", 0.0)
        marks["last"] = now()
        return out

    execution.capture_layer0_inputs = capture_then_mark
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    t0 = now()
    out = driver.compress_model(model, calib, cfg, device, on_layer_done=on_layer_done, dist=dist)
    total = now() - t0
    execution.capture_layer0_inputs = capture
    for owner, attr, fn in reversed(patches):
        setattr(owner, attr, fn)
    mine = {"rank": dist.rank, "device": device, "per_layer": per_layer, "capture_s": marks.get("capture_s"),
            "gpu": torch.cuda.get_device_name() if cuda() else "cpu"}
    ranks = dist.gather_dicts({dist.rank: mine})
    world, backend = dist.world_size, dist.backend
    dist.close()
    if dist.rank != 0:
        return
    from safetensors.torch import save_file

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    save_file(weights, str(scratch / "weights.safetensors"))
    result = {"world_size": world, "backend": backend, "total_s": total, "ranks": [ranks[r] for r in sorted(ranks)],
              "records": [{k: r[k] for k in ("name", "rel_error", "sparsity")} for r in out.records],
              "torch": torch.__version__}
    (scratch / "worker.json").write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- launcher


def torchrun(k: int, argv: list[str], log_path: Path, timeout: float, threads: int | None = None) -> tuple[int, float]:
    """Run ``argv`` (after torchrun's own flags) on ``k`` processes; (exit status, seconds).
    ``threads`` sets OMP_NUM_THREADS for every K (torchrun sets 1 only when K > 1)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", *argv]
    t = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def one_run(args, k: int, tag: str, scratch: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One ``torchrun`` of the worker on ``k`` processes; its timings (rank 0's) and records."""
    shape = ["--layers", str(args.layers), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--ffn", str(args.ffn),
             "--heads", str(args.heads), "--vocab", str(args.vocab), *extra]
    rc, wall = torchrun(k, [__file__, "--worker", "--scratch", str(scratch / tag), *shape], out / f"{tag}.log",
                        args.timeout, threads=args.threads)
    path = scratch / tag / "worker.json"
    if rc != 0 or not path.is_file():
        log.error("%s failed (exit %d):\n%s", tag, rc, tail(out / f"{tag}.log"))
        return {"error": f"exit status {rc}", "log_tail": tail(out / f"{tag}.log")}
    w = json.loads(path.read_text())
    rank0 = w["ranks"][0]["per_layer"]
    steady = [r["layer_s"] for r in rank0[1:]] or [r["layer_s"] for r in rank0]
    phase_names = sorted({p for r in rank0 for p in r if p not in ("layer_s", "peak_gib")})
    run = {
        "s_per_layer": mean(steady), "layer_s": [r["layer_s"] for r in rank0], "warmup_layer_s": rank0[0]["layer_s"],
        "capture_s": w["ranks"][0]["capture_s"], "launch_to_exit_s": wall, "backend": w["backend"],
        "peak_gib_per_rank": [max(r["peak_gib"] for r in rk["per_layer"]) for rk in w["ranks"]],
        "breakdown_rank0_s": {p: mean([r.get(p, 0.0) for r in rank0[1:] or rank0]) for p in phase_names},
        "gpus": sorted({rk["gpu"] for rk in w["ranks"]}),
        "records": w["records"],
    }
    log.info("%s: %.3f s/layer (layers %s)", tag, run["s_per_layer"], [round(x, 3) for x in run["layer_s"]])
    return run


def speed_runs(args, ks: list[int], scratch: Path, out: Path) -> dict:
    runs: dict = {k: one_run(args, k, f"k{k}", scratch, out) for k in ks}
    base = runs.get(ks[0], {}).get("s_per_layer") if ks and ks[0] == 1 else None
    for r in runs.values():
        if base and "s_per_layer" in r:
            r["speedup_vs_k1"] = base / r["s_per_layer"]
    if 1 in runs and "records" in runs[1]:
        for k, r in runs.items():
            if k != 1 and "records" in r:
                r["agreement_vs_k1"] = agreement(scratch / "k1", scratch / f"k{k}", runs[1]["records"], r["records"])
        k = max(ks)
        if args.exact_check and k > 1:  # the row split alone: every rank gets the K = 1 Hessian
            tag = f"k{k}_same_hessian"
            r = one_run(args, k, tag, scratch, out, ("--same-hessian",))
            if "records" in r:
                runs[tag] = {"agreement_vs_k1": agreement(scratch / "k1", scratch / tag, runs[1]["records"], r["records"]),
                             "note": "every rank runs every window, no all-reduce: only the row split differs from K = 1"}
            else:
                runs[tag] = r
    for r in runs.values():
        r.pop("records", None)
    return runs


def agreement(ref_dir: Path, dir_k: Path, rec_ref: list, rec_k: list) -> dict:
    """How equal K's compressed weights are to K=1's: per decoder layer and overall."""
    from safetensors import safe_open

    layers: dict[str, dict] = {}
    equal = total = 0
    with safe_open(str(ref_dir / "weights.safetensors"), "pt") as a, safe_open(str(dir_k / "weights.safetensors"), "pt") as b:
        for name in a.keys():  # noqa: SIM118 (safe_open is not a dict)
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
            layer = name.split(".")[2]
            d = layers.setdefault(layer, {"weights": 0, "bitwise_equal": 0, "mask_differs": 0, "max_abs_diff": 0.0})
            d["weights"] += x.numel()
            d["bitwise_equal"] += int((x == y).sum())
            d["mask_differs"] += int(((x == 0) != (y == 0)).sum())
            d["max_abs_diff"] = max(d["max_abs_diff"], float((x - y).abs().max()))
    for d in layers.values():
        d["fraction_equal"] = d["bitwise_equal"] / d["weights"]
        equal += d["bitwise_equal"]
        total += d["weights"]
    rel = [abs(p["rel_error"] / q["rel_error"] - 1) for p, q in zip(rec_k, rec_ref) if q["rel_error"] > 0]
    return {"fraction_equal": equal / max(total, 1), "per_layer": layers, "max_rel_error_change": max(rel, default=0.0)}


def train_toy(folder: Path, steps: int) -> None:
    """misq.demo.toy's tiny LLaMA (made bigger: 4 layers, hidden 128) trained on its synthetic corpus,
    on the GPU when there is one (seconds; the host would take minutes), saved to ``folder``."""
    from misq.demo.toy import build_model, build_tokenizer, synthetic_corpus, train

    text = synthetic_corpus(4000, seed=0)
    tokenizer = build_tokenizer(text)
    model = build_model(len(tokenizer), hidden=128, layers=4, heads=4, kv_heads=2, ffn=256, max_positions=256, seed=0)
    model.to("cuda" if cuda() else "cpu")
    loss = train(model, tokenizer, text, steps=steps, seed=0)
    log.info("toy model: %d steps, last loss %.3f", steps, loss)
    model.to("cpu").eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if cuda():
        torch.cuda.empty_cache()


def ppl_runs(args, ks: list[int], scratch: Path, out: Path) -> dict:
    """``torchrun -m misq compress --eval`` on a trained toy model for every K; PPL and plans vs K=1."""
    from misq.demo.toy import synthetic_corpus

    t = time.perf_counter()
    toy = scratch / "toy"
    train_toy(toy / "model", args.toy_steps)
    (toy / "calib.txt").write_text(synthetic_corpus(4000, seed=1))
    (toy / "heldout.txt").write_text(synthetic_corpus(1500, seed=2))
    res: dict = {"toy_model": "hidden 128, 4 layers, GQA 4/2 heads, ffn 256", "toy_train_s": time.perf_counter() - t, "runs": {}}
    for k in ks:
        run = toy / f"run_k{k}"
        argv = ["-m", "misq", "compress", str(toy / "model"), str(toy / "calib.txt"), "--nsamples", "32", "--seqlen", "128",
                "--batch-size", "4", "--grouping", "hessian", "--n-groups", "4", "--target-avg-bits", "3.5",
                "--sparsity", "0.5", "--eval", str(toy / "heldout.txt"), "--out", str(run), "--cache-dir", str(toy / "cache")]
        if not cuda():
            argv += ["--device", "cpu", "--dtype", "float32"]
        rc, wall = torchrun(k, argv, out / f"ppl_k{k}.log", args.timeout, threads=args.threads)
        if rc != 0 or not (run / "results.json").is_file():
            res["runs"][k] = {"error": f"exit status {rc}", "log_tail": tail(out / f"ppl_k{k}.log")}
            continue
        r = json.loads((run / "results.json").read_text())
        res["runs"][k] = {"ppl": next(iter(r["ppl"].values())), "compress_s": r["timing"]["compress_s"],
                          "launch_to_exit_s": wall, "distributed": r.get("distributed"),
                          "group_bits": [x["group_bits"] for x in r["layers"]],
                          "avg_bits": r["bits"]["actual_avg_bits"]}
    ref = res["runs"].get(1, {})
    for k, r in res["runs"].items():
        if k != 1 and "ppl" in r and "ppl" in ref:
            r["ppl_rel_diff_vs_k1"] = r["ppl"] / ref["ppl"] - 1
            r["within_0.1%"] = abs(r["ppl_rel_diff_vs_k1"]) < 1e-3
            r["same_bit_plans"] = r["group_bits"] == ref["group_bits"]
    for r in res["runs"].values():
        r.pop("group_bits", None)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for compress_distributed.json and logs")
    ap.add_argument("--nprocs", default="1,2,4", help="process counts to run (the first should be 1)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (layer 0 is warm-up)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ppl-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the CLI on a trained toy model for every K and compare PPL")
    ap.add_argument("--exact-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the largest K with the K = 1 Hessian on every rank: weights should equal K = 1's bitwise")
    ap.add_argument("--toy-steps", type=int, default=300, help="training steps of the toy model")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per torchrun")
    ap.add_argument("--tiny", action="store_true", help="toy shapes: a CPU (gloo) smoke test")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of every process (default: torchrun's; --tiny: 1, a fair CPU comparison)")
    ap.add_argument("--keep-scratch", action="store_true", help="keep the compared weights (in a temp folder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--same-hessian", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        worker(args)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.tiny:
        args.hidden, args.ffn, args.heads, args.vocab, args.nsamples, args.seqlen, args.batch_size = 128, 256, 4, 1000, 16, 128, 4
        args.toy_steps = min(args.toy_steps, 100)
        args.threads = args.threads or 1
    ks = [int(k) for k in args.nprocs.split(",") if k.strip()]
    notes = []
    if cuda() and max(ks) > torch.cuda.device_count():
        notes.append(f"only {torch.cuda.device_count()} GPUs: dropped K > {torch.cuda.device_count()}")
        ks = [k for k in ks if k <= torch.cuda.device_count()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="misq-dist-"))
    # No CUDA call here beyond counting devices: the launcher must not hold a context on GPU 0.
    result = {"args": vars(args), "notes": notes, "torch": torch.__version__,
              "setup": "compress_model, 50% unstructured + 4-bit uniform (grouping uniform), fp16 on GPU"}
    path = out / "compress_distributed.json"
    t0 = time.perf_counter()
    try:
        result["speed"] = speed_runs(args, ks, scratch, out)
        result["gpu"] = next((g for r in result["speed"].values() for g in r.get("gpus", [])), "cpu")
        path.write_text(json.dumps(result, indent=2, default=str))
        if args.ppl_check:
            result["ppl_check"] = ppl_runs(args, ks, scratch, out)
    finally:
        result["benchmark_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(result, indent=2, default=str))
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    shape = f"{args.hidden}/{args.ffn}/{args.heads} heads, {args.nsamples} x {args.seqlen}"
    print(f"\n== misq compress on K processes ({shape}, 50% + 4-bit; {result.get('gpu', '?')}) ==")
    print(f"{'K':>3}{'s/layer':>10}{'speed-up':>10}{'peak GiB per rank':>28}{'weights = K1':>14}")
    for k, r in result["speed"].items():
        if "s_per_layer" not in r and "agreement_vs_k1" in r:
            print(f"{k}: weights bitwise equal to K=1: {r['agreement_vs_k1']['fraction_equal']:.4%} (row split alone)")
            continue
        if "error" in r:
            print(f"{k:>3}  failed: {r['error']}")
            continue
        peaks = ",".join(f"{p:.1f}" for p in r["peak_gib_per_rank"])
        agree = r.get("agreement_vs_k1", {}).get("fraction_equal")
        print(f"{k:>3}{r['s_per_layer']:>10.3f}{r.get('speedup_vs_k1', float('nan')):>10.2f}{peaks:>28}"
              f"{'' if agree is None else f'{agree:.4%}':>14}")
    for k, r in result.get("ppl_check", {}).get("runs", {}).items():
        print(f"PPL K={k}: {r.get('ppl', r.get('error'))}"
              + (f" ({r['ppl_rel_diff_vs_k1']:+.2e} vs K=1, same bit plans: {r['same_bit_plans']})" if "ppl_rel_diff_vs_k1" in r else ""))
    print(f"full results: {path} ({result['benchmark_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
