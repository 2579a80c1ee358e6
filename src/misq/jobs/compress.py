"""``misq compress``: calibrate, compress layer by layer, evaluate, account, save.

Orchestration only: it wires configuration, data, model loading, the compression driver, the
run directory and the results file together; every number is computed elsewhere.

Under torchrun every rank runs :func:`run_compress` top to bottom: the same collectives in the
same order on every rank (the calibration windows and any saved plans from rank 0, the driver's
own, the check that every rank resumes from the same layer). File I/O is rank 0's alone (the
run folder, its log and progress, the resume files, the results, the packed checkpoint, and the
evaluation that follows); on ``--resume`` the other ranks read rank 0's resume folder (single
host: the run folder is shared).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.distributed import Dist
from misq.errors import MisqError
from misq.jobs import extras
from misq.jobs.loading import LoadedModel, load_in_turn
from misq.models import layout, streaming
from misq.models.safetensors_files import weights_fingerprint
from misq.ownership import COMPRESS_RUN, FolderLock, claim_folder
from misq.protocol import data, perplexity, sources
from misq.protocol.record import protocol_record
from misq.runs.results import Memory, Results, Sparsity, Timing, now_utc
from misq.runs.resume import ResumeState
from misq.runs.rundir import Progress, RunDir


class _NoProgress:
    """Progress of a rank that writes no run folder (torchrun ranks other than 0)."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def update(self, stage: str, layer: int | None = None, sublayer: str | None = None, **extra: Any) -> bool:
        return False


def run_compress(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: CompressConfig, eval_cfg: EvalConfig | None,
                 out_dir: str, *, save_dir: str | None = None, resume: bool = False,
                 overwrite: bool = False) -> dict[str, Any] | None:
    """Compress ``model_cfg.model`` into the run folder ``out_dir`` (and ``save_dir``, if given).

    ``out_dir`` must be new, empty, or misq's own run folder (:mod:`misq.ownership`); one that
    holds an earlier run's results or finished layers is refused unless ``resume`` (continue it)
    or ``overwrite`` (start over in it). ``overwrite`` also lets misq take over a folder it did
    not make. A lock keeps a second run out of the folder while this one works in it.

    Returns the results (the ``results.json`` dict) on rank 0; None on the other torchrun ranks,
    which write and report nothing.
    """
    from misq import __version__, distributed
    from misq.jobs import preflight

    # Before anything touches CUDA: pins this rank's GPU, so that no rank opens a context on another's.
    dist = distributed.from_env(model_cfg.resolved_device())
    resolved = {"model": vars(model_cfg) | {"dtype": model_cfg.weight_dtype}, "data": vars(data_cfg), "compress": cfg.to_dict(),
                "eval": {"datasets": list(eval_cfg.datasets)} if eval_cfg else None, "save": save_dir}
    lock: FolderLock | None = None
    if dist.is_main:
        lock = preflight.check_outputs(model_cfg, out_dir, save_dir, resume=resume, overwrite=overwrite)
    state = ResumeState(Path(out_dir), resolved)
    model_folder = Path(model_cfg.model).expanduser()
    state.weights = weights_fingerprint(model_folder) if model_folder.is_dir() else None
    run: RunDir | None = None
    try:
        data_dir = sources.resolve_data_dir(data_cfg.data_dir)
        if resume:
            state.check_resumable()  # reads only: every rank restores from this folder
        if dist.is_main:
            # Bad input is refused here, before the run folder is created or any weight is read. Rank 0
            # only: it tokenizes (and caches) the calibration text, which the other ranks receive.
            preflight.check_compress(model_cfg, data_cfg, cfg, eval_cfg, data_dir, resume_state=state if resume else None)
            extras.check(eval_cfg)  # lm-eval, its tasks and their data, the prompts file: before compressing
            claim_folder(out_dir, COMPRESS_RUN)
            if lock is None:  # a new folder: nobody could hold it before it existed
                lock = FolderLock(out_dir).acquire()
            run = RunDir(out_dir)
            if not resume:
                state.start_fresh()
            run.write_config(resolved | {"misq_version": __version__})
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    handler = run.attach_log() if run is not None else None
    try:
        loaded = load_in_turn(model_cfg, data_cfg, dist)
        device = dist.device or loaded.device
        streaming.reset_peak_gpu(device)
        n_layers = len(layout.decoder_layers(loaded.model))
        with Progress(run, n_layers) if run is not None else _NoProgress() as progress:
            output, compress_s, processes = _compress(loaded, data_cfg, cfg, device, data_dir, state, dist, progress)
            if run is None:
                return None
            results = _report(loaded, model_cfg, data_cfg, cfg, eval_cfg, output, compress_s, device, data_dir,
                              save_dir, progress)
            results.distributed = processes
            results.write(run.results_path)
            progress.update("done")
        state.finished()
        return results.to_json()
    finally:
        if run is not None:
            run.detach_log(handler)
        if lock is not None:
            lock.release()


def _compress(loaded: LoadedModel, data_cfg: DataConfig, cfg: CompressConfig, device: str, data_dir: Path | None,
              state: ResumeState, dist: Dist, progress: Any) -> tuple[Any, float, dict[str, Any] | None]:
    """Calibration windows, plans, resume and the driver: every collective of the run, in one
    order on every rank. Returns (the driver's CompressionOutput, compression seconds including
    an interrupted run's, what the results say about the processes or None in one process)."""
    from misq.compress import driver

    model, source = loaded.model, loaded.source
    progress.update("calibration-data")
    calib = None
    if dist.is_main:  # reads the data files and writes the token cache: rank 0 draws, the others receive
        calib = data.calibration_windows(cfg.dataset, loaded.tokenizer, cfg.nsamples, loaded.seqlen, seed=cfg.seed,
                                         data_dir=data_dir, cache_dir=data_cfg.cache_dir)
    calib = dist.broadcast_object(calib)
    t0 = time.perf_counter()
    plans = dist.broadcast_object(state.load_plans() if dist.is_main else None)
    if plans is None and cfg.mixed_precision and cfg.budget == "model":
        progress.update("measure")
        plans = driver.measure_model_plan(model, calib, cfg, device, dist=dist, layer_source=source)
        if dist.is_main:
            state.save_plans(plans)
    start_layer, prior = state.restore(model, calib, source=source)
    _check_same_start(dist, start_layer, state)
    try:
        output = driver.compress_model(model, calib, cfg, device, progress=progress, plans=plans, start_layer=start_layer,
                                       on_layer_done=_layer_sink(state, source) if dist.is_main else None,
                                       prior=prior, dist=dist, layer_source=source)
    except BaseException:
        state.wait(quiet=True)  # the finished layers reach the disk, so that --resume can continue after them
        raise
    state.wait()  # before anything reads a layer back from its resume file (a streamed model's evaluation, save)
    processes = dist.describe() if dist.active else None
    dist.close()  # the collectives are over; rank 0 evaluates and saves alone
    return output, time.perf_counter() - t0 + state.previous_seconds, processes


def _check_same_start(dist: Dist, start_layer: int, state: ResumeState) -> None:
    """Every rank must resume from the same layer (they read the same folder, but a rank may
    have read it while it changed): all ranks exchange their counts and all refuse together."""
    counts = dist.gather_dicts({dist.rank: start_layer})
    for rank, found in sorted(counts.items()):
        if found != counts[0]:
            raise MisqError(f"rank {rank} found {found} finished layers in {state.dir.parent}, rank 0 found {counts[0]}: "
                            "rerun with --resume")


def _layer_sink(state: ResumeState, source: streaming.StreamedModel | None) -> Callable[[int, dict[str, Tensor], Any], None]:
    """What runs after each compressed layer: its resume file is written (atomically); a streamed
    model reads the layer back from that file from then on (evaluation, accounting, save)."""

    def done(i: int, layer_state: dict[str, Tensor], output: Any) -> None:
        state.layer_done(i, layer_state, output)
        if source is not None:
            source.use_file(i, state.layer_path(i), written=state.wait)

    return done


def _report(loaded: LoadedModel, model_cfg: ModelConfig, data_cfg: DataConfig, cfg: CompressConfig,
            eval_cfg: EvalConfig | None, output: Any, compress_s: float, device: str, data_dir: Path | None,
            save_dir: str | None, progress: Any) -> Results:
    """Rank 0, after compression: size accounting, evaluation, the packed save, the results."""
    from misq.checkpoint.accounting import storage_accounting
    from misq.compress import bitplan

    model, source, seqlen = loaded.model, loaded.source, loaded.seqlen
    created = now_utc()
    records = output.records
    total = sum(r["rows"] * r["cols"] for r in records)
    pruned = sum(r["sparsity"] * r["rows"] * r["cols"] for r in records)
    storage = storage_accounting(model, output.grids, cfg.pattern, source=source)
    evals = {}
    for name in eval_cfg.datasets if eval_cfg else ():
        progress.update(f"eval:{name}")
        evals[name] = perplexity.evaluate_datasets(model, loaded.tokenizer, (name,), seqlen, device, data_dir=data_dir,
                                                   cache_dir=data_cfg.cache_dir, layerwise=model_cfg.layerwise,
                                                   batch_size=eval_cfg.batch_size, c4_cut=data_cfg.c4_cut,
                                                   source=source)[name]
    saved = None
    if save_dir:
        from misq.checkpoint.packed import save_packed

        progress.update("save")
        # The source model is recorded so that the checkpoint's own evaluation compares with its baseline.
        sizes = save_packed(model, output.grids, save_dir, tokenizer=loaded.tokenizer, compress_config=cfg.to_dict(),
                            pattern=cfg.pattern, source=source, extra={"source_model": model_cfg.model})
        saved = {"path": str(Path(save_dir).resolve()), **sizes}
    on_cuda = str(device).startswith("cuda")
    results = Results(
        kind="compressed",
        created=created,
        model=layout.model_summary(model) | {"name_or_path": model_cfg.model},
        device=device,
        cuda=torch.cuda.get_device_name(torch.device(device)) if on_cuda else None,
        protocol=protocol_record(seqlen, data_cfg.c4_cut),
        config=cfg.to_dict() | {"seqlen": seqlen},
        timing=Timing(compress_s=compress_s),
        sparsity=Sparsity(target=cfg.sparsity if not cfg.structured else cfg.prunen / cfg.prunem,
                          actual=pruned / max(total, 1), pattern=cfg.pattern),
        storage=storage,
        layers=records,
        bits=bitplan.bit_statistics(output.plans, cfg.target_avg_bits if cfg.mixed_precision else float(cfg.wbits)),
        saved=saved,
        memory=Memory(**streaming.peak_memory(device), streamed=loaded.streamed),
    )
    for name, res in evals.items():
        results.add_eval(name, res)
    # Zero-shot tasks and generations; a failure there is recorded, not raised: the compression is kept.
    extras.measure(results, model, loaded.tokenizer, eval_cfg, device, layerwise=model_cfg.layerwise, source=source,
                   strict=False, progress=progress)
    return results
