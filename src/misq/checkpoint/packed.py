"""The packed checkpoint: save a compressed model at its real size, load it back bit for bit.

A packed checkpoint is an ordinary Hugging Face folder whose ``config.json`` carries a ``misq``
section and whose safetensors hold, for every compressed linear layer ``L`` (e.g.
``model.layers.0.self_attn.q_proj``), the tensors of :mod:`misq.checkpoint.layer_format`
(format 2: codes and zero-points per width, fp16 scales per scale group, the column order
when it is not the natural one, the group table, the mask or N:M metadata):

    L.codes_w{b}  L.zeros_w{b}  L.fp_values  L.scales  L.perm  L.group_bits  L.group_len  L.mask | L.nm_index

and every other tensor (embeddings, norms, lm_head, biases) under its own name, as it was.
Above ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, as transformers does.

Saves are atomic at folder level: everything is written into a hidden sibling folder, fsynced,
and renamed into place; config.json is written last, so an interrupted save never leaves a
folder that looks complete. Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from misq import __version__
from misq.algorithms.quantizer import QuantGrid
from misq.checkpoint.accounting import KINDS, kind_of, stored_tensors
from misq.checkpoint.folder_writing import ShardWriter, check_target_folder, staged_folder
from misq.checkpoint.layer_format import decode_layer, encode_layer, expected_shapes
from misq.checkpoint.packing import Pattern, parse_pattern
from misq.dtypes import DTYPE_NAMES, torch_dtype
from misq.errors import MisqError
from misq.models.execution import LayerSource, layer_weights
from misq.models.layout import layer_index
from misq.models.loading import check_finite, misq_section_of
from misq.models.safetensors_files import (
    INDEX_NAME,
    SAFETENSORS_CODES,
    SafetensorsFiles,
    TensorInfo,
)
from misq.ownership import check_not_input

log = logging.getLogger(__name__)

FORMAT = "misq-packed"
FORMAT_VERSION = 2  # 2: group-wise grids, zeros at the code width, one column order
EXPORT_MARKER = "misq_export.json"
MAX_SHARD_BYTES = 2 * 1024**3


# ----------------------------------------------------------------------------- save


def save_packed(model: nn.Module, grids: dict[str, QuantGrid], out_dir: str | os.PathLike, *, tokenizer: Any = None,
                compress_config: Any, pattern: str, extra: dict[str, Any] | None = None,
                max_shard_bytes: int = MAX_SHARD_BYTES, source: LayerSource | None = None) -> dict[str, Any]:
    """Write ``model`` (compressed in place, with ``grids`` by full linear name) as a packed checkpoint.

    ``out_dir`` must be new, empty, or an older misq checkpoint (which is replaced). Returns the
    sizes: ``files`` {name: bytes}, ``total_bytes``, ``weights_bytes`` (safetensors files) and
    ``payload_bytes`` by kind (codes, mask, scales_zeros, channel_index, fp16_channels, untouched).

    Decoder layers are packed and written one at a time, and a shard goes to disk as soon as it
    is full: with a ``source`` (a streamed model, :mod:`misq.models.streaming`) each layer's weights are
    read just for its turn, so host memory holds one layer and one shard, never the model.
    """
    try:
        pat = parse_pattern(pattern)
    except ValueError as err:
        raise MisqError(str(err)) from None
    out = Path(out_dir)
    check_target_folder(out, is_packed_checkpoint)
    for name in grids:
        linear_module(model, name)  # a name that is not a linear of this model fails before anything is written
    payload = dict.fromkeys(KINDS, 0)
    layers: dict[str, Any] = {}
    config = model.config.to_dict()
    if hasattr(compress_config, "to_dict"):
        compress_config = compress_config.to_dict()
    with staged_folder(out, is_packed_checkpoint) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, t, kind in _stored(model, grids, pat, layers, source):
            writer.add(name, t)
            payload[kind] += t.numel() * t.element_size()
        writer.finish()
        dtype = next((m["dtype"] for m in layers.values()), str(next(model.parameters()).dtype).replace("torch.", ""))
        config["misq"] = {"format": FORMAT, "format_version": FORMAT_VERSION, "misq_version": __version__,
                          "compress_config": compress_config, "pattern": str(pat), "dtype": dtype,
                          "layers": layers, "extra": extra or {}}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        text = json.dumps(config, indent=2, sort_keys=True, default=_plain)
        (tmp / "config.json").write_text(text + "\n")  # last: a folder without it never looks complete
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    sizes = {"files": files, "total_bytes": sum(files.values()),
             "weights_bytes": sum(v for k, v in files.items() if k.endswith(".safetensors")),
             "payload_bytes": payload, "payload_total": sum(payload.values())}
    log.info("saved packed checkpoint %s: %d layers, %.1f MB of weights", out, len(layers), sizes["weights_bytes"] / 1e6)
    return sizes


def _stored(model: nn.Module, grids: dict[str, QuantGrid], pat: Pattern, metas: dict[str, Any],
            source: LayerSource | None) -> Iterator[tuple[str, Tensor, str]]:
    """(name, tensor, payload kind) of everything the checkpoint stores, decoder layer by decoder
    layer (packed linears, then the layer's other tensors), then what lies outside the layers.
    Fills ``metas`` with each packed layer's metadata."""
    untouched = list(stored_tensors(model, {f"{n}.weight" for n in grids}))  # names only: a streamed layer's tensors change on load
    groups: dict[int | None, tuple[list[str], list[str]]] = {}
    for name in grids:
        groups.setdefault(layer_index(name), ([], []))[0].append(name)
    for name in untouched:
        groups.setdefault(layer_index(name), ([], []))[1].append(name)
    order = sorted(i for i in groups if i is not None) + ([None] if None in groups else [])
    for i in order:
        packed_names, plain_names = groups[i]
        with layer_weights(source if i is not None else None, i):
            for name in packed_names:
                try:
                    packed = encode_layer(linear_module(model, name).weight, grids[name], pat)
                except ValueError as err:
                    raise MisqError(f"cannot pack {name} as {pat}: {err}; save the model compress_model returned, "
                                    "with its grids and the pattern it was pruned to") from None
                metas[name] = packed.meta
                for suffix, t in packed.tensors.items():
                    yield f"{name}.{suffix}", t, kind_of(suffix)
            state = model.state_dict(keep_vars=True) if plain_names else {}
            for name in plain_names:
                yield name, state[name].detach().cpu().contiguous(), "untouched"


def _plain(obj: Any) -> Any:
    """JSON for numpy/torch scalars and paths that callers put in ``extra``."""
    return obj.item() if hasattr(obj, "item") else str(obj)


def linear_module(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` of ``model`` at the full name ``name`` (weight [out, in]); one clear error
    when the name is missing or is not a linear layer (grids or a checkpoint from another model)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise MisqError(f"{name} is not a linear layer of this model: the grids and the model do not belong together")
    return module


def check_save_target(save_dir: str | os.PathLike) -> None:
    """Refuse (before any work) a ``--save`` folder that is neither new, empty nor a misq packed checkpoint."""
    check_target_folder(Path(save_dir).expanduser(), is_packed_checkpoint)


# ----------------------------------------------------------------------------- load


def read_config_json(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of the checkpoint folder ``path``, or one clear error when it is missing or not JSON."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise MisqError(f"{path} has no config.json: give a misq packed checkpoint or a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as err:
        raise MisqError(f"{cfg} is not valid JSON ({err}): the checkpoint is damaged, save it again") from None


def is_packed_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose config.json has a misq section of this format."""
    section = misq_section_of(path)
    return section is not None and section.get("format") == FORMAT


def checked_misq_section(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``misq`` section of ``cfg`` (the config.json of ``path``), checked to be a packed
    checkpoint of the format version this misq reads; one clear error otherwise."""
    section = cfg.get("misq")
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise MisqError(f"{path} is not a misq packed checkpoint (no misq section in config.json): give the folder misq saved")
    version = section.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MisqError(f"{path}: config.json has format_version {version!r}: the checkpoint is damaged, save it again")
    if version < FORMAT_VERSION:
        raise MisqError(f"{path} was saved in misq's packed format {version}, which stored a group id per channel and "
                        f"fp16 zeros; this misq reads format {FORMAT_VERSION}: load it with misq 0.1, or compress the "
                        "model again with --save")
    if version > FORMAT_VERSION:
        raise MisqError(f"{path} was written by a newer misq (format version {version}, this misq reads up to "
                        f"{FORMAT_VERSION}): upgrade misq")
    return section


class CheckpointTensors:
    """Every tensor of a checkpoint's safetensors files, by name, read lazily: ``tensors`` maps
    each name to its header's :class:`TensorInfo`, :meth:`check` checks one, :meth:`get` reads it.

    The shared reader (:class:`misq.models.safetensors_files.SafetensorsFiles`) resolves the index
    and the shard names and reads the headers; the files are then opened once each, which
    also refuses a truncated file (its header is intact, its data is not) before anything is built.
    """

    def __init__(self, path: Path) -> None:
        self.tensors: dict[str, TensorInfo] = SafetensorsFiles.of_folder(path).tensors
        self.handles: dict[str, Any] = {}
        for file in sorted({info.file for info in self.tensors.values()}):
            try:
                handle = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as err:
                raise MisqError(f"{file} is truncated or corrupt ({err}): copy or save the checkpoint again") from None
            self.handles.update(dict.fromkeys(handle.keys(), handle))

    def check(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
        """Refuse a missing tensor, or one whose header disagrees with ``shape`` and ``dtype`` (None: any dtype)."""
        if name not in self.tensors:
            raise MisqError(f"tensor {name} is missing from the checkpoint: it is incomplete, save it again")
        info = self.tensors[name]
        if info.shape != tuple(shape) or (dtype is not None and info.dtype != SAFETENSORS_CODES[dtype]):
            raise MisqError(f"tensor {name} is {info.dtype} {list(info.shape)} but config.json implies "
                            f"{SAFETENSORS_CODES.get(dtype, 'float')} {list(shape)}: config.json and the weights do not match")

    def get(self, name: str) -> Tensor:
        """The tensor ``name``, read from its file (on the CPU, in its stored dtype)."""
        return self.handles[name].get_tensor(name)


def load_packed(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str = "cpu") -> nn.Module:
    """Load a packed checkpoint (or a plain Hugging Face folder) as a transformers model in eval mode.

    Compressed layers come back bit for bit as the solver left them (in the dtype they were
    saved in; ``dtype`` casts everything). Everything is validated before anything is returned.
    """
    path = Path(path)
    dtype = dtype_arg(dtype)
    cfg = read_config_json(path)
    if not isinstance(cfg, dict):
        raise MisqError(f"{path}/config.json is not a JSON object: the checkpoint is damaged, save it again")
    if "misq" not in cfg:
        from transformers import AutoModelForCausalLM

        log.info("%s has no misq section: loading it as a plain Hugging Face model", path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
    section = checked_misq_section(path, cfg)
    try:
        model = _build(path, section, dtype)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as err:  # fields of unexpected types
        raise MisqError(f"{path}/config.json is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
                        "save the checkpoint again") from None
    log.info("loaded packed checkpoint %s (%d compressed layers)", path, len(section["layers"]))
    return model.to(device).eval()


def dtype_arg(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A load's ``dtype`` argument as a torch dtype (a name from DTYPE_NAMES, or None: the saved one)."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise MisqError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPE_NAMES)}")
        return torch_dtype(dtype)
    return dtype


def section_fields(path: Path, section: dict[str, Any]) -> tuple[Pattern, dict[str, Any], torch.dtype]:
    """(pattern, layers {name: meta}, saved dtype) of a misq section, or one clear error if damaged."""
    try:
        pattern = parse_pattern(section["pattern"])
        layers: dict[str, Any] = section["layers"]
        saved_dtype = torch_dtype(section["dtype"])
        if not isinstance(layers, dict) or not all(isinstance(m, dict) for m in layers.values()):
            raise TypeError("'layers' is not an object of layer entries")
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise MisqError(f"{path}/config.json has a damaged misq section ({err!r}): save the checkpoint again") from None
    return pattern, layers, saved_dtype


def _build(path: Path, section: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    pattern, layers, saved_dtype = section_fields(path, section)
    weights = CheckpointTensors(path)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers' validation errors have no common base worth naming
        raise MisqError(f"{path}/config.json is damaged ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}): "
                        "save the checkpoint again") from None
    if hasattr(hf_config, "misq"):
        delattr(hf_config, "misq")  # a later save_pretrained of this model must not look packed
    with no_init_weights():  # every tensor is about to be replaced: skip the random init
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or saved_dtype)
    model.tie_weights()  # init_weights, skipped above, is what ties lm_head to the embeddings
    untouched = stored_tensors(model, {f"{n}.weight" for n in layers})
    tied = set(model.state_dict()) - set(stored_tensors(model))
    for name, t in untouched.items():
        weights.check(name, tuple(t.shape), None)
    for name, meta in layers.items():
        check_layer_tensors(weights, linear_module(model, name), name, meta, pattern)
    state: dict[str, Tensor] = {}
    for name in untouched:
        t = weights.get(name)
        check_finite([(name, t)], str(path))
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    for name, meta in layers.items():
        tensors = {s: weights.get(f"{name}.{s}") for s in expected_shapes(meta, pattern)}
        check_finite(((f"{name}.{s}", t) for s, t in tensors.items()), str(path))  # the stored fp16 scales among them
        try:
            state[f"{name}.weight"] = decode_layer(tensors, meta, pattern, dtype)
        except ValueError as err:
            raise MisqError(f"{name} does not decode ({err}): the checkpoint is damaged, save it again") from None
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise MisqError(f"{path}: tensors do not fit the model ({result.unexpected_keys[:3]}): save the checkpoint again")
    model.tie_weights()  # assign=True replaced the tied parameter objects: tie lm_head again
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def check_layer_tensors(weights: CheckpointTensors, module: nn.Linear, name: str, meta: dict[str, Any],
                        pattern: Pattern) -> None:
    """Refuse a packed layer whose ``meta`` (rows x cols) does not match ``module.weight`` [out, in],
    or whose tensors (:func:`expected_shapes`) are missing from ``weights`` or of another shape or dtype."""
    try:
        rows, cols = int(meta["rows"]), int(meta["cols"])
        shapes = expected_shapes(meta, pattern)
    except (KeyError, ValueError, TypeError) as err:
        raise MisqError(f"config.json misq.layers[{name}] is damaged ({err!r}): save the checkpoint again") from None
    if tuple(module.weight.shape) != (rows, cols):
        raise MisqError(f"config.json says {name} is {rows}x{cols} but the model config makes it "
                        f"{tuple(module.weight.shape)}: config.json and the weights do not match")
    for suffix, (shape, dt) in shapes.items():
        weights.check(f"{name}.{suffix}", shape, dt)


def load_packed_with_tokenizer(path: str | os.PathLike, *, loader: Any = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer); the tokenizer is None when the folder holds no tokenizer files.
    ``loader(path, **kwargs)`` builds the model (default :func:`load_packed`, dense weights;
    ``misq.runtime.load_packed_runtime`` keeps the codes)."""
    model = (loader or load_packed)(path, **kwargs)
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("%s holds no tokenizer files: returning no tokenizer", path)
        return model, None
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- export


def is_misq_export(path: Path) -> bool:
    """Whether the folder ``path`` was written by a misq export (dense or GPTQ): it holds :data:`EXPORT_MARKER`."""
    return (path / EXPORT_MARKER).is_file()


def export_dense(packed_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16") -> Path:
    """Write ``packed_dir`` as a plain Hugging Face checkpoint (safetensors, no misq section).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` then loads it without misq. Tokenizer
    files are copied. Atomic like :func:`save_packed`; replaces only an earlier export.
    """
    packed, out = Path(packed_dir), Path(out_dir)
    if dtype not in DTYPE_NAMES:
        raise MisqError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPE_NAMES)}")
    checked_misq_section(packed, read_config_json(packed))
    check_not_input(out, {"the packed checkpoint": packed}, "--dense")
    check_target_folder(out, is_misq_export)
    model = load_packed(packed, dtype=torch_dtype(dtype))
    own = {"config.json", "generation_config.json", INDEX_NAME}
    with staged_folder(out, is_misq_export) as tmp:
        model.save_pretrained(tmp)
        for f in packed.iterdir():
            if f.is_file() and f.name not in own and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        marker = {"exported_from": str(packed.resolve()), "misq_version": __version__, "dtype": dtype}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    log.info("exported %s as a dense %s checkpoint to %s", packed, dtype, out)
    return out
