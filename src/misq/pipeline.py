"""The two jobs a user runs: evaluate a model, and compress (+ evaluate, + save) one.

This is orchestration only: it wires configuration, data, model plumbing, the compression
driver, the run directory and the results file together. Every number in a results file is
computed elsewhere; this module decides what goes in and writes it atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import misq
from misq import data, evaluate, modeling
from misq.atomic import atomic_write_json
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError

log = logging.getLogger(__name__)


def protocol_record(seqlen: int, c4_cut: bool = True) -> dict[str, Any]:
    """What every results file says about how its perplexities were measured."""
    return {
        "name": "gptq-sparsegpt",
        "seqlen": seqlen,
        "c4_documents": 1100,
        "c4_max_tokens": 256 * seqlen if c4_cut else None,
        "unk_as_text": True,
        "segments": "tokens // seqlen, no overlap, remainder dropped",
        "ppl": "exp(sum(mean CE of shifted logits * seqlen) / (segments * seqlen))",
        "reference": "PROTOCOL.md (the protocol of the GPTQ/SparseGPT papers' tables)",
    }


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail early (before loading a model) when an output location cannot be written."""
    path = Path(path).expanduser()
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise MisqError(f"{what} {str(path)!r} is not writable: choose a folder you can write to")
    if path.exists() and not path.is_dir() and what.endswith("folder"):
        raise MisqError(f"{what} {str(path)!r} is a file: give a folder path")
    return path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(model_cfg: ModelConfig, data_cfg: DataConfig) -> tuple[Any, Any, int, str]:
    device = model_cfg.resolved_device()
    if misq_checkpoint(model_cfg.model):
        from misq.checkpoint import load_packed_with_tokenizer

        model, tokenizer = load_packed_with_tokenizer(model_cfg.model)
    else:
        model, tokenizer = modeling.load_model(model_cfg)
    seqlen = data_cfg.seqlen or modeling.default_seqlen(model)
    modeling.check_seqlen(model, seqlen)
    return model, tokenizer, seqlen, device


def misq_checkpoint(path: str) -> bool:
    """Whether ``path`` is a misq packed checkpoint (its config.json has a ``misq`` section)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return "misq" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def run_eval(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, out: str | None) -> dict[str, Any]:
    """``misq eval``: perplexity of a model (a baseline, or a packed misq checkpoint)."""
    if out:
        check_writable(out, "output file")
    data_dir = data.resolve_data_dir(data_cfg.data_dir)
    model, tokenizer, seqlen, device = _load(model_cfg, data_cfg)
    evals = evaluate.evaluate_datasets(model, tokenizer, eval_cfg.datasets, seqlen, device, data_dir=data_dir,
                                       cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise, batch_size=eval_cfg.batch_size,
                                       c4_cut=data_cfg.c4_cut)
    results = {
        "misq_version": misq.__version__,
        "kind": "compressed" if misq_checkpoint(model_cfg.model) else "baseline",
        "created": _now(),
        "model": modeling.model_summary(model) | {"name_or_path": model_cfg.model},
        "device": device,
        "protocol": protocol_record(seqlen, data_cfg.c4_cut),
        "ppl": {name: r["ppl"] for name, r in evals.items()},
        "eval": evals,
        "timing": {"eval_s": {name: r["seconds"] for name, r in evals.items()}},
    }
    if results["kind"] == "compressed":
        meta = json.loads((Path(model_cfg.model).expanduser() / "config.json").read_text())["misq"]
        results["config"] = meta.get("compress_config", {})
    if out:
        atomic_write_json(out, results)
    return results


def sparsity_pattern(cfg: CompressConfig) -> str:
    if cfg.structured:
        return f"{cfg.prunen}:{cfg.prunem}"
    return "unstructured" if cfg.sparsity > 0 else "dense"


def run_compress(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: CompressConfig, eval_cfg: EvalConfig | None,
                 out_dir: str, *, save_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """``misq compress``: calibrate, compress layer by layer, evaluate, account, save."""
    from misq import bitplan, compress
    from misq.resume import ResumeState
    from misq.rundir import Progress, RunDir

    check_writable(out_dir, "output folder")
    if save_dir:
        check_writable(save_dir, "save folder")
    data_dir = data.resolve_data_dir(data_cfg.data_dir)
    run = RunDir(out_dir)
    resolved = {"model": vars(model_cfg), "data": vars(data_cfg), "compress": cfg.to_dict(),
                "eval": {"datasets": list(eval_cfg.datasets)} if eval_cfg else None, "save": save_dir}
    state = ResumeState(run.path, resolved)
    if resume:
        state.check_resumable()
    else:
        state.start_fresh()
    run.write_config(resolved | {"misq_version": misq.__version__})
    handler = run.attach_log()
    try:
        model, tokenizer, seqlen, device = _load(model_cfg, data_cfg)
        n_layers = len(modeling.decoder_layers(model))
        with Progress(run, n_layers) as progress:
            progress.update("calibration-data")
            calib = data.calibration_windows(cfg.dataset, tokenizer, cfg.nsamples, seqlen, seed=cfg.seed,
                                             data_dir=data_dir, cache_dir=data_cfg.cache_dir)
            t0 = time.perf_counter()
            plans = state.load_plans()
            if plans is None and cfg.mixed_precision and cfg.budget == "model":
                progress.update("measure")
                plans = compress.measure_model_plan(model, calib, cfg, device)
                state.save_plans(plans)
            start_layer, output = state.restore(model)
            output = compress.compress_model(model, calib, cfg, device, progress=progress, plans=plans,
                                             start_layer=start_layer, on_layer_done=state.layer_done, prior=output)
            compress_s = time.perf_counter() - t0 + state.previous_seconds
            results = _compressed_results(model, model_cfg, cfg, output, seqlen, compress_s, device)
            results["protocol"] = protocol_record(seqlen, data_cfg.c4_cut)
            if eval_cfg:
                for name in eval_cfg.datasets:
                    progress.update(f"eval:{name}")
                    res = evaluate.evaluate_datasets(model, tokenizer, (name,), seqlen, device, data_dir=data_dir,
                                                     cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise,
                                                     batch_size=eval_cfg.batch_size, c4_cut=data_cfg.c4_cut)[name]
                    results["eval"][name] = res
                    results["ppl"][name] = res["ppl"]
                    results["timing"]["eval_s"][name] = res["seconds"]
            if save_dir:
                from misq.checkpoint import save_packed

                progress.update("save")
                sizes = save_packed(model, output.grids, save_dir, tokenizer=tokenizer, compress_config=cfg.to_dict(),
                                    pattern=sparsity_pattern(cfg))
                results["saved"] = {"path": str(Path(save_dir).resolve()), **sizes}
            results["bits"] = bitplan.bit_statistics(output.plans, cfg.target_avg_bits if cfg.mixed_precision else float(cfg.wbits))
            run.write_results(results)
            progress.update("done")
        state.finished()
        return results
    finally:
        run.detach_log(handler)


def _compressed_results(model: Any, model_cfg: ModelConfig, cfg: CompressConfig, output: Any, seqlen: int,
                        compress_s: float, device: str) -> dict[str, Any]:
    from misq.storage import storage_accounting

    records = output.records
    total = sum(r["rows"] * r["cols"] for r in records)
    pruned = sum(r["sparsity"] * r["rows"] * r["cols"] for r in records)
    return {
        "misq_version": misq.__version__,
        "kind": "compressed",
        "created": _now(),
        "model": modeling.model_summary(model) | {"name_or_path": model_cfg.model},
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else None,
        "protocol": protocol_record(seqlen),
        "config": cfg.to_dict() | {"seqlen": seqlen},
        "ppl": {},
        "eval": {},
        "timing": {"compress_s": compress_s, "eval_s": {}},
        "sparsity": {"target": cfg.sparsity if not cfg.structured else cfg.prunen / cfg.prunem,
                     "actual": pruned / max(total, 1), "pattern": sparsity_pattern(cfg)},
        "storage": storage_accounting(model, output.grids, sparsity_pattern(cfg)),
        "layers": records,
    }
