"""Evaluation and calibration text, tokenized exactly as GPTQ/SparseGPT do (docs/protocol.md).

Text comes from standard file names in a data directory (``--data-dir`` or ``$MISQ_DATA_DIR``),
else from Hugging Face ``datasets`` (optional; needs network or a warm HF cache): where and how
is :mod:`misq.protocol.sources` (callers import its names from there). The rows of a split are
joined as the reference code joins them and tokenized once. Token ids are cached on disk as
``.npy`` (no pickle), keyed by everything that changes them, so a second run does not tokenize
again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from misq.atomic import atomic_write_bytes
from misq.config import DATASETS
from misq.errors import MisqError
from misq.protocol.sources import (
    C4_EVAL_DOCUMENTS,
    C4_EVAL_SEGMENTS,
    EVAL_JOIN,
    EVAL_SPLIT,
    TRAIN_JOIN,
    Source,
    locate,
    read_rows,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached content would change for the same key



# ----------------------------------------------------------------------------- tokens


def encode(tokenizer: Any, text: str) -> torch.LongTensor:
    """Token ids ``[N]`` of ``text``, special-token strings such as ``<unk>`` read as plain text.

    Same call as the reference code (special tokens added as the tokenizer does by default, so
    a LLaMA tokenizer puts one BOS at the start) plus ``split_special_tokens=True``: PTB's
    literal ``<unk>`` must not become the unknown token (docs/protocol.md).
    """
    # verbose=False: a whole test split is meant to be longer than model_max_length (it is cut
    # into windows afterwards), so transformers' "sequence length is longer" warning is noise.
    ids = tokenizer(text, split_special_tokens=True, verbose=False)["input_ids"]
    _check_specials_split(tokenizer, text)
    return torch.tensor(ids, dtype=torch.long)


def _check_specials_split(tokenizer: Any, text: str) -> None:
    """Refuse a tokenizer that ignores ``split_special_tokens`` on text that needs it."""
    for tok in getattr(tokenizer, "all_special_tokens", []):
        if tok and tok in text:
            probe = tokenizer(tok, split_special_tokens=True, add_special_tokens=False)["input_ids"]
            if list(probe) == [tokenizer.convert_tokens_to_ids(tok)]:
                raise MisqError(
                    f"{type(tokenizer).__name__} turns the literal text {tok!r} into a special token even with "
                    "split_special_tokens=True, which inflates perplexity: load the fast tokenizer (use_fast=True)"
                )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer could map the same text to other ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif getattr(tokenizer, "sp_model", None) is not None:
        h.update(tokenizer.sp_model.serialized_model_proto())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # Settings held by the Python class rather than the backend (BOS/EOS, legacy spacing).
    for attr in ("add_bos_token", "add_eos_token", "legacy", "bos_token", "eos_token", "unk_token"):
        h.update(f"|{attr}={getattr(tokenizer, attr, None)!r}".encode())
    return h.hexdigest()


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    chosen = cache_dir or os.environ.get("MISQ_CACHE_DIR")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "misq" / "tokens"


def _cached(label: str, key: dict[str, Any], cache_dir: str | os.PathLike | None,
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once per key; later calls load ``<cache>/<label>-<hash>.npy`` instead."""
    digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:24]
    path = _cache_root(cache_dir) / f"{label}-{digest}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            logger.debug("token cache hit %s", path)
            return torch.from_numpy(arr.astype(np.int64))
        except (OSError, ValueError) as err:  # a damaged cache is only a lost shortcut
            logger.warning("ignoring unreadable token cache %s (%s)", path, err)
    ids = compute()
    buf = io.BytesIO()
    small = ids.numel() == 0 or int(ids.max()) < 2**31  # int32 halves the file for any real vocabulary
    np.save(buf, ids.numpy().astype(np.int32 if small else np.int64), allow_pickle=False)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as err:
        logger.warning("could not write token cache %s (%s); continuing without it", path, err)
    return ids


def eval_tokens(name: str, tokenizer: Any, seqlen: int, data_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, c4_cut: bool = True) -> torch.LongTensor:
    """The evaluation text tokenized once, ``[1, N]``; the caller cuts it into N // seqlen segments.

    wikitext2: test rows joined by "\\n\\n"; ptb: test sentences joined by " "; c4: the first 1100
    validation documents joined by " ", cut to 256 x seqlen tokens (``c4_cut=False`` keeps all of
    them: the public reference figures were measured that way, docs/protocol.md); a user file: its whole text.
    """
    src = locate(name, EVAL_SPLIT.get(name, "file"), data_dir)
    is_c4 = src.dataset == "c4"
    cut = is_c4 and c4_cut

    def compute() -> torch.Tensor:
        limit = C4_EVAL_DOCUMENTS if is_c4 else None
        rows = read_rows(src, limit)
        logger.info("tokenizing %s %s (%d rows)", src.dataset, src.split, len(rows))
        ids = encode(tokenizer, EVAL_JOIN.get(src.dataset, "").join(rows))
        return ids[: C4_EVAL_SEGMENTS * seqlen] if cut else ids

    key = {"kind": "eval", "tokenizer": tokenizer_fingerprint(tokenizer), "dataset": src.dataset,
           "split": src.split, "source": src.identity(), "seqlen": seqlen if cut else None}
    return _cached(f"{src.dataset}-{src.split}", key, cache_dir, compute).unsqueeze(0)


def calibration_windows(name: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir: str | os.PathLike | None = None,
                        cache_dir: str | os.PathLike | None = None) -> torch.LongTensor:
    """``[nsamples, seqlen]`` token windows drawn as GPTQ's get_c4 / get_wikitext2 draw them.

    ``random.Random(seed)`` yields the same numbers as the reference's ``random.seed(seed)``
    without touching global state; the calls are made in the reference's order, so the
    windows match the reference's for the same text and tokenizer.
    """
    src = locate(name, "train" if name in DATASETS else "file", data_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if src.dataset == "c4":
        key = {"kind": "calib", "tokenizer": tok_fp, "dataset": "c4", "source": src.identity(),
               "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        return _cached("c4-calib", key, cache_dir, lambda: _c4_windows(src, tokenizer, nsamples, seqlen, seed))

    def compute() -> torch.Tensor:
        rows = read_rows(src, None)
        logger.info("tokenizing %s %s (%d rows) as one stream", src.dataset, src.split, len(rows))
        return encode(tokenizer, TRAIN_JOIN.join(rows))

    key = {"kind": "stream", "tokenizer": tok_fp, "dataset": src.dataset, "split": src.split, "source": src.identity()}
    stream = _cached(f"{src.dataset}-{src.split}", key, cache_dir, compute)
    if len(stream) < seqlen + 2:  # randint(0, N - seqlen - 1) needs N - seqlen - 1 >= 0
        raise MisqError(f"{name} text ({len(stream)} tokens) is too short for one window of {seqlen} tokens: "
                        "use a smaller --seqlen or more text")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _c4_windows(src: Source, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's get_c4 loop: a random document longer than seqlen, then a random window in it."""
    docs = read_rows(src, None)
    # A token holds at least one UTF-8 byte (bar a few added specials), so a document this
    # short can never qualify; if none can, say so now rather than draw forever.
    if not any(len(d.encode("utf-8")) + 8 > seqlen for d in docs):
        raise MisqError(f"c4 train text: every document is too short for one window of {seqlen} tokens: "
                        "use a smaller --seqlen or more text")
    encoded: dict[int, torch.Tensor] = {}  # the same document drawn twice is tokenized once
    too_short: set[int] = set()
    rng = random.Random(seed)
    windows, chosen = [], set()
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i in too_short:
                continue
            ids = encoded.get(i)
            if ids is None:
                ids = encode(tokenizer, docs[i])
            if len(ids) > seqlen:
                encoded[i] = ids
                break
            too_short.add(i)
            if len(too_short) == len(docs):
                raise MisqError(f"c4 train text: every document is too short for one window of {seqlen} tokens: "
                                "use a smaller --seqlen or more text")
        s = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[s : s + seqlen])
        chosen.add(i)
    logger.info("c4 calibration: %d windows from %d distinct documents (%d tokenized)",
                nsamples, len(chosen), len(encoded) + len(too_short))
    return torch.stack(windows)

