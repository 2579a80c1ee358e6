"""``misq generate``: stream a model's continuation of a prompt (packed runtime or dense).

On CUDA the KV cache is transformers' static cache (``cache_implementation="static"``), whose
fixed shapes let transformers compile the decode step (torch.compile, CUDA graphs); on the CPU the
ordinary dynamic cache is used. Greedy unless ``temperature`` > 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from misq.config import GenerateConfig
from misq.errors import MisqError

log = logging.getLogger(__name__)


def load_model(path: str, runtime: str, device: str, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a packed checkpoint (with ``runtime``) or any HF causal LM.
    ``dtype``: None loads a packed checkpoint in its saved dtype and any other model in float16."""
    from transformers import AutoTokenizer

    from misq.checkpoint.packed import is_packed_checkpoint, load_packed
    from misq.runtime.load import load_packed_runtime

    if is_packed_checkpoint(path):
        loader = load_packed_runtime if runtime == "packed" else load_packed
        model = loader(path, dtype=dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM

        if runtime == "packed":
            log.info("%s is not a misq packed checkpoint: running it dense", path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype or "float16")).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise MisqError(f"{path} has no usable tokenizer ({err}): give a folder with tokenizer files") from None
    return model, tokenizer


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """input_ids [1, T]: the prompt, in the chat template when asked for and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return torch.as_tensor(ids).reshape(1, -1)
    if chat:
        log.warning("the tokenizer has no chat template: using the prompt as it is")
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate(model: nn.Module, tokenizer: Any, cfg: GenerateConfig, *, stream: bool = True) -> str:
    """The continuation of ``cfg.prompt`` (new tokens only), streamed to stdout as it comes."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, cfg.prompt, cfg.chat).to(device)
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.temperature > 0,
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id}
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    else:  # greedy: silence the sampling settings a model's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if device.type == "cuda":
        kwargs["cache_implementation"] = "static"  # fixed shapes: transformers compiles the decode step
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int = 48) -> str:
    """Two (title, text) columns of ``width`` characters, wrapped."""
    import textwrap

    cols = [[t[:width], "-" * min(width, len(t))] + textwrap.wrap(s, width) for t, s in (left, right)]
    n = max(len(c) for c in cols)
    return "\n".join(f"{(cols[0][i] if i < len(cols[0]) else ''):<{width}} | "
                     f"{cols[1][i] if i < len(cols[1]) else ''}" for i in range(n))


def run_generate(model_path: str, cfg: GenerateConfig, *, device: str | None = None, dtype: str | None = None) -> dict[str, str]:
    """``misq generate``: stream each model's continuation; with a baseline, print both side by
    side at the end. Returns {model path: text}."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype in (None, "float16"):
        if dtype == "float16":
            log.warning("--dtype float16 on the CPU: generating in float32 (fp16 matmuls there are slow or missing)")
        dtype = "float32"
    texts: list[tuple[str, str]] = []
    for path in [model_path] + ([cfg.baseline] if cfg.baseline else []):
        if not Path(path).exists() and not _looks_like_hub_id(path):
            raise MisqError(f"model {path} does not exist: give a checkpoint folder or a Hugging Face model id")
        model, tokenizer = load_model(path, cfg.runtime, device, dtype)
        if cfg.baseline:
            print(f"=== {path} ===", flush=True)
        texts.append((path, generate(model, tokenizer, cfg)))
        print(flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if cfg.baseline:
        print(side_by_side(texts[0], texts[1]))
    return dict(texts)


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/"))
