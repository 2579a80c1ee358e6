"""Perplexity by the GPTQ/SparseGPT protocol (docs/protocol.md).

The test text is tokenized once, cut into ``tokens // seqlen`` non-overlapping segments (the
remainder is dropped), and each segment is scored alone:

    loss_s = mean cross-entropy of the shifted logits      nll_s = loss_s * seqlen
    PPL = exp(Σ_s nll_s / (segments * seqlen))

The execution paths give the same numbers: the whole model on the device; layer by layer
(one decoder layer on the accelerator at a time) for models larger than the device, with the
layers' weights in host memory or read one at a time from disk (a ``source``, see
:mod:`misq.models.streaming`); or a model that transformers spread over several GPUs
(``device_map="auto"``), run as it is placed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from misq.models import execution, layout

log = logging.getLogger(__name__)


def segments_of(tokens: Tensor, seqlen: int) -> Tensor:
    """[1, N] token ids -> [N // seqlen, seqlen] segments; the remainder is dropped."""
    tokens = tokens.reshape(-1)
    n = tokens.numel() // seqlen
    return tokens[: n * seqlen].reshape(n, seqlen)


def segment_nll(logits: Tensor, segment: Tensor) -> Tensor:
    """Protocol nll of each segment: mean CE of shifted logits (float32) times seqlen. [b]"""
    seqlen = segment.shape[1]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = segment[:, 1:].to(logits.device)
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    return ce.view(segment.shape[0], -1).mean(dim=1) * seqlen


def fits_on_device(model: nn.Module, device: str) -> bool:
    """Whether the whole model (plus ~20% working room) fits in the device's free memory."""
    if not str(device).startswith("cuda"):
        return True
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    return need * 1.2 < free


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: Tensor, seqlen: int, device: str, *, layerwise: bool | None = None,
    batch_size: int = 1, desc: str = "eval", source: execution.LayerSource | None = None,
) -> dict[str, Any]:
    """Score ``tokens`` [1, N]; returns {ppl, tokens, segments, seqlen, seconds, path}.

    With a ``source`` the decoder layers hold no weights of their own: the layerwise path reads
    each one in turn. A model with an ``hf_device_map`` over several devices runs where it is.
    """
    t0 = time.perf_counter()
    segs = segments_of(tokens, seqlen)
    if segs.shape[0] == 0:
        from misq.errors import MisqError

        raise MisqError(f"{desc}: the text has {tokens.numel()} tokens, fewer than one window of {seqlen}: use a smaller --seqlen")
    if is_dispatched(model):
        path = "device-map"
        nlls = _nll_dispatched(model, segs, batch_size, desc)
    else:
        if source is not None:
            layerwise = True  # a streamed model never holds all its layers at once
        elif layerwise is None:
            layerwise = not fits_on_device(model, device)
        path = ("streamed" if source is not None else "layerwise") if layerwise else "whole-model"
        if layerwise:
            nlls = _nll_layerwise(model, segs, device, batch_size, desc, source)
        else:
            nlls = _nll_whole(model, segs, device, batch_size, desc)
    from misq.errors import NumericalError

    if not torch.isfinite(nlls).all():
        raise NumericalError(f"{desc}: the loss is NaN or infinite in {int((~torch.isfinite(nlls)).sum())} of "
                             f"{segs.shape[0]} segment(s): the model is broken (NaN/Inf weights or activations), so "
                             "there is no perplexity to report; check the checkpoint (or the compression settings)")
    mean = float(nlls.double().sum()) / (segs.shape[0] * seqlen)
    ppl = math.exp(mean) if mean < 709 else math.inf
    if not math.isfinite(ppl):
        raise NumericalError(f"{desc}: the perplexity overflows (mean loss {mean:.1f}): the model is broken, so "
                             "there is no perplexity to report")
    return {
        "ppl": ppl,
        "tokens": int(tokens.numel()),
        "segments": int(segs.shape[0]),
        "seqlen": int(seqlen),
        "seconds": time.perf_counter() - t0,
        "path": path,
    }


def _nll_whole(model: nn.Module, segs: Tensor, device: str, batch_size: int, desc: str) -> Tensor:
    dtype = execution.compute_dtype_for(model, device)
    out = []
    with execution.on_device(model, device, dtype):
        for start in tqdm(range(0, segs.shape[0], batch_size), desc=desc, unit="batch", leave=False):
            batch = segs[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            out.append(segment_nll(logits, batch).cpu())
    return torch.cat(out)


def is_dispatched(model: nn.Module) -> bool:
    """Whether transformers placed ``model`` over several devices (``device_map``)."""
    return len(set(getattr(model, "hf_device_map", None) or {"": None}.values())) > 1


def _nll_dispatched(model: nn.Module, segs: Tensor, batch_size: int, desc: str) -> Tensor:
    """The whole model as ``device_map`` placed it: hooks move activations between devices."""
    first = model.get_input_embeddings().weight.device
    out = []
    for start in tqdm(range(0, segs.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        batch = segs[start : start + batch_size]
        logits = model(input_ids=batch.to(first), use_cache=False).logits
        out.append(segment_nll(logits, batch).cpu())
    return torch.cat(out)


def _nll_layerwise(model: nn.Module, segs: Tensor, device: str, batch_size: int, desc: str,
                   source: execution.LayerSource | None = None) -> Tensor:
    dtype = execution.compute_dtype_for(model, device)
    inputs = execution.capture_layer0_inputs(model, segs, device, batch_size=batch_size, compute_dtype=dtype)
    layers = layout.decoder_layers(model)
    for i in tqdm(range(len(layers)), desc=f"{desc} (layers)", unit="layer", leave=False):
        with execution.layer_weights(source, i), execution.on_device(layers[i], device, dtype):
            execution.run_layer(layers[i], inputs, device, out=inputs.hidden)
    inner = model.model
    out = []
    with execution.on_device(inner.norm, device, dtype), execution.on_device(model.lm_head, device, dtype):
        for start in range(0, segs.shape[0], batch_size):
            h = inner.norm(inputs.hidden[start : start + batch_size].to(device))
            logits = model.lm_head(h)
            out.append(segment_nll(logits, segs[start : start + batch_size]).cpu())
    return torch.cat(out)


def evaluate_datasets(
    model: nn.Module, tokenizer: Any, datasets: tuple[str, ...], seqlen: int, device: str, *,
    data_dir: str | None = None, cache_dir: str | None = None, layerwise: bool | None = None, batch_size: int = 1,
    c4_cut: bool = True, source: execution.LayerSource | None = None,
) -> dict[str, dict[str, Any]]:
    """PPL on each dataset; the result maps dataset -> :func:`perplexity`'s dict + its source.
    ``source``: where a streamed model's layers come from (see :func:`perplexity`)."""
    from misq.protocol import data, sources

    results = {}
    for name in datasets:
        tokens = data.eval_tokens(name, tokenizer, seqlen, data_dir=data_dir, cache_dir=cache_dir, c4_cut=c4_cut)
        res = perplexity(model, tokens, seqlen, device, layerwise=layerwise, batch_size=batch_size, desc=f"eval {name}",
                         source=source)
        res["source"] = sources.describe_source(name, data_dir)
        log.info("%s: PPL %.3f over %d segments of %d tokens (%.1fs)", name, res["ppl"], res["segments"], seqlen, res["seconds"])
        results[name] = res
    return results
