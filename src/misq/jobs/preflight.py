"""Checks a compression run makes before it creates its run folder or loads any weights.

Every mistake a user can make on the command line should cost seconds, not the minutes of
loading a 13B checkpoint, and should leave nothing behind in ``--out``. The flags themselves
are checked by :mod:`misq.config`; this module checks them against the things they refer to:
the data directory, the model's config (architecture, positions, channel counts), and the
calibration text (long enough for one window). Only the config and the tokenizer are read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.models import layout, loading
from misq.protocol import data, sources

log = logging.getLogger(__name__)


def _older_misq_run(folder: Path) -> bool:
    """A run folder of a misq that predates the ``.misq-run`` marker."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "misq_version" in config and "compress" in config \
        and ((folder / "progress.json").is_file() or (folder / "resume").is_dir())


def check_outputs(model_cfg: ModelConfig, out_dir: str, save_dir: str | None, *, resume: bool = False,
                  overwrite: bool = False) -> Any:
    """Refuse, before any work, the output folders ``misq compress`` may not write (see
    :mod:`misq.ownership`). When ``out_dir`` exists, its lock is taken here and returned (a
    :class:`~misq.ownership.FolderLock`): a second run on it fails now, naming the holder."""
    from misq.checkpoint.packed import check_save_target
    from misq.ownership import COMPRESS_RUN, FolderLock, check_not_input, check_output_folder, same_path
    from misq.runs.rundir import check_writable

    check_not_input(out_dir, {"the model folder": model_cfg.model}, "--out")
    if save_dir:
        check_not_input(save_dir, {"the model folder": model_cfg.model}, "--save")
        if same_path(save_dir, out_dir):
            raise MisqError(f"--save {save_dir!r} is the --out folder: the packed checkpoint needs a folder of its own "
                            "(e.g. --save {}/packed)".format(out_dir.rstrip('/')))
    check_writable(out_dir, "output folder")
    if save_dir:
        check_writable(save_dir, "save folder")
        check_save_target(save_dir)
    out = check_output_folder(out_dir, COMPRESS_RUN, "--out", overwrite=overwrite, owned=_older_misq_run)
    if not out.is_dir():
        return None
    lock = FolderLock(out).acquire()
    try:
        if not resume and not overwrite:
            _check_no_earlier_run(out)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_no_earlier_run(out: Path) -> None:
    """A fresh run never replaces an earlier run's results or finished layers without being asked."""
    if (out / "results.json").is_file():
        raise MisqError(f"--out {str(out)!r} holds an earlier finished run (results.json): choose a new --out for this "
                        "run, or pass --overwrite to replace it")
    try:
        done = json.loads((out / "resume" / "state.json").read_text(encoding="utf-8")).get("done_layers")
    except (OSError, ValueError, AttributeError):
        done = None
    if isinstance(done, int) and done > 0:
        raise MisqError(f"--out {str(out)!r} holds an interrupted run with {done} finished layer(s): pass --resume to "
                        "continue it, --overwrite to start over in it, or choose a new --out")


def check_compress(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: CompressConfig, eval_cfg: EvalConfig | None,
                   data_dir: str | os.PathLike | None, resume_state: Any = None) -> int:
    """Raise :class:`MisqError` for anything that would make ``misq compress`` fail later.

    Cheapest first: the model config, then the data files, then the tokenizer and the calibration
    text (tokenized once; the token cache makes the run's own pass free). A run being resumed
    (``resume_state``, a :class:`misq.runs.resume.ResumeState`) must draw the interrupted run's
    calibration windows. Returns the seqlen.
    """
    hf_config = loading.read_model_config(model_cfg)
    seqlen = data_cfg.seqlen or layout.default_seqlen(hf_config)
    layout.check_seqlen(hf_config, seqlen)
    if cfg.structured:
        layout.check_nm_pattern(hf_config, cfg.prunen, cfg.prunem)
    # After the config checks: locating the data logs notes (a c4 sample in place of the shard),
    # which should not precede an error about the model.
    wanted: list[tuple[str, str | None]] = [(cfg.dataset, "train")]
    wanted += [(name, None) for name in (eval_cfg.datasets if eval_cfg else ())]
    sources.check_local_sources(wanted, data_dir)
    tokenizer = loading.load_tokenizer(model_cfg)
    calib = data.calibration_windows(cfg.dataset, tokenizer, cfg.nsamples, seqlen, seed=cfg.seed, data_dir=data_dir,
                                     cache_dir=data_cfg.cache_dir)
    if resume_state is not None:
        resume_state.check_calibration(calib)
    for name in eval_cfg.datasets if eval_cfg else ():
        _check_eval_text(name, tokenizer, seqlen, data_dir, data_cfg)
    log.debug("preflight passed: %s, seqlen %d", model_cfg.model, seqlen)
    return seqlen


def _check_eval_text(name: str, tokenizer: Any, seqlen: int, data_dir: str | os.PathLike | None, data_cfg: DataConfig) -> None:
    """An evaluation text must hold one window; found out now rather than after compressing."""
    tokens = data.eval_tokens(name, tokenizer, seqlen, data_dir=data_dir, cache_dir=data_cfg.cache_dir, c4_cut=data_cfg.c4_cut)
    if tokens.numel() < seqlen:
        raise MisqError(f"--eval {name}: the text has {tokens.numel()} tokens, fewer than one window of {seqlen}: "
                        "use a smaller --seqlen or a longer text")
