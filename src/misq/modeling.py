"""Model plumbing: loading, walking decoder layers, capturing layer inputs, running layers.

This module knows the shape of LLaMA-family models in transformers (``model.model.layers``
of decoder layers with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``; Llama
1/2/3, Vicuna, Mistral, Qwen2) and nothing about compression algorithms.

Layer-by-layer execution is what lets a 13B model run on one modest GPU: the embeddings run
once, layer 0's inputs are captured together with *every* keyword argument the model passes
it (transformers 5.x hands over ``position_embeddings`` and may pass ``attention_mask=None``),
and then one decoder layer at a time is moved to the accelerator, run on all sequences, and
moved back.
"""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor, nn

from misq.config import ModelConfig
from misq.errors import MisqError

log = logging.getLogger(__name__)

# True-sequential order: each step's layers share one input, so they share one Hessian.
SEQUENTIAL_STEPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(n for step in SEQUENTIAL_STEPS for n in step)
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


try:  # what transformers 5 raises for a config.json whose values contradict each other
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:  # pragma: no cover - older huggingface_hub: such configs raise ValueError
    _ConfigValidationError = ValueError


def _looks_local(path: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``) is a path."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1


def read_model_config(cfg: ModelConfig) -> Any:
    """The checkpoint's Hugging Face config, checked to be a causal LM misq knows; reads no weights.

    This is the cheap half of :func:`load_model`, so that a run can refuse a bad model before it
    loads gigabytes of weights or creates its run folder.
    """
    from transformers import AutoConfig

    path = os.path.expanduser(cfg.model)
    if _looks_local(cfg.model) and not os.path.isdir(path):
        raise MisqError(f"model path {cfg.model!r} does not exist: give a local checkpoint folder or a hub id such as meta-llama/Llama-2-7b-hf")
    try:
        # trust_remote_code stays off unless the user passed --trust-remote-code: a checkpoint's
        # own Python code would run with the user's rights.
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, _ConfigValidationError) as err:
        cause = f"; {_first_line(err.__cause__)}" if err.__cause__ is not None else ""
        raise MisqError(f"cannot read a model config from {cfg.model!r} ({_first_line(err).rstrip(':')}{cause}): "
                        "give a Hugging Face causal-LM folder (with a valid config.json) or hub id") from None
    check_architecture(hf_config)
    return hf_config


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The checkpoint's tokenizer (no weights are read)."""
    from transformers import AutoTokenizer

    path = os.path.expanduser(cfg.model)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise MisqError(f"cannot load a tokenizer from {cfg.model!r} ({_first_line(err)}): "
                        "the checkpoint folder needs its tokenizer files (tokenizer.json or tokenizer.model)") from None


def load_model(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder, the HF cache or the hub.

    The weights stay on the CPU in ``cfg.dtype``; callers move layers as they need them. With
    ``cfg.device_map`` transformers places them instead (evaluation over several GPUs).
    """
    from transformers import AutoModelForCausalLM

    read_model_config(cfg)
    placement: dict[str, Any] = {}
    if getattr(cfg, "device_map", None) is not None:  # eval over several GPUs: transformers places the layers
        from transformers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise MisqError("--device-map needs the accelerate package: pip install accelerate "
                            "(or evaluate on one GPU layer by layer with --layerwise 1)")
        placement["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(
        os.path.expanduser(cfg.model), dtype=TORCH_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
        low_cpu_mem_usage=True, **placement,
    )
    model.eval()
    model.config.use_cache = False
    return model, load_tokenizer(cfg)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def check_architecture(hf_config: Any) -> None:
    """Refuse models whose decoder layers misq does not know, before loading any weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None) or "?"
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    # A checkpoint names the head it was saved with; BertForMaskedLM or LlamaModel is not a causal LM
    # even though its model type could be built as one.
    causal = any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs \
        else model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(hf_config, "is_encoder_decoder", False)
    if not causal:
        raise MisqError(f"{', '.join(archs) or model_type} is not a causal language model: "
                        "give a decoder-only LLaMA-family checkpoint (e.g. LlamaForCausalLM)")
    if model_type not in KNOWN_MODEL_TYPES:
        raise MisqError(
            f"architecture {model_type!r} is not supported: misq knows LLaMA-family decoders ({', '.join(KNOWN_MODEL_TYPES)}) "
            "with q/k/v/o and gate/up/down projections"
        )


def linear_input_channels(hf_config: Any) -> dict[str, int]:
    """Input channels of each compressible linear of a decoder layer, from the config alone."""
    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    cols = {name: hidden for name in LINEAR_NAMES}
    cols["self_attn.o_proj"] = heads * head_dim
    cols["mlp.down_proj"] = int(hf_config.intermediate_size)
    return cols


def check_nm_pattern(hf_config: Any, prunen: int, prunem: int) -> None:
    """N:M pruning cuts every row into runs of M input channels: M must divide all of them."""
    cols = linear_input_channels(hf_config)
    bad = sorted({c for c in cols.values() if c % prunem})
    if bad:
        fits = [m for m in (4, 8, 16, 2) if m > prunen and all(c % m == 0 for c in cols.values())]
        hint = f"e.g. --prunen {prunen} --prunem {fits[0]}" if fits else "or use unstructured --sparsity"
        raise MisqError(f"N:M pattern {prunen}:{prunem} does not fit this model: its layers have {', '.join(map(str, bad))} "
                        f"input channels, not a multiple of M={prunem}; choose an M that divides them, {hint}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        layers = model.model.layers
    except AttributeError:
        raise MisqError(f"{type(model).__name__} has no model.layers: misq needs a LLaMA-family decoder") from None
    missing = [n for n in LINEAR_NAMES if not isinstance(_get(layers[0], n), nn.Linear)]
    if missing:
        raise MisqError(f"{type(layers[0]).__name__} lacks {', '.join(missing)}: misq needs q/k/v/o and gate/up/down projections")
    return layers


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The compressible linears of one decoder layer, by their dotted name inside the layer."""
    return {name: _get(layer, name) for name in LINEAR_NAMES}


def default_seqlen(model: nn.Module | Any) -> int:
    """The protocol's window: min(2048, the model's max positions); takes a model or its HF config."""
    config = getattr(model, "config", model)
    return min(2048, int(getattr(config, "max_position_embeddings", 2048) or 2048))


def check_seqlen(model: nn.Module | Any, seqlen: int) -> None:
    """Refuse windows longer than the model's position table (a model or its HF config)."""
    config = getattr(model, "config", model)
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    if limit and seqlen > limit:
        raise MisqError(f"--seqlen {seqlen} is larger than the model supports ({limit} positions): use --seqlen {limit} or less")


def model_summary(model: nn.Module) -> dict[str, Any]:
    c = model.config
    heads = c.num_attention_heads
    return {
        "name_or_path": getattr(c, "_name_or_path", ""),
        "architecture": (getattr(c, "architectures", None) or [type(model).__name__])[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "ffn": c.intermediate_size,
        "heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "vocab": c.vocab_size,
        "max_positions": getattr(c, "max_position_embeddings", None),
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs we need have been seen."""


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, for all sequences, plus the layer's kwargs.

    hidden: [n, seqlen, d] on ``storage`` (the accelerator, or the CPU when offloading)
    kwargs: every keyword argument the model passed to layer 0 for a batch of ``batch_size``
    """

    hidden: Tensor
    kwargs: dict[str, Any]
    batch_size: int

    def batch_kwargs(self, n: int, device: torch.device | str) -> dict[str, Any]:
        """kwargs for a batch of ``n`` sequences on ``device`` (slicing per-sequence tensors)."""
        return {k: _to_device(_fit_batch(v, self.batch_size, n), device) for k, v in self.kwargs.items()}


def _fit_batch(value: Any, captured: int, n: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and captured > 1 and value.shape[0] == captured and n != captured:
        return value[:n]
    if isinstance(value, tuple):
        return tuple(_fit_batch(v, captured, n) for v in value)
    return value


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, input_ids: Tensor, device: torch.device | str, *, batch_size: int = 8,
    storage: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
) -> LayerInputs:
    """Run the embeddings on ``input_ids`` [n, seqlen] and capture what layer 0 receives.

    Only the embedding, rotary and (for some models) norm modules visit ``device``.
    """
    storage = storage or device
    layers = decoder_layers(model)
    inner = model.model
    small = [m for name, m in inner.named_children() if name != "layers"]
    dtype = compute_dtype or next(model.parameters()).dtype
    n, seqlen = input_ids.shape
    hidden = torch.empty(n, seqlen, model.config.hidden_size, dtype=dtype, device=storage)
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "hidden_states")}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    kwargs: dict[str, Any] = {}
    try:
        for m in small:
            m.to(device=device)
        for sl in _batches(n, batch_size):
            try:
                model(input_ids=input_ids[sl].to(device), use_cache=False)
            except _StopForward:
                pass
            hidden[sl] = captured["hidden"].to(device=storage, dtype=dtype)
            if not kwargs:
                kwargs = {k: _cast_float(v, dtype) for k, v in captured["kwargs"].items()}
    finally:
        handle.remove()
        for m in small:
            m.to("cpu")
    return LayerInputs(hidden=hidden, kwargs=kwargs, batch_size=min(batch_size, n))


def _cast_float(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_float(v, dtype) for v in value)
    return value


def call_layer(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """One decoder layer on one batch; transformers 4.x returns a tuple, 5.x a tensor."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device | str, out: Tensor | None = None) -> Tensor:
    """Run ``layer`` (already on ``device``) over all sequences of ``inputs``; returns [n, seqlen, d].

    ``out`` may be ``inputs.hidden`` itself: each batch is read before it is overwritten.
    """
    hidden = inputs.hidden
    out = torch.empty_like(hidden) if out is None else out
    for sl in _batches(hidden.shape[0], inputs.batch_size):
        kw = inputs.batch_kwargs(sl.stop - sl.start, device)
        out[sl] = call_layer(layer, hidden[sl].to(device), kw).to(out.device)
    return out


@contextmanager
def on_device(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """Temporarily move ``module`` to ``device`` (and ``dtype``), then back to where it was.

    When only the device changes, the tensors are copied back into their original host
    storage instead of fresh allocations: faulting in new host pages for every layer cost
    0.45 s per 13B layer, the copy 0.04 s.
    """
    p = next(module.parameters())
    home_device, home_dtype = p.device, p.dtype
    same_dtype = dtype is None or dtype == home_dtype
    if not (same_dtype and home_device.type == "cpu" and torch.device(device).type != "cpu"):
        module.to(device=device, dtype=dtype or home_dtype)
        try:
            yield module
        finally:
            module.to(device=home_device, dtype=home_dtype)
        return
    homes = [(t, t.data) for t in itertools.chain(module.parameters(), module.buffers())]
    for t, host in homes:
        t.data = host.to(device)
    try:
        yield module
    finally:
        for t, host in homes:
            host.copy_(t.data)
            t.data = host


class LayerSource(Protocol):
    """Gives decoder layer ``i`` its weights only while a caller needs them (``misq.streaming``).

    A model that holds all its weights in memory needs no source: callers take ``None``.
    """

    def load(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...


@contextmanager
def layer_weights(source: LayerSource | None, i: int) -> Iterator[None]:
    """Decoder layer ``i`` has real weights inside the block; a no-op without a source."""
    if source is None:
        yield
        return
    source.load(i)
    try:
        yield
    finally:
        source.release(i)


def layer_index(name: str) -> int | None:
    """3 for ``model.layers.3.mlp.up_proj``; None for a name outside the decoder layers."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def compute_dtype_for(model: nn.Module, device: torch.device | str) -> torch.dtype:
    """The dtype layers run in: the model's own on an accelerator; float32 on the CPU, where
    half-precision kernels are slow or missing (the numbers differ from fp16 only in rounding)."""
    dtype = next(model.parameters()).dtype
    return torch.float32 if str(device).startswith("cpu") else dtype
