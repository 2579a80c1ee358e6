"""Checks a compression run makes before it creates its run folder or loads any weights.

Every mistake a user can make on the command line should cost seconds, not the minutes of
loading a 13B checkpoint, and should leave nothing behind in ``--out``. The flags themselves
are checked by :mod:`misq.config`; this module checks them against the things they refer to:
the data directory, the model's config (architecture, positions, channel counts), and the
calibration text (long enough for one window). Only the config and the tokenizer are read.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig
from misq.errors import MisqError
from misq.models import layout, loading
from misq.protocol import data

log = logging.getLogger(__name__)


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
    data.check_local_sources(wanted, data_dir)
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
