"""Load a packed checkpoint into a transformers model whose compressed linears are
:class:`~misq.runtime.linear.PackedLinear` (the file format is the same as for
:func:`misq.checkpoint.packed.load_packed`, which decodes every layer to dense instead)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from misq.checkpoint.accounting import stored_tensors
from misq.checkpoint.layer_format import expected_shapes
from misq.checkpoint.packed import (
    CheckpointTensors,
    check_layer_tensors,
    checked_misq_section,
    dtype_arg,
    linear_module,
    load_packed,
    read_config_json,
    section_fields,
)
from misq.errors import MisqError
from misq.models.layout import SEQUENTIAL_STEPS
from misq.runtime.linear import PackedLinear
from misq.runtime.merge import merge_shared_inputs

log = logging.getLogger(__name__)


def weights_nbytes(model: nn.Module) -> dict[str, int]:
    """{"packed": bytes of every PackedLinear's buffers, "other": every other parameter and
    buffer (embeddings, norms, lm_head), "total"}: what the weights occupy on their device."""
    packed = sum(m.weight_nbytes for m in model.modules() if isinstance(m, PackedLinear))
    seen: set[int] = set()
    other = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, PackedLinear) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())  # tied embeddings count once
        other += t.numel() * t.element_size()
    return {"packed": packed, "other": other, "total": packed + other}


def load_packed_runtime(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device: str = "cpu", merge: bool = True) -> nn.Module:
    """A packed checkpoint as a transformers model (eval mode) whose compressed linears compute
    from their codes. A folder without a misq section loads as a plain (dense) model.

    Non-linear tensors are cast to ``dtype`` (default: the saved dtype); the codes stay codes.
    On CUDA with fp16 the Triton kernels run; elsewhere each layer dequantizes in its forward.
    ``merge``: projections that read one input and share a layout (q/k/v, gate/up of a uniform
    checkpoint) run as one layer (:mod:`misq.runtime.merge`): the same bytes, fewer launches.
    """
    path = Path(path)
    dtype = dtype_arg(dtype)
    cfg = read_config_json(path)
    if "misq" not in cfg:
        log.info("%s is not a packed checkpoint: loading it dense", path)
        return load_packed(path, dtype=dtype, device=device)
    section = checked_misq_section(path, cfg)
    model = _build(path, section, dtype)
    merged = merge_shared_inputs(model, SEQUENTIAL_STEPS) if merge else 0
    log.info("loaded %s with the packed runtime (%d packed layers, %d groups merged)", path, len(section["layers"]), merged)
    return model.to(device).eval()


def _build(path: Path, section: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    pattern, layers, saved_dtype = section_fields(path, section)
    weights = CheckpointTensors(path)
    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "misq"):
        delattr(hf_config, "misq")
    # Uninitialised weights are allocated but never touched, so the dense linears cost no real
    # host memory before the packed layers replace them.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or saved_dtype)
    model.tie_weights()
    untouched = stored_tensors(model, {f"{n}.weight" for n in layers})
    for name, t in untouched.items():
        weights.check(name, tuple(t.shape), None)
    for name, meta in layers.items():
        check_layer_tensors(weights, linear_module(model, name), name, meta, pattern)
    for name, meta in layers.items():
        tensors = {s: weights.get(f"{name}.{s}") for s in expected_shapes(meta, pattern)}
        bias = untouched.pop(f"{name}.bias", None)
        bias_t = None if bias is None else weights.get(f"{name}.bias")
        try:
            module = PackedLinear.from_file(tensors, meta, pattern, bias_t)
        except ValueError as err:
            raise MisqError(f"{name} does not decode ({err}): the checkpoint is damaged, save it again") from None
        model.set_submodule(name, module)
    state: dict[str, Tensor] = {}
    for name in untouched:
        t = weights.get(name)
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model
