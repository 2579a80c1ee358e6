"""``misq export PACKED --format gptq OUT``: a packed checkpoint as a GPTQ (v1 or v2) checkpoint.

The folder is what GPTQModel, transformers (with optimum and gptqmodel), vLLM and ExLlama load:
per compressed linear ``L`` the tensors ``L.qweight``, ``L.qzeros``, ``L.scales``, ``L.g_idx``
(:mod:`misq.checkpoint.gptq_format`), every other tensor (embeddings, norms, ``lm_head``,
biases) copied as it is, the tokenizer and generation files copied, and a ``config.json``
without the misq section and with a ``quantization_config``:

    {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": false,
     "checkpoint_format": "gptq", "format": "gptq", "dynamic": {...}, ...}

Widths may differ between layers: the most common (bits, group_size) becomes the base and each
other layer gets a per-module override in ``dynamic``, with GPTQModel's key syntax
(``"+:regex"`` overrides fields for the modules the regex matches, ``"-:regex"`` leaves them
unquantized; README "Dynamic Quantization" and ``quantization/config.py`` ``dynamic_get``, which
vLLM's ``gptq_utils.get_dynamic_override`` follows: first match wins, ``re.match`` on the module
name). vLLM matches its fused names (``qkv_proj``, ``gate_up_proj``), so a rule covering all of
q/k/v or gate/up names the fused module too. transformers' GPTQ path (optimum 2.3) ignores
``dynamic`` and refuses such a folder (size mismatch), which the export warns about.
``GPTQModel.load()`` refuses any ``sym: false`` v1 checkpoint whose ``meta.quantizer`` does not
name gptqmodel >= 0.9 (``models/loader.py``, a guard against AutoGPTQ's zero - 1 underflow). The
export names misq there, as it is, so that loader refuses a v1 folder; transformers (whose GPTQ
path runs GPTQModel's kernels) and vLLM load it. ``checkpoint_format="gptq_v2"`` writes
GPTQModel's v2 layout instead (zero points as they are, ``"checkpoint_format"`` and ``"format"``
``"gptq_v2"``), which that loader takes without the guard or any conversion, ``dynamic`` included.

Runs GPTQ cannot express (mixed widths within a layer, 16-bit columns, 6-bit codes, unequal
groups) are refused before anything is written. Pruned weights have no place in the format:
they are stored as the code of their zero point, a full code each.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from misq import __version__
from misq.algorithms.quantizer import QuantGrid, from_codes, to_codes
from misq.checkpoint.folder_writing import ShardWriter, check_target_folder, staged_folder
from misq.checkpoint.gptq_format import ZERO_OFFSET, GptqLayout, GptqUnsupported, encode_gptq, gptq_layout
from misq.checkpoint.layer_format import decode_layer, expected_shapes, run_table
from misq.checkpoint.packed import (
    EXPORT_MARKER,
    MAX_SHARD_BYTES,
    CheckpointTensors,
    checked_misq_section,
    is_misq_export,
    read_config_json,
    section_fields,
)
from misq.checkpoint.packing import Pattern, unpack_bits
from misq.errors import MisqError
from misq.models.layout import LAYER_PREFIX, layer_index
from misq.models.loading import check_finite
from misq.models.safetensors_files import INDEX_NAME
from misq.ownership import check_not_input

log = logging.getLogger(__name__)

# vLLM loads these as one fused linear, with one quantization config (its packed_modules_mapping).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def export_gptq(packed_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                checkpoint_format: str = "gptq") -> dict[str, Any]:
    """Write ``packed_dir`` as a GPTQ checkpoint in ``out_dir`` (atomic; replaces only an earlier
    misq export), in the ``checkpoint_format`` "gptq" (v1) or "gptq_v2" layout. Returns
    ``quantization_config``, ``gptq_bytes`` and ``packed_bytes`` (the safetensors of both
    folders) and ``mirrored`` (see :mod:`~misq.checkpoint.gptq_format`)."""
    if checkpoint_format not in ZERO_OFFSET:
        raise MisqError(f"unknown GPTQ checkpoint format {checkpoint_format!r}: one of {', '.join(ZERO_OFFSET)}")
    packed, out = Path(packed_dir), Path(out_dir)
    cfg = read_config_json(packed)
    section = checked_misq_section(packed, cfg)
    pattern, layers, _ = section_fields(packed, section)
    check_not_input(out, {"the packed checkpoint": packed}, "OUT")
    layouts = _plan(packed, layers)
    check_target_folder(out, is_misq_export)
    weights = CheckpointTensors(packed)
    packed_names: set[str] = set()
    for name, meta in layers.items():
        for suffix, (shape, dtype) in expected_shapes(meta, pattern).items():
            weights.check(f"{name}.{suffix}", shape, dtype)
            packed_names.add(f"{name}.{suffix}")
    untouched = sorted(n for n in weights.tensors if n not in packed_names)
    skipped = [n.removesuffix(".weight") for n in untouched  # a decoder linear misq left dense
               if n.startswith(LAYER_PREFIX) and n.endswith(".weight") and len(weights.tensors[n].shape) == 2]
    quantization_config(layouts, skipped)  # its warnings (dynamic rules) before the work
    mirrored, desc_act = 0, False
    with staged_folder(out, is_misq_export) as tmp:
        writer = ShardWriter(tmp, MAX_SHARD_BYTES)
        for name in sorted(layers, key=lambda n: (layer_index(n) or 0, n)):
            tensors = {s: weights.get(f"{name}.{s}") for s in expected_shapes(layers[name], pattern)}
            check_finite(((f"{name}.{s}", t) for s, t in tensors.items()), str(packed))
            try:
                layer = encode_gptq(*stored_codes(tensors, layers[name], pattern), checkpoint_format)
            except ValueError as err:  # GptqUnsupported was ruled out by _plan: this is a damaged layer
                raise MisqError(f"{name} does not decode ({err}): the checkpoint is damaged, save it again") from None
            mirrored += layer.mirrored
            desc_act |= layer.desc_act
            for suffix, t in layer.tensors().items():
                writer.add(f"{name}.{suffix}", t)
        for name in untouched:
            t = weights.get(name)
            check_finite([(name, t)], str(packed))
            writer.add(name, t)
        writer.finish()
        own = {"config.json", INDEX_NAME}
        for f in packed.iterdir():  # tokenizer, generation config, anything else that is not weights
            if f.is_file() and f.name not in own and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        marker = {"exported_from": str(packed.resolve()), "misq_version": __version__, "format": "gptq",
                  "checkpoint_format": checkpoint_format}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        qcfg = quantization_config(layouts, skipped, desc_act=desc_act, warn=False, checkpoint_format=checkpoint_format)
        hf_config = {k: v for k, v in cfg.items() if k != "misq"} | {"quantization_config": qcfg}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")  # last
    result = {"quantization_config": qcfg, "gptq_bytes": _weights_bytes(out), "packed_bytes": _weights_bytes(packed),
              "mirrored": mirrored}
    notes = "" if pattern.kind == "dense" else f"; its {pattern} pruned weights are stored as zero-point codes here"
    if mirrored:
        notes += f"; {mirrored} (group, row) grids with zero point 0 are written with a negated scale"
    log.info("exported %s as GPTQ (%s) to %s: %.2f MB of weights against %.2f MB in misq's packed file (x%.2f)%s",
             packed, checkpoint_format, out, result["gptq_bytes"] / 1e6, result["packed_bytes"] / 1e6,
             result["gptq_bytes"] / max(result["packed_bytes"], 1), notes)
    return result


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def _plan(packed: Path, layers: dict[str, Any]) -> dict[str, GptqLayout]:
    """Every layer's GPTQ layout from config.json alone, or one error naming the first layer that
    has none (and how many more), before any tensor is read or anything written."""
    layouts: dict[str, GptqLayout] = {}
    refused: list[tuple[str, str]] = []
    for name, meta in layers.items():
        try:
            R, C, group_bits = int(meta["rows"]), int(meta["cols"]), [int(b) for b in meta["group_bits"]]
            # A regular layer's runs follow from config.json; an irregular one's are in its tensors,
            # and with one width irregular means runs of unequal length: None says so.
            run_len = run_table({}, meta)[1].tolist() if meta.get("regular_groupsize") else [C] if len(group_bits) == 1 else None
            layouts[name] = gptq_layout(R, C, group_bits, run_len)
        except GptqUnsupported as err:
            refused.append((name, str(err)))
        except (KeyError, TypeError, ValueError) as err:
            raise MisqError(f"{packed}/config.json misq.layers[{name}] is damaged ({err!r}): save the checkpoint again") from None
    if refused:
        name, why = refused[0]
        more = f" (and {len(refused) - 1} more layers)" if len(refused) > 1 else ""
        raise MisqError(f"{packed} cannot be written as GPTQ: {name} {why}{more}; export it with `misq export {packed} "
                        f"--format dense OUT`, or run it as it is with misq's own runtime: misq.load({str(packed)!r}, runtime=\"packed\")")
    if not layouts:
        raise MisqError(f"{packed} holds no compressed layers: there is nothing to write as GPTQ; use --format dense")
    ragged = [n for n, lay in layouts.items() if lay.group_size > 0 and lay.cols % lay.group_size]
    if ragged:  # GPTQModel and transformers take ceil(C / G) groups; vLLM's create_weights requires C % G == 0
        log.warning("%s (and %d more) has a last scale group shorter than the others: GPTQModel and transformers "
                    "read it, vLLM refuses it", ragged[0], len(ragged) - 1)
    return layouts


def stored_codes(tensors: dict[str, Tensor], meta: dict[str, Any], pattern: Pattern) -> tuple[Tensor, QuantGrid]:
    """(codes [R, C] in the natural column order, grid) of one stored, fully quantized layer of
    one width: each kept weight's code, and the zero point for a pruned one (its weight is 0).
    ValueError when the stored values are not on the stored grid."""
    R, C = int(meta["rows"]), int(meta["cols"])
    bits, run_len = run_table(tensors, meta)
    K, b = bits.numel(), int(bits[0])
    perm = tensors["perm"].long() if "perm" in tensors else torch.arange(C)
    groups = torch.empty(C, dtype=torch.long)
    groups[perm] = torch.repeat_interleave(torch.arange(K), run_len)  # group j is the j-th stored run
    zero = unpack_bits(tensors[f"zeros_w{b}"], b, R * K).reshape(R, K).float()
    grid = QuantGrid(scale=tensors["scales"].float(), zero=zero, groups=groups, bits=bits, order=perm)
    W = decode_layer(tensors, meta, pattern, torch.float32)  # float32: exactly scale * (q - zero)
    codes = to_codes(W, grid)
    if not torch.equal(from_codes(codes, grid), W):
        raise ValueError("the decoded weights are not on their grid")
    return codes, grid


def quantization_config(layouts: dict[str, GptqLayout], skipped: Sequence[str] = (), *, desc_act: bool = False,
                        warn: bool = True, checkpoint_format: str = "gptq") -> dict[str, Any]:
    """config.json's ``quantization_config`` for these layers: the (bits, group_size) that fits
    most layers as the base, the others as ``dynamic`` overrides, ``skipped`` linears excluded.

    ``desc_act``: some layer's g_idx is not ``arange(C) // G``. g_idx is written for every layer
    and desc_act tells readers to use it; readers take it for the whole model, so one layer whose
    columns act-order moved between groups sets it for all (an identity g_idx reads the same).
    ``checkpoint_format``: "gptq" (v1, zero - 1) or "gptq_v2" (zero as it is), written under both
    names."""
    widths = dict.fromkeys(lay.bits for lay in layouts.values())
    sizes = dict.fromkeys(lay.group_size for lay in layouts.values())
    # Fewest overrides; on a tie a real group size over -1 (a one-group layer of C columns fits G = C).
    bits, group_size = max(((b, g) for b in widths for g in sizes),
                           key=lambda c: (sum(lay.fits(*c) for lay in layouts.values()), c[1] != -1))
    overrides = {name: {"bits": lay.bits, "group_size": group_size if lay.fits(lay.bits, group_size) else lay.group_size}
                 for name, lay in layouts.items() if not lay.fits(bits, group_size)}
    qcfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
        # the layout under both names: transformers/vLLM read checkpoint_format, GPTQModel format
        "sym": False, "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
        "true_sequential": True, "lm_head": False, "damp_percent": 0.01, "static_groups": False,
        "meta": {"quantizer": [f"misq:{__version__}"]},
    }
    dynamic = _dynamic(overrides, skipped, warn)
    if dynamic:
        qcfg["dynamic"] = dynamic
    if dynamic and warn:
        log.warning("layers differ in width or group size: %d per-module overrides in quantization_config.dynamic, "
                    "which vLLM and GPTQModel.load read; transformers' GPTQ loader (optimum) ignores them and refuses this folder",
                    len(dynamic))
    return qcfg


def _dynamic(overrides: dict[str, dict[str, int]], skipped: Sequence[str], warn: bool) -> dict[str, dict[str, int]]:
    """GPTQModel ``dynamic`` rules: ``-:^name$`` for each skipped linear, ``+:^name$`` with the
    override for each other layer, one rule for a fused set (q/k/v, gate/up) that agrees."""
    rules: dict[str, dict[str, int]] = {f"-:^{re.escape(n)}$": {} for n in skipped}  # negatives first, as GPTQModel orders them
    done: set[str] = set()
    for name, override in overrides.items():
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        fused = next(((f, m) for f, m in _FUSED.items() if leaf in m), None)
        if fused is not None:
            siblings = [f"{parent}.{m}" for m in fused[1]]
            if all(overrides.get(s) == override for s in siblings):
                rules[f"+:^{re.escape(parent)}\\.(?:{'|'.join(fused[1] + (fused[0],))})$"] = override
                done.update(siblings)
                continue
            if warn:
                log.warning("%s differs from the rest of %s.%s: vLLM, which fuses them into one linear, cannot load this",
                            name, parent, fused[0])
        rules[f"+:^{re.escape(name)}$"] = override
    return rules
