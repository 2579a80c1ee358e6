"""Loading the model a job works on: in memory, streamed from disk, or a packed misq checkpoint.

A streamed model (``--stream``) holds no decoder layer weights: :class:`LoadedModel` carries
the :class:`~misq.models.streaming.StreamedModel` that reads them one at a time as ``source``,
and every consumer (compression, evaluation, size accounting, the packed save) is handed that
``source`` explicitly; nothing about it is kept on the model itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from misq.config import DataConfig, ModelConfig
from misq.distributed import Dist
from misq.errors import MisqError
from misq.models import layout, loading, streaming
from misq.models.loading import misq_section_of


@dataclass
class LoadedModel:
    """A model ready for a job.

    model: the transformers causal LM (on the host; a streamed one has ``meta`` decoder layers);
    tokenizer: its tokenizer (None for a packed checkpoint saved without one);
    seqlen: the window length every calibration and evaluation segment has;
    device: where the job computes (the resolved ``--device``);
    source: where the decoder layers' weights come from when streamed, else None.
    """

    model: nn.Module
    tokenizer: Any
    seqlen: int
    device: str
    source: streaming.StreamedModel | None = None

    @property
    def streamed(self) -> bool:
        return self.source is not None


def load(model_cfg: ModelConfig, data_cfg: DataConfig) -> LoadedModel:
    """Load ``model_cfg.model`` as ``--stream``, ``--device-map`` and the folder's kind ask."""
    device = model_cfg.resolved_device()
    folder = streaming.stream_folder(model_cfg)  # None unless streaming; refuses --stream with the reason
    source = None
    if folder is not None:
        source, tokenizer = streaming.open_streamed(folder, model_cfg)
        model = source.model
    elif misq_section_of(model_cfg.model) is not None:
        from misq.checkpoint.packed import load_packed_with_tokenizer

        if model_cfg.device_map is not None:
            raise MisqError("--device-map loads plain Hugging Face checkpoints; a packed checkpoint is small: "
                            "evaluate it on one GPU (--layerwise 1 if it does not fit)")
        loading.read_model_config(model_cfg)  # a damaged config or missing layers: one line, before loading
        loader = None
        if model_cfg.runtime == "packed":
            from misq.runtime.load import load_packed_runtime as loader
        model, tokenizer = load_packed_with_tokenizer(model_cfg.model, dtype=model_cfg.dtype, loader=loader)  # None: as saved
    else:
        if model_cfg.runtime == "packed":
            raise MisqError(f"--runtime packed computes from a misq packed checkpoint's codes; {model_cfg.model} is a plain "
                            "checkpoint: drop --runtime, or compress it with `misq compress ... --save DIR` first")
        model, tokenizer = loading.load_model(model_cfg)
    seqlen = data_cfg.seqlen or layout.default_seqlen(model)
    layout.check_seqlen(model, seqlen)
    return LoadedModel(model, tokenizer, seqlen, device, source)


def load_in_turn(model_cfg: ModelConfig, data_cfg: DataConfig, dist: Dist) -> LoadedModel:
    """:func:`load` on every rank. A model that is not a local folder may be downloaded, and only
    rank 0 may write (the HF cache): the other ranks wait for it, then read the cache. One
    barrier on every rank when the model is not local, none when it is."""
    local = os.path.isdir(os.path.expanduser(model_cfg.model))
    if not local and not dist.is_main:
        dist.barrier()
    loaded = load(model_cfg, data_cfg)
    if not local and dist.is_main:
        dist.barrier()
    return loaded
