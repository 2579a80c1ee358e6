"""The two jobs a user runs: evaluate a model, and compress (+ evaluate, + save) one.

This is orchestration only: it wires configuration, data, model plumbing, the compression
driver, the run directory and the results file together. Every number in a results file is
computed elsewhere; this module decides what goes in and writes it atomically.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import misq
from misq.atomic import atomic_write_json
from misq.checkpoint.packed import misq_section_of
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.models import layout, loading, streaming
from misq.protocol import data, perplexity

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
        "reference": "docs/protocol.md (the protocol of the GPTQ/SparseGPT papers' tables)",
    }


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail early (before loading a model) when an output location cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir() and what.endswith("folder"):
        raise MisqError(f"{what} {str(path)!r} is a file: give a folder path")
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    # Write a file rather than ask os.access: root passes os.access everywhere, and read-only
    # mounts or full disks only show when something is written.
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".misq-write-test-"):
            pass
    except OSError as err:
        raise MisqError(f"{what} {str(path)!r} is not writable ({err.strerror or err}): choose a folder you can write to") from None
    return path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(model_cfg: ModelConfig, data_cfg: DataConfig) -> tuple[Any, Any, int, str]:
    """(model, tokenizer, seqlen, device). A streamed model (``--stream``) holds no decoder layer
    weights: ``streaming.source_of(model)`` reads them one at a time."""
    device = model_cfg.resolved_device()
    folder = streaming.stream_folder(model_cfg)  # None unless streaming; refuses --stream with the reason
    if folder is not None:
        streamed, tokenizer = streaming.open_streamed(folder, model_cfg)
        model = streamed.model
    elif misq_section_of(model_cfg.model) is not None:
        from misq.checkpoint.packed import load_packed_with_tokenizer

        if model_cfg.device_map is not None:
            raise MisqError("--device-map loads plain Hugging Face checkpoints; a packed checkpoint is small: "
                            "evaluate it on one GPU (--layerwise 1 if it does not fit)")
        model, tokenizer = load_packed_with_tokenizer(model_cfg.model)
    else:
        model, tokenizer = loading.load_model(model_cfg)
    seqlen = data_cfg.seqlen or layout.default_seqlen(model)
    layout.check_seqlen(model, seqlen)
    return model, tokenizer, seqlen, device


def run_eval(model_cfg: ModelConfig, data_cfg: DataConfig, eval_cfg: EvalConfig, out: str | None) -> dict[str, Any]:
    """``misq eval``: perplexity of a model (a baseline, or a packed misq checkpoint)."""
    if out:
        check_writable(out, "output file")
    data_dir = data.resolve_data_dir(data_cfg.data_dir)
    data.check_local_sources([(name, None) for name in eval_cfg.datasets], data_dir)  # before loading weights
    model, tokenizer, seqlen, device = _load(model_cfg, data_cfg)
    packed = misq_section_of(model_cfg.model)
    streaming.reset_peak_gpu(device)
    source = streaming.source_of(model)
    evals = perplexity.evaluate_datasets(model, tokenizer, eval_cfg.datasets, seqlen, device, data_dir=data_dir,
                                       cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise, batch_size=eval_cfg.batch_size,
                                       c4_cut=data_cfg.c4_cut, source=source)
    results = {
        "misq_version": misq.__version__,
        "kind": "compressed" if packed is not None else "baseline",
        "created": _now(),
        "model": layout.model_summary(model) | {"name_or_path": model_cfg.model},
        "device": device,
        "protocol": protocol_record(seqlen, data_cfg.c4_cut),
        "ppl": {name: r["ppl"] for name, r in evals.items()},
        "eval": evals,
        "timing": {"eval_s": {name: r["seconds"] for name, r in evals.items()}},
        "memory": streaming.peak_memory(device) | {"streamed": source is not None},
    }
    if perplexity.is_dispatched(model):
        results["device_map"] = sorted({str(d) for d in model.hf_device_map.values()})
    if packed is not None:
        results["config"] = packed.get("compress_config", {})
    if out:
        atomic_write_json(out, results)
    return results


def sparsity_pattern(cfg: CompressConfig) -> str:
    if cfg.structured:
        return f"{cfg.prunen}:{cfg.prunem}"
    return "unstructured" if cfg.sparsity > 0 else "dense"


def run_compress(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: CompressConfig, eval_cfg: EvalConfig | None,
                 out_dir: str, *, save_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """``misq compress``: calibrate, compress layer by layer, evaluate, account, save.

    Under torchrun every rank calls this: rank 0 does all of the above, helped by the others in
    the compression itself; the other ranks only compress (:func:`_compress_follower`) and return
    ``{"rank": r}``.
    """
    from misq import distributed

    # Before anything touches CUDA: pins this rank's GPU, so that no rank opens a context on another's.
    dist = distributed.from_env(model_cfg.resolved_device())
    from misq.compress import bitplan, driver
    from misq.jobs import preflight
    from misq.runs.resume import ResumeState
    from misq.runs.rundir import Progress, RunDir

    resolved = {"model": vars(model_cfg), "data": vars(data_cfg), "compress": cfg.to_dict(),
                "eval": {"datasets": list(eval_cfg.datasets)} if eval_cfg else None, "save": save_dir}
    if not dist.is_main:
        return _compress_follower(model_cfg, data_cfg, cfg, resolved, out_dir, dist)
    check_writable(out_dir, "output folder")
    if save_dir:
        check_writable(save_dir, "save folder")
    data_dir = data.resolve_data_dir(data_cfg.data_dir)
    state = ResumeState(Path(out_dir), resolved)
    if resume:
        state.check_resumable()
    # Bad input is refused here, before the run folder is created or any weight is read.
    preflight.check_compress(model_cfg, data_cfg, cfg, eval_cfg, data_dir, resume_state=state if resume else None)
    run = RunDir(out_dir)
    if not resume:
        state.start_fresh()
    run.write_config(resolved | {"misq_version": misq.__version__})
    handler = run.attach_log()
    try:
        model, tokenizer, seqlen, device = _load_in_turn(model_cfg, data_cfg, dist)
        device = dist.device or device
        streaming.reset_peak_gpu(device)
        source = streaming.source_of(model)  # streamed: layers are read, compressed, written and dropped one by one
        n_layers = len(layout.decoder_layers(model))
        with Progress(run, n_layers) as progress:
            progress.update("calibration-data")
            calib = data.calibration_windows(cfg.dataset, tokenizer, cfg.nsamples, seqlen, seed=cfg.seed,
                                             data_dir=data_dir, cache_dir=data_cfg.cache_dir)
            # Collectives from here to dist.close() are matched one for one in _compress_follower.
            calib = dist.broadcast_object(calib)
            t0 = time.perf_counter()
            plans = dist.broadcast_object(state.load_plans())
            if plans is None and cfg.mixed_precision and cfg.budget == "model":
                progress.update("measure")
                plans = driver.measure_model_plan(model, calib, cfg, device, dist=dist, layer_source=source)
                state.save_plans(plans)
            start_layer, output = state.restore(model, calib, load_weights=source is None)
            if source is not None:
                for i in range(start_layer):
                    source.use_file(i, state.layer_path(i))
            dist.broadcast_object(start_layer)
            output = driver.compress_model(model, calib, cfg, device, progress=progress, plans=plans,
                                             start_layer=start_layer, on_layer_done=_layer_sink(state, source),
                                             prior=output, dist=dist, layer_source=source)
            processes = dist.describe() if dist.active else None
            dist.close()
            compress_s = time.perf_counter() - t0 + state.previous_seconds
            results = _compressed_results(model, model_cfg, cfg, output, seqlen, compress_s, device, source)
            if processes:
                results["distributed"] = processes
            results["protocol"] = protocol_record(seqlen, data_cfg.c4_cut)
            if eval_cfg:
                for name in eval_cfg.datasets:
                    progress.update(f"eval:{name}")
                    res = perplexity.evaluate_datasets(model, tokenizer, (name,), seqlen, device, data_dir=data_dir,
                                                     cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise,
                                                     batch_size=eval_cfg.batch_size, c4_cut=data_cfg.c4_cut,
                                                     source=source)[name]
                    results["eval"][name] = res
                    results["ppl"][name] = res["ppl"]
                    results["timing"]["eval_s"][name] = res["seconds"]
            if save_dir:
                from misq.checkpoint.packed import save_packed

                progress.update("save")
                sizes = save_packed(model, output.grids, save_dir, tokenizer=tokenizer, compress_config=cfg.to_dict(),
                                    pattern=sparsity_pattern(cfg), source=source)
                results["saved"] = {"path": str(Path(save_dir).resolve()), **sizes}
            results["bits"] = bitplan.bit_statistics(output.plans, cfg.target_avg_bits if cfg.mixed_precision else float(cfg.wbits))
            results["memory"] = streaming.peak_memory(device) | {"streamed": source is not None}
            run.write_results(results)
            progress.update("done")
        state.finished()
        return results
    finally:
        run.detach_log(handler)


def _layer_sink(state: Any, source: streaming.StreamedModel | None) -> Any:
    """What runs after each compressed layer: its resume file is written (atomically); a streamed
    model reads the layer back from that file from then on (evaluation, accounting, save)."""
    if source is None:
        return state.layer_done

    def done(i: int, output: Any) -> None:
        state.layer_done(i, output)
        source.use_file(i, state.layer_path(i))

    return done


def _load_in_turn(model_cfg: ModelConfig, data_cfg: DataConfig, dist: Any) -> tuple[Any, Any, int, str]:
    """:func:`_load` on every rank; a model that is not a local folder may be downloaded, and only
    rank 0 may write (the HF cache), so the other ranks wait for it and then read the cache."""
    local = os.path.isdir(os.path.expanduser(model_cfg.model))
    if not local and not dist.is_main:
        dist.barrier()
    loaded = _load(model_cfg, data_cfg)
    if not local and dist.is_main:
        dist.barrier()
    return loaded


def _compress_follower(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: CompressConfig, resolved: dict[str, Any],
                       out_dir: str, dist: Any) -> dict[str, Any]:
    """``misq compress`` on a torchrun rank other than 0: rank 0's collectives, in its order, and
    nothing else. It loads the model, takes the calibration windows (and any saved plans) from
    rank 0, compresses its share, and writes no file; on ``--resume`` it reads rank 0's resume
    folder (single host: the run folder is shared)."""
    from misq.compress import driver
    from misq.runs.resume import ResumeState

    model, _tokenizer, _seqlen, _device = _load_in_turn(model_cfg, data_cfg, dist)
    source = streaming.source_of(model)
    calib = dist.broadcast_object(None)
    plans = dist.broadcast_object(None)
    if plans is None and cfg.mixed_precision and cfg.budget == "model":
        plans = driver.measure_model_plan(model, calib, cfg, dist.device, dist=dist, layer_source=source)
    start_layer, prior = 0, None
    expected = dist.broadcast_object(None)
    if expected:  # --resume with finished layers: replay them from rank 0's files (reads only)
        state = ResumeState(Path(out_dir), resolved)
        state.check_resumable()
        start_layer, prior = state.restore(model, calib, load_weights=source is None)
        if source is not None:
            for i in range(start_layer):
                source.use_file(i, state.layer_path(i))
        if start_layer != expected:
            raise MisqError(f"rank {dist.rank} found {start_layer} finished layers in {out_dir}, rank 0 found {expected}: "
                            "rerun with --resume")
    driver.compress_model(model, calib, cfg, dist.device, plans=plans, start_layer=start_layer, prior=prior, dist=dist,
                            layer_source=source)
    rank = dist.rank
    dist.close()
    return {"rank": rank}


def _compressed_results(model: Any, model_cfg: ModelConfig, cfg: CompressConfig, output: Any, seqlen: int,
                        compress_s: float, device: str, source: Any = None) -> dict[str, Any]:
    from misq.checkpoint.accounting import storage_accounting

    records = output.records
    total = sum(r["rows"] * r["cols"] for r in records)
    pruned = sum(r["sparsity"] * r["rows"] * r["cols"] for r in records)
    return {
        "misq_version": misq.__version__,
        "kind": "compressed",
        "created": _now(),
        "model": layout.model_summary(model) | {"name_or_path": model_cfg.model},
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else None,
        "protocol": protocol_record(seqlen),
        "config": cfg.to_dict() | {"seqlen": seqlen},
        "ppl": {},
        "eval": {},
        "timing": {"compress_s": compress_s, "eval_s": {}},
        "sparsity": {"target": cfg.sparsity if not cfg.structured else cfg.prunen / cfg.prunem,
                     "actual": pruned / max(total, 1), "pattern": sparsity_pattern(cfg)},
        "storage": storage_accounting(model, output.grids, sparsity_pattern(cfg), source=source),
        "layers": records,
    }
