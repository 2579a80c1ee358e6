#!/usr/bin/env python3
"""Peak host and GPU memory of a streamed ``misq compress`` of a LLaMA-13B- or 70B-shaped model
(issues 8 and 17).

1. Writes a checkpoint with LLaMA-13B's shapes (40 layers, hidden 5120, FFN 13824, 40 heads,
   vocab 32000), or with ``--shape 70b`` LLaMA-2-70B's (hidden 8192, FFN 28672, 64 heads with 8
   KV heads; ``--layers`` of them: streaming holds one layer at a time, so a few layers give the
   peak of all 80), and random fp16 weights to ``<workdir>/model``: safetensors shards of at most
   ``--shard-gb`` with ``model.safetensors.index.json``, written one layer at a time (the
   benchmark never holds the model either), plus a tokenizer copied from ``--tokenizer`` (a
   smaller vocabulary than 32000 is fine: its ids are valid rows). An existing checkpoint of
   the same shapes is reused.
2. Runs ``python -m misq.cli compress <model> c4 --stream`` on it as a subprocess with
   ``--nsamples`` x ``--seqlen`` calibration windows and the default compression settings
   (4-bit, groups of 128, act-order; more flags after ``--``), and watches it: peak RSS from
   ``getrusage(RUSAGE_CHILDREN)`` and from polling ``/proc/<pid>/status``, GPU memory by polling
   ``nvidia-smi``; misq's own record (``results.json`` → ``memory``) comes with it.
3. Prints one JSON object and writes it to ``--out``.

Targets (issue 8): peak host RSS < 8 GiB and peak GPU memory < 12 GiB at 128 x 2048; loading
the whole model would take 26 GB of host memory. On the device machine, from the repository root:

    python3 benchmarks/compress_memory.py --workdir /tmp/cm --data-dir .devshared/data \\
        --tokenizer .devshared/models/llama-9m --out "$OUT/compress_memory.json"

``--tiny`` shrinks everything (hidden 256, 4 layers, 16 x 128) to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
log = logging.getLogger("compress_memory")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


# --------------------------------------------------------------------------- the checkpoint


def shapes(args: argparse.Namespace) -> dict[str, int]:
    return {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads,
            "kv_heads": args.kv_heads or args.heads, "vocab": args.vocab, "max_positions": max(4096, args.seqlen)}


def layer_shapes(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The tensors of one decoder layer (k/v are narrower with grouped-query attention: 70B)."""
    h, f = s["hidden"], s["ffn"]
    kv = h // s["heads"] * s.get("kv_heads", s["heads"])
    return {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}


def random_tensor(shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """fp16 weights: norms are ones; matrices N(0, 0.02²), LLaMA's initializer range, which keeps
    40 layers of activations well inside fp16 (residual stream ~ sqrt(layers) x a few)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    t = torch.empty(shape, dtype=torch.float16, device=device)
    t.normal_(0.0, 0.02, generator=gen)
    return t.cpu()


def write_checkpoint(folder: Path, s: dict[str, int], tokenizer_dir: Path, shard_bytes: int) -> dict[str, float]:
    """Write the random checkpoint shard by shard; returns its size and the seconds it took."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    marker = folder / "bench_shapes.json"
    if marker.is_file() and json.loads(marker.read_text()) == s:
        log.info("reusing the checkpoint in %s", folder)
        return {"checkpoint_gib": sum(p.stat().st_size for p in folder.glob("*.safetensors")) / GIB,
                "write_s": 0.0, "reused": True}
    t0 = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=s["max_positions"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "float16"
    cfg.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers on the GPU: seconds, not minutes
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    h, v = s["hidden"], s["vocab"]
    # Groups of tensors in file order: embeddings, the layers, final norm + lm_head.
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (v, h)}]
    groups += [{f"model.layers.{i}.{k}": shp for k, shp in layer_shapes(s).items()} for i in range(s["layers"])]
    groups.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    shards: list[list[dict[str, tuple[int, ...]]]] = [[]]
    size = 0
    for g in groups:
        n = sum(2 * math.prod(shp) for shp in g.values())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += n
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(shp, gen, device) for g in shard for name, shp in g.items()}
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        log.info("wrote %s (%.2f GiB, %d tensors)", fname, sum(t.numel() * 2 for t in tensors.values()) / GIB, len(tensors))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    marker.write_text(json.dumps(s))
    if device == "cuda":
        torch.cuda.empty_cache()  # the run's GPU is measured next: hand back what the generator cached
    return {"checkpoint_gib": total / GIB, "write_s": time.perf_counter() - t0, "reused": False}


# --------------------------------------------------------------------------- watching the run


class Watcher:
    """Polls a process's RSS (/proc) and its GPU memory (nvidia-smi) until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = self.peak_hwm = 0
        self.peak_gpu_proc_mib = self.peak_gpu_used_mib = 0
        self.gpu_base_mib = _gpu_used_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last_gpu = 0.0

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
                    elif line.startswith("VmHWM:"):
                        self.peak_hwm = max(self.peak_hwm, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if self.gpu_base_mib is not None and time.monotonic() - self._last_gpu > 1.0:
                self._last_gpu = time.monotonic()
                used = _gpu_used_mib()
                if used is not None:
                    self.peak_gpu_used_mib = max(self.peak_gpu_used_mib, used - self.gpu_base_mib)
                self.peak_gpu_proc_mib = max(self.peak_gpu_proc_mib, _gpu_proc_mib(self.pid))


def _smi(*query: str) -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines() if out.returncode == 0 else None


def _gpu_used_mib() -> int | None:
    """Memory used on GPU 0 (all processes, CUDA context included)."""
    lines = _smi("--query-gpu=memory.used", "-i", "0")
    return int(lines[0]) if lines else None


def _gpu_proc_mib(pid: int) -> int:
    for line in _smi("--query-compute-apps=pid,used_memory") or []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1])
    return 0  # the pid may live in another namespace: peak_gpu_used_mib still counts it


def run_compress(args: argparse.Namespace, model: Path, run_dir: Path, load: str = "stream") -> dict:
    """One ``misq compress`` subprocess; ``load``: "stream" (--stream) or "memory" (--no-stream)."""
    cmd = [sys.executable, "-m", "misq.cli", "compress", str(model), "c4", "--stream" if load == "stream" else "--no-stream",
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--data-dir", str(args.data_dir),
           "--out", str(run_dir), "--cache-dir", str(args.workdir / "cache"), *args.misq_args]
    if args.eval:
        cmd += ["--eval", args.eval]
    if args.save:
        cmd += ["--save", str(args.workdir / "packed")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
               TQDM_DISABLE="1")
    log.info("running: %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    with Watcher(proc.pid) as watch:
        for line in proc.stdout:  # the child's log, echoed to our stderr so the caller sees progress
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-40:]
        rc = proc.wait()
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    out = {"command": cmd, "returncode": rc, "wall_s": wall,
           "peak_rss_gib_rusage_children": children / GIB,
           "peak_rss_gib_polled": max(watch.peak_rss, watch.peak_hwm) / GIB,
           "peak_gpu_gib_nvidia_smi_process": watch.peak_gpu_proc_mib / 1024 if watch.gpu_base_mib is not None else None,
           "peak_gpu_gib_nvidia_smi_device_delta": watch.peak_gpu_used_mib / 1024 if watch.gpu_base_mib is not None else None}
    results = run_dir / "results.json"
    if rc == 0 and results.is_file():
        res = json.loads(results.read_text())
        out["misq_memory"] = res.get("memory")
        out["misq_timing"] = res.get("timing")
        out["ppl"] = res.get("ppl")
        out["storage_bits_per_param"] = (res.get("storage") or {}).get("bits_per_param_disk_model")
        out["device"] = res.get("device")
        out["cuda"] = res.get("cuda")
    else:
        out["log_tail"] = tail
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="folder for the checkpoint, the run and the cache")
    p.add_argument("--data-dir", type=Path, required=True, help="misq --data-dir holding c4/c4-train*.jsonl (and wikitext2 for --eval)")
    p.add_argument("--tokenizer", type=Path, required=True, help="folder whose tokenizer files are copied (e.g. llama-9m)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file (default <workdir>/compress_memory.json)")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--ffn", type=int, default=13824)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shape", choices=("13b", "70b"), default="13b",
                   help="70b: hidden 8192, FFN 28672, 64 heads, 8 KV heads (with --layers; default 40 is 13B's)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (10^9 bytes)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized: hidden 256, FFN 688, 4 heads, vocab 8192, 4 layers, 16 x 128")
    p.add_argument("--eval", default=None, help="also evaluate after compressing (layer by layer), e.g. wikitext2")
    p.add_argument("--save", action="store_true", help="also write the packed checkpoint (layer by layer)")
    p.add_argument("--cleanup", action="store_true", help="delete the checkpoint and the run folder afterwards")
    p.add_argument("--load", choices=("stream", "memory", "both"), default="stream",
                   help="read layers from the shards (stream), load the whole model (memory), or both in turn")
    p.add_argument("misq_args", nargs="*", help="more misq compress flags, after --")
    args = p.parse_args(argv)
    if args.shape == "70b":
        args.hidden, args.ffn, args.heads, args.kv_heads = 8192, 28672, 64, 8
    if args.tiny:
        args.hidden, args.ffn, args.heads, args.vocab = 256, 688, 4, 8192
        args.layers = min(args.layers, 4)
        args.nsamples, args.seqlen = min(args.nsamples, 16), min(args.seqlen, 128)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.workdir.mkdir(parents=True, exist_ok=True)
    s = shapes(args)
    model, run_dir = args.workdir / "model", args.workdir / "run"
    need = 2 * (s["layers"] * sum(math.prod(x) for x in layer_shapes(s).values()) + 2 * s["vocab"] * s["hidden"])
    free = shutil.disk_usage(args.workdir).free + (need if (model / "bench_shapes.json").is_file() else 0)
    # The checkpoint, plus the compressed layers the run keeps in <run>/resume until it ends.
    if free < 2.1 * need:
        log.error("%s has %.1f GB free; the checkpoint and the run's layer files need %.1f GB: use --layers or another --workdir",
                  args.workdir, free / 1e9, 2.1 * need / 1e9)
        return 2
    result: dict = {"shapes": s, "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result |= write_checkpoint(model, s, args.tokenizer, int(args.shard_gb * 1e9))
    result["whole_model_fp16_gib"] = need / GIB
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own folder: a second setting replaces the first
    if args.load == "both":
        # Streamed, then the whole model in host memory, on the same checkpoint in one call (issue 17:
        # a streamed run should take within 10% of the in-memory one). rusage peaks accumulate over
        # children, so the in-memory run's host peak is the polled one.
        result |= run_compress(args, model, run_dir, "stream")
        shutil.rmtree(run_dir, ignore_errors=True)
        result["in_memory"] = run_compress(args, model, run_dir, "memory")
        times = [(r.get("misq_timing") or {}).get("compress_s") for r in (result, result["in_memory"])]
        if all(times):
            result["stream_over_memory_compress_s"] = times[0] / times[1]
    else:
        result |= run_compress(args, model, run_dir, args.load)
    rss = max(result["peak_rss_gib_rusage_children"], result["peak_rss_gib_polled"])
    gpu = (result.get("misq_memory") or {}).get("peak_gpu_gib")
    result["targets"] = {"host_rss_lt_8gib": rss < 8, "gpu_lt_12gib": gpu < 12 if gpu is not None else None,
                         "gpu_lt_24gib": gpu < 24 if gpu is not None else None}
    out = args.out or args.workdir / "compress_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.cleanup:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if result["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
