"""Honest size accounting of a compressed model (docs/bit-accounting.md).

Pure arithmetic on the in-memory model and its grids: no files are written or read. The byte
counts are those of the packed checkpoint format (:mod:`misq.checkpoint.packing`, :mod:`misq.checkpoint`)
(:mod:`misq.checkpoint.layer_format`)
to the byte, so ``bits_per_param_disk_model × parameters / 8`` is the size of the saved
weights. What is *not* counted: safetensors headers (~100 bytes per tensor, with the tensor
names), config.json and the tokenizer files. They are not parameters; on a real model they are
well under 1% of the folder, on a toy model they can dominate.

The figures, each labelled (never report only the flattering one):

* ``avg_channel_bits``: mean width over the input channels of the quantized layers, each
  channel weighted by its number of weights (rows); 16 counts as 16. What
  ``--target_avg_bits`` targets.
* ``bits_per_stored_weight``: avg_channel_bits + an fp16 scale and a zero at the code width per
  (row, scale group), spread over all the layer's weights. Ignores sparsity: every weight
  counted as stored (GPTQ's own figure: 3-bit with groups of 128 is 3 + 19/128).
* ``bits_per_param_disk_quantized``: everything the packed format stores for the quantized
  layers (surviving codes at their widths, mask or N:M metadata, scales and zeros, the column
  order and the group table, 16-bit channel values) over their parameter count. 50%
  unstructured + 4 bits = 0.5 × 4 + 1 (mask) = 3 bits plus scales, not 2.
* ``bits_per_param_disk_model``: the same plus every untouched tensor (embeddings, norms,
  lm_head, biases) at its dtype, over all parameters.
* ``compression_ratio_*`` = 16 / the matching disk bits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from misq.algorithms.quantizer import FP_BITS, QuantGrid
from misq.checkpoint.layer_format import describe_layer, layer_nbytes, stored_grid
from misq.checkpoint.packing import Pattern, parse_pattern
from misq.config import sparsity_pattern
from misq.models.execution import LayerSource, layer_weights
from misq.models.layout import layer_index

log = logging.getLogger(__name__)

KINDS = ("codes", "mask", "scales_zeros", "channel_index", "fp16_channels", "untouched")


def pattern_for(compress_config: Mapping[str, Any]) -> str:
    """The pattern of a stored CompressConfig dict (a results file's ``config``, a packed
    checkpoint's ``compress_config``): :func:`misq.config.sparsity_pattern` of its fields.

    A live :class:`~misq.config.CompressConfig` has ``.pattern``; this is for the dict form,
    whose fields may be missing or null in older files (read as "no pruning").
    """
    get = compress_config.get
    return sparsity_pattern(float(get("sparsity") or 0.0), int(get("prunen") or 0), int(get("prunem") or 0))


def kind_of(suffix: str) -> str:
    """Which accounting kind a packed tensor suffix (see :mod:`misq.checkpoint.layer_format`) is."""
    if suffix.startswith("codes_w"):
        return "codes"
    if suffix.startswith("zeros_w") or suffix == "scales":
        return "scales_zeros"
    return {"mask": "mask", "nm_index": "mask", "fp_values": "fp16_channels"}.get(suffix, "channel_index")


def stored_tensors(model: nn.Module, skip: set[str] = frozenset()) -> dict[str, Tensor]:
    """The state-dict tensors a checkpoint stores as they are, by name, minus ``skip``.

    Tied tensors (lm_head = embeddings) appear once, under their first name: the model re-ties
    them on load, and safetensors refuses shared storage anyway.
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if name not in skip:
            out[name] = t.detach()
    return out


def layer_bytes(weight: Tensor, grid: QuantGrid, pattern: str | Pattern) -> dict[str, int]:
    """Bytes by kind that the packed format stores for one layer with weight [R, C]: the sizes
    of the tensors :func:`~misq.checkpoint.layer_format.encode_layer` writes, from one description."""
    meta = describe_layer(weight, grid, pattern)
    out = dict.fromkeys(KINDS[:-1], 0)
    for suffix, nbytes in layer_nbytes(meta, pattern, weight.element_size()).items():
        out[kind_of(suffix)] += nbytes
    return out


def storage_accounting(model: nn.Module, grids: dict[str, QuantGrid], pattern: str,
                       source: LayerSource | None = None) -> dict[str, Any]:
    """All the labelled size figures of docs/bit-accounting.md for ``model`` compressed with ``grids``.

    ``grids`` maps full linear names (``model.layers.0.self_attn.q_proj``) to their grids; the
    model's weights must already be the compressed ones (pruned to exact zeros). Tokenizer and
    config files, and safetensors headers, are excluded (see the module docstring). With a
    ``source`` (a streamed model) each decoder layer's weights are read in turn.
    """
    pat = parse_pattern(pattern)
    by_kind = dict.fromkeys(KINDS, 0)
    q_params = weighted_bits = grid_bits = zeros = 0
    by_layer: dict[int | None, list[str]] = {}
    for name in grids:
        by_layer.setdefault(layer_index(name), []).append(name)
    for i, names in by_layer.items():
        with layer_weights(source if i is not None else None, i):
            for name in names:
                grid = grids[name]
                W = model.get_submodule(name).weight
                R, C = W.shape
                for kind, nbytes in layer_bytes(W, grid, pat).items():
                    by_kind[kind] += nbytes
                q_params += R * C
                weighted_bits += R * int(stored_grid(grid).column_bits().sum())
                # fp16 scale + a zero at the code width per (row, quantized group)
                qbits = grid.bits[grid.bits < FP_BITS]
                grid_bits += R * int((16 + qbits).sum())
                zeros += R * C - int(torch.count_nonzero(W))
    skip = {f"{name}.weight" for name in grids}
    by_kind["untouched"] = sum(t.numel() * t.element_size() for t in stored_tensors(model, skip).values())
    params = sum(p.numel() for p in model.parameters())
    bytes_q = sum(v for k, v in by_kind.items() if k != "untouched")
    bytes_model = bytes_q + by_kind["untouched"]
    disk_q = 8 * bytes_q / q_params if q_params else float("nan")
    disk_model = 8 * bytes_model / params
    result = {
        "sparsity_pattern": str(pat),
        "sparsity": zeros / q_params if q_params else 0.0,
        "avg_channel_bits": weighted_bits / q_params if q_params else float("nan"),
        "bits_per_stored_weight": (weighted_bits + grid_bits) / q_params if q_params else float("nan"),
        "bits_per_param_disk_quantized": disk_q,
        "bits_per_param_disk_model": disk_model,
        "compression_ratio_quantized": 16 / disk_q if q_params else float("nan"),
        "compression_ratio_model": 16 / disk_model,
        "bytes_quantized": bytes_q,
        "bytes_model": bytes_model,
        "bytes_fp16_model": 2 * params,
        "bytes_by_kind": by_kind,
        "parameters": params,
        "quantized_parameters": q_params,
        "excluded": "safetensors headers, config.json, tokenizer files (not parameters)",
    }
    log.info("storage: %.3f avg channel bits, %.3f bits/param on disk (quantized layers), %.3f (whole model)",
             result["avg_channel_bits"], disk_q, disk_model)
    return result
