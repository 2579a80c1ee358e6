"""``misq demo``: the whole pipeline on a model it trains itself, with no downloads.

1. generate a corpus from a small grammar; train a byte-level BPE tokenizer and a tiny LLaMA
   (GQA, 2 layers) on it for about a minute on the CPU;
2. evaluate the FP16 baseline on held-out text;
3. compress it: 50% SparseGPT + MI-grouped mixed precision at 4.0 average bits;
4. evaluate, save the packed checkpoint, reload it and check the perplexity matches;
5. write the comparison report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from misq.demo import toy

log = logging.getLogger(__name__)


def _train_for(model, tokenizer, text: str, seconds: float, seqlen: int) -> tuple[int, float]:
    """Train in chunks of steps until ``seconds`` have passed; returns (steps, last loss)."""
    steps, loss, t0 = 0, float("nan"), time.perf_counter()
    chunk = 25
    while time.perf_counter() - t0 < seconds:
        loss = toy.train(model, tokenizer, text, steps=chunk, seqlen=seqlen, batch=16, lr=2e-3, seed=steps)
        steps += chunk
    return steps, loss


def run_demo(out: str | Path, *, train_seconds: float = 60.0) -> str:
    from misq import jobs
    from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
    from misq.report.compare import compare

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    seqlen = 128

    # 1. data, tokenizer, model
    train_text = toy.synthetic_corpus(6000, seed=0)
    data_dir = out / "data"
    calib_file = toy.write_text_dataset(data_dir, train_text, "train")
    eval_file = toy.write_text_dataset(data_dir, toy.synthetic_corpus(1500, seed=123), "heldout")
    tokenizer = toy.build_tokenizer(train_text, vocab_size=512)
    model = toy.build_model(len(tokenizer), hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, max_positions=seqlen)
    steps, loss = _train_for(model, tokenizer, train_text, train_seconds, seqlen)
    log.info("trained the demo model for %d steps, final loss %.3f", steps, loss)
    model_dir = out / "model"
    model.to(torch.float16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    model_cfg = ModelConfig(str(model_dir), device="cpu")
    data_cfg = DataConfig(seqlen=seqlen, cache_dir=str(out / "cache"))
    # Prompts in the toy grammar's own words: the report shows how each model continues them.
    prompts = data_dir / "prompts.txt"
    prompts.write_text("The cat sees\nMy sister likes\nThe robot builds\n")
    eval_cfg = EvalConfig(datasets=(str(eval_file),), prompts=str(prompts), max_new_tokens=24)

    # 2. baseline
    baseline = out / "baseline_results.json"
    jobs.run_eval(model_cfg, data_cfg, eval_cfg, str(baseline))

    # 3-4. compress, evaluate, save, reload
    # The prototype's scheme on the toy model: MI-grouped mixed widths over 50% pruning. Its layers
    # have 64 channels, fewer than one scale group of 128, so one grid per row and channel group.
    cfg = CompressConfig(dataset=str(calib_file), nsamples=64, sparsity=0.5, grouping="mi", n_groups=4,
                         target_avg_bits=4.0, batch_size=16, groupsize=0, act_order=False)
    run_dir, packed = out / "run", out / "packed"
    # overwrite: a second demo in the same --out replaces its own earlier run folder.
    results = jobs.run_compress(model_cfg, data_cfg, cfg, eval_cfg, str(run_dir), save_dir=str(packed), overwrite=True)
    reloaded = jobs.run_eval(ModelConfig(str(packed), device="cpu"), data_cfg, eval_cfg, str(out / "reloaded_results.json"))
    name = str(eval_file)
    drift = abs(reloaded["ppl"][name] / results["ppl"][name] - 1)
    if drift > 1e-4:
        raise RuntimeError(f"reloaded checkpoint PPL differs from the in-memory model by {drift:.2e}")

    # 5. report
    report_dir = out / "report"
    comparison = compare(baseline, [run_dir / "results.json"], report_dir)
    base_ppl = pipeline_json(baseline)["ppl"][name]
    bits = results["bits"]
    st = results["storage"]
    return "\n".join([
        f"misq demo finished in {out}/",
        f"  tiny LLaMA trained {steps} steps; held-out PPL {base_ppl:.3f} (fp16) -> {results['ppl'][name]:.3f} compressed",
        f"  average bits {bits['actual_avg_bits']:.3f} (target {bits['target_avg_bits']}), sparsity {results['sparsity']['actual']:.3f}",
        f"  on disk {st['bits_per_param_disk_model']:.2f} bits/param (x{st['compression_ratio_model']:.2f} vs fp16); reload PPL drift {drift:.1e}",
        f"  verdict: {comparison['verdict']['status']}",
        f"  baseline:  {baseline}",
        f"  run:       {run_dir}/ (results.json, compress.log, progress.json)",
        f"  packed:    {packed}/",
        f"  report:    {report_dir}/report.html and report.md",
    ])


def pipeline_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text())
