"""Greedy generations for a few prompts, recorded in the results file so a report can show what
the baseline and each compressed model answer without a GPU.

Each prompt is rendered with the tokenizer's chat template when it has one (a chat model such as
Vicuna answers a question; a base model continues the text), decoded greedily and cut at
``max_new_tokens``. The ``generations`` section of a results file::

    {"max_new_tokens": 48, "greedy": true, "seconds": 3.1,
     "prompts": [{"prompt": "...", "chat_template": false, "output": "...", "new_tokens": 48,
                  "stopped": "length"}, ...]}

A model that runs layer by layer (it does not fit on the device, or it is streamed from disk)
is not generated from: the section then says why (``"skipped": "..."``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from misq.errors import MisqError

log = logging.getLogger(__name__)

# Short and varied: a fact, an instruction, a continuation, a little arithmetic. Cheap: 4 x 48 tokens.
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a short poem about the sea.",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
)
PROMPT_CHOICES = ("default", "none")


def read_prompts(spec: str | None) -> tuple[str, ...]:
    """The prompts ``--prompts`` names: ``default`` (the built-in set), ``none`` (no generations),
    or a file: a JSON list of strings, else one prompt per non-empty line."""
    if spec in (None, "", "none"):
        return ()
    if spec == "default":
        return DEFAULT_PROMPTS
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MisqError(f"--prompts {spec}: no such file; give default, none, or a file with one prompt per line "
                        "(or a JSON list of strings)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MisqError(f"--prompts {spec}: cannot read it ({err}): give a UTF-8 text file") from None
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as err:
            raise MisqError(f"--prompts {spec}: damaged JSON ({err}): give a JSON list of strings") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise MisqError(f"--prompts {spec}: a JSON prompts file must hold a list of strings")
        prompts = [p for p in prompts if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MisqError(f"--prompts {spec}: the file holds no prompt; give one prompt per line, or --prompts none")
    return tuple(prompts)


def whole_model_blocker(model: Any, device: str, *, layerwise: bool | None, source: Any) -> str | None:
    """Why ``model`` cannot run whole on ``device`` (generation and lm-eval need that), or None."""
    from misq.protocol import perplexity

    if perplexity.is_dispatched(model):
        return None
    if source is not None:
        return "the model is streamed from disk one decoder layer at a time (--stream)"
    if layerwise or (layerwise is None and not perplexity.fits_on_device(model, device)):
        return f"the model runs one decoder layer at a time ({'--layerwise 1' if layerwise else 'it does not fit on ' + str(device)})"
    return None


@contextlib.contextmanager
def whole_model(model: Any, device: str) -> Iterator[str]:
    """``model`` placed to run whole (on ``device``, or where ``device_map`` put it); yields the
    device its inputs go to. Restores the model's place and dtype afterwards."""
    from misq.models import execution
    from misq.protocol import perplexity

    if perplexity.is_dispatched(model):
        yield str(model.get_input_embeddings().weight.device)
        return
    with execution.on_device(model, device, execution.compute_dtype_for(model, device)):
        yield str(device)


def _render(tokenizer: Any, prompt: str) -> tuple[Any, bool]:
    """Token ids [1, n] of ``prompt`` (through the chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"], True
    return tokenizer(prompt, return_tensors="pt")["input_ids"], False


def generate(model: Any, tokenizer: Any, prompts: tuple[str, ...], device: str, *,
             max_new_tokens: int = 48) -> dict[str, Any]:
    """Greedy generations of ``model`` (already placed by :func:`whole_model`, inputs on ``device``)."""
    import torch

    t0 = time.perf_counter()
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    records = []
    for prompt in prompts:
        ids, chat = _render(tokenizer, prompt)
        ids = ids.to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=pad if pad is not None else eos)
        new = out[0, ids.shape[1]:].tolist()
        stopped = "eos" if eos is not None and new and new[-1] == eos else "length"
        records.append({"prompt": prompt, "chat_template": chat,
                        "output": tokenizer.decode(new, skip_special_tokens=True).strip(),
                        "new_tokens": len(new), "stopped": stopped})
    seconds = time.perf_counter() - t0
    log.info("generated %d greedy answer(s) of at most %d tokens (%.1fs)", len(records), max_new_tokens, seconds)
    return {"max_new_tokens": max_new_tokens, "greedy": True, "seconds": seconds, "prompts": records}


def skipped(reason: str, max_new_tokens: int) -> dict[str, Any]:
    """The ``generations`` section of a run that could not generate."""
    log.info("no generations recorded: %s", reason)
    return {"max_new_tokens": max_new_tokens, "greedy": True, "skipped": reason, "prompts": []}


__all__ = ["DEFAULT_PROMPTS", "PROMPT_CHOICES", "generate", "read_prompts", "skipped", "whole_model", "whole_model_blocker"]
