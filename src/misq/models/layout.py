"""The shape of a LLaMA-family decoder in transformers, and nothing else.

``model.model.layers`` holds decoder layers with ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` (Llama 1/2/3, Vicuna, Mistral, Qwen2/3, Gemma). Every module that
needs a layer's name, its linears or the true-sequential order asks here.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from misq.errors import MisqError

log = logging.getLogger(__name__)

LAYER_PREFIX = "model.layers."  # where decoder layers sit in a LLaMA-family state dict


def layer_prefix(i: int) -> str:
    """``model.layers.3.`` for decoder layer 3: the prefix of its tensors in a state dict."""
    return f"{LAYER_PREFIX}{i}."


def linear_name(i: int, name: str) -> str:
    """Full name of linear ``name`` (``mlp.up_proj``) of decoder layer ``i``."""
    return f"{LAYER_PREFIX}{i}.{name}"


# True-sequential order: each step's layers share one input, so they share one Hessian.
SEQUENTIAL_STEPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(n for step in SEQUENTIAL_STEPS for n in step)


KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def check_architecture(hf_config: Any) -> None:
    """Refuse models whose decoder layers misq does not know, before loading any weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(hf_config, "architectures", None) or []
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, (list, tuple)) else []  # a damaged config
    model_type = getattr(hf_config, "model_type", None)
    model_type = model_type if isinstance(model_type, str) and model_type else "?"
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


def layer_index(name: str) -> int | None:
    """3 for ``model.layers.3.mlp.up_proj``; None for a name outside the decoder layers."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


