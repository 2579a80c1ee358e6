"""Evaluation and calibration text, tokenized exactly as GPTQ/SparseGPT do (docs/protocol.md).

Text comes from standard file names in a data directory (``--data-dir`` or ``$MISQ_DATA_DIR``),
else from Hugging Face ``datasets`` (optional; needs network or a warm HF cache). The rows of a
split are rebuilt with the same semantics as the HF builders, joined as the reference code
joins them, and tokenized once. Token ids are cached on disk as ``.npy`` (no pickle), keyed by
everything that changes them, so a second run does not tokenize again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from misq.atomic import atomic_write_bytes
from misq.config import DATASETS
from misq.errors import MisqError

logger = logging.getLogger(__name__)

EVAL_SPLIT = {"wikitext2": "test", "ptb": "test", "c4": "validation"}
EVAL_JOIN = {"wikitext2": "\n\n", "ptb": " ", "c4": " "}  # the reference code's joins
TRAIN_JOIN = " "  # wikitext2/ptb calibration stream
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_SEGMENTS = 256  # c4 eval text is cut to 256 x seqlen tokens
CACHE_VERSION = 1  # bump when the cached content would change for the same key

_C4_FULL = {"validation": "c4-validation.00000-of-00008.json.gz", "train": "c4-train.00000-of-01024.json.gz"}
_JSON_EXTS = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# File names searched in <data_dir>/<dataset>/ and <data_dir>/, best first; globs allowed.
_FILES: dict[tuple[str, str], list[str]] = {
    ("wikitext2", "test"): ["wiki.test.raw", "wikitext-2-raw/wiki.test.raw"],
    ("wikitext2", "train"): ["wiki.train.raw", "wikitext-2-raw/wiki.train.raw"],
    ("ptb", "test"): ["ptb.test.txt"],
    ("ptb", "train"): ["ptb.train.txt"],
    ("c4", "validation"): [_C4_FULL["validation"]],
    ("c4", "train"): [_C4_FULL["train"]],
}
# Second choices, tried only when no directory holds a first choice.
_FALLBACK_FILES: dict[tuple[str, str], list[str]] = {
    ("wikitext2", "train"): ["tokenized/wiki.train.tokens", "tokenized/wiki.train.tokens.gz"],
    ("c4", "validation"): [f"c4-validation*{ext}" for ext in _JSON_EXTS],
    ("c4", "train"): [f"c4-train*{ext}" for ext in _JSON_EXTS],
}


@dataclass(frozen=True)
class _Source:
    """Where the rows of one split come from: a local file, or a Hugging Face dataset."""

    dataset: str  # "wikitext2" | "ptb" | "c4" | "file"
    split: str
    path: Path | None = None
    hub: dict[str, Any] | None = None  # load_dataset kwargs
    note: str = ""  # how this source departs from the protocol's, if it does
    searched: tuple[tuple[str, ...], tuple[str, ...]] = field(default=((), ()), compare=False)

    def identity(self) -> str:
        """A string that changes whenever the text could (file path, size and mtime)."""
        if self.path is not None:
            st = self.path.stat()
            return f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        return json.dumps(self.hub, sort_keys=True)


# ----------------------------------------------------------------------------- names and dirs


def check_dataset_name(name: str) -> None:
    """Accept ``wikitext2``, ``ptb``, ``c4`` or the path of an existing text file."""
    if name in DATASETS or Path(name).expanduser().is_file():
        return
    raise MisqError(f"unknown dataset {name!r}: use {', '.join(DATASETS)} or the path of a text file")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The argument, else ``$MISQ_DATA_DIR``, else None (meaning: try Hugging Face datasets)."""
    chosen, origin = (data_dir, "--data-dir") if data_dir else (os.environ.get("MISQ_DATA_DIR"), "MISQ_DATA_DIR")
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise MisqError(f"{origin} {str(chosen)!r} is not a directory: "
                        "point it at the folder holding the dataset files")
    return path


def check_local_sources(wanted: list[tuple[str, str | None]], data_dir: str | os.PathLike | None) -> None:
    """With a data directory given, each (name, split) in ``wanted`` (split None: evaluation's)
    must have its file there: refused up front, not a hub download hours into a run."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return
    for name, split in wanted:
        if name not in DATASETS:
            check_dataset_name(name)
            continue
        src = _locate(name, split or EVAL_SPLIT[name], root)
        if src.path is None:
            looked, dirs = src.searched
            raise MisqError(f"the data directory {root} has no {name} {src.split} text: looked for {', '.join(looked)} "
                            f"in {', '.join(dirs)}; put the file there, or drop --data-dir (unset MISQ_DATA_DIR) "
                            "to fetch it with Hugging Face datasets")


def _locate(name: str, split: str, data_dir: str | os.PathLike | None) -> _Source:
    """Find the file for ``name``/``split``; without one, describe the Hugging Face source."""
    if name not in DATASETS:
        check_dataset_name(name)
        return _Source("file", "file", path=Path(name).expanduser())
    root = resolve_data_dir(data_dir)
    dirs = [root / name, root] if root is not None else []
    for patterns in (_FILES[(name, split)], _FALLBACK_FILES.get((name, split), [])):
        for d in dirs:
            for pattern in patterns:
                hits = sorted(p for p in d.glob(pattern) if p.is_file())
                if hits:
                    return _Source(name, split, path=hits[0], note=_note(name, split, hits[0]))
    looked = tuple(_FILES[(name, split)] + _FALLBACK_FILES.get((name, split), []))
    return _Source(name, split, hub=_hub_kwargs(name, split), searched=(looked, tuple(map(str, dirs))))


def _note(name: str, split: str, path: Path) -> str:
    if name == "wikitext2" and path.name.startswith("wiki.train.tokens"):
        logger.warning("wikitext2 train: using the tokenized variant (wikitext-2-v1, with <unk>) at %s, "
                       "not wiki.train.raw; calibration differs slightly from the raw split", path)
        return "tokenized variant wikitext-2-v1, not wikitext-2-raw-v1"
    if name == "c4" and path.name != _C4_FULL[split]:
        logger.info("c4 %s: using the sample %s, not the protocol shard %s", split, path, _C4_FULL[split])
        return f"sample file, not the protocol shard {_C4_FULL[split]}"
    return ""


def _hub_kwargs(name: str, split: str) -> dict[str, Any]:
    if name == "wikitext2":
        return {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": split}
    if name == "ptb":  # datasets >= 4 refuses the script; its parquet conversion loads
        return {"path": "ptb_text_only", "name": "penn_treebank", "revision": "refs/convert/parquet", "split": split}
    return {"path": "allenai/c4", "data_files": {split: f"en/{_C4_FULL[split]}"}, "split": split}


# ----------------------------------------------------------------------------- rows


def _open_text(path: Path) -> io.TextIOBase:
    # newline="": lines exactly as stored (the official files use "\n"), as SOURCES.md prescribes.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_file_rows(src: _Source, limit: int | None) -> list[str]:
    assert src.path is not None
    try:
        return _parse_rows(src, limit)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise MisqError(f"cannot read {src.path} ({type(err).__name__}): give a UTF-8 text file "
                        "(gzip-compressed only when its name ends in .gz)") from None


def _parse_rows(src: _Source, limit: int | None) -> list[str]:
    assert src.path is not None
    with _open_text(src.path) as f:
        if src.dataset == "file":
            return [f.read()]
        if src.dataset == "wikitext2":  # HF wikitext builder: a whitespace-only line becomes ""
            return [line if line.strip() else "" for line in f]
        if src.dataset == "ptb":  # HF ptb_text_only builder: sentence = line.strip()
            return [line.strip() for line in f]
        docs: list[str] = []  # c4: JSON lines with a "text" field; read no more than needed
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise MisqError(f"{src.path} line {lineno} is not a JSON object with a 'text' field: "
                                "c4 files must be JSON lines as in allenai/c4") from None
        return docs


def _read_hub_rows(src: _Source, limit: int | None) -> list[str]:
    assert src.hub is not None
    logger.info("%s %s: no local file, trying Hugging Face datasets %s (needs network or its cache)",
                src.dataset, src.split, src.hub["path"])
    try:
        from datasets import (
            load_dataset,  # optional dependency, imported only when needed
        )

        ds = load_dataset(**src.hub)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return list(ds["sentence" if src.dataset == "ptb" else "text"])
    except Exception as err:  # offline, missing package, moved dataset: all end the same way
        looked, dirs = src.searched
        where = f"in {', '.join(dirs)}" if dirs else "(no data directory given)"
        logger.debug("load_dataset(%s) failed: %r", src.hub, err)
        raise MisqError(
            f"{src.dataset} {src.split} text not found: looked for {', '.join(looked)} {where}, and Hugging Face "
            f"{src.hub['path']} failed ({type(err).__name__}); "
            "pass --data-dir DIR or set MISQ_DATA_DIR to a folder holding them"
        ) from None


def load_rows(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None,
              limit: int | None = None) -> list[str]:
    """The rows of a split as the HF dataset has them (c4: documents); a user file is one row.

    ``split`` defaults to the evaluation split. ``limit`` keeps only the first rows.
    """
    src = _locate(name, split or EVAL_SPLIT.get(name, "file"), data_dir)
    rows = _read_file_rows(src, limit) if src.path is not None else _read_hub_rows(src, limit)
    return rows[:limit] if limit is not None else rows


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
    src = _locate(name, EVAL_SPLIT.get(name, "file"), data_dir)
    is_c4 = src.dataset == "c4"
    cut = is_c4 and c4_cut

    def compute() -> torch.Tensor:
        limit = C4_EVAL_DOCUMENTS if is_c4 else None
        rows = _read_file_rows(src, limit) if src.path is not None else _read_hub_rows(src, limit)
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
    src = _locate(name, "train" if name in DATASETS else "file", data_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if src.dataset == "c4":
        key = {"kind": "calib", "tokenizer": tok_fp, "dataset": "c4", "source": src.identity(),
               "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        return _cached("c4-calib", key, cache_dir, lambda: _c4_windows(src, tokenizer, nsamples, seqlen, seed))

    def compute() -> torch.Tensor:
        rows = _read_file_rows(src, None) if src.path is not None else _read_hub_rows(src, None)
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


def _c4_windows(src: _Source, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's get_c4 loop: a random document longer than seqlen, then a random window in it."""
    docs = _read_file_rows(src, None) if src.path is not None else _read_hub_rows(src, None)
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


# ----------------------------------------------------------------------------- provenance


def describe_source(name: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> dict[str, Any]:
    """Where the text of ``name`` comes from, for results files. ``split`` defaults to evaluation's."""
    src = _locate(name, split or EVAL_SPLIT.get(name, "file"), data_dir)
    out: dict[str, Any] = {"dataset": name if src.dataset != "file" else "file", "split": src.split}
    if src.path is not None:
        st = src.path.stat()
        out.update(file=str(src.path.resolve()), bytes=st.st_size)
    else:
        out["hub"] = {k: v for k, v in src.hub.items() if k != "split"}
    if src.split in ("test", "validation"):
        out["joined_with"] = EVAL_JOIN[src.dataset]
    elif src.dataset in ("wikitext2", "ptb"):  # c4 calibration draws from single documents instead
        out["joined_with"] = TRAIN_JOIN
    if src.dataset == "c4" and src.split == "validation":
        out["documents"] = len(_read_file_rows(src, C4_EVAL_DOCUMENTS)) if src.path else C4_EVAL_DOCUMENTS
        out["cut_to"] = f"{C4_EVAL_SEGMENTS} x seqlen tokens"
    if src.note:
        out["note"] = src.note
    return out


__all__ = [
    "DATASETS",
    "calibration_windows",
    "check_dataset_name",
    "check_local_sources",
    "describe_source",
    "encode",
    "eval_tokens",
    "load_rows",
    "resolve_data_dir",
    "tokenizer_fingerprint",
]
