"""Where the protocol's text comes from, and its rows as the Hugging Face builders make them.

A split's text is a file found by its standard name in a data directory (``--data-dir`` or
``$MISQ_DATA_DIR``), else a Hugging Face ``datasets`` source (optional; needs network or a warm
HF cache); a user's own text file is one row. :mod:`misq.protocol.data` joins, tokenizes and
caches these rows (docs/protocol.md).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from misq.config import DATASETS
from misq.errors import MisqError

logger = logging.getLogger(__name__)

EVAL_SPLIT = {"wikitext2": "test", "ptb": "test", "c4": "validation"}
EVAL_JOIN = {"wikitext2": "\n\n", "ptb": " ", "c4": " "}  # the reference code's joins
TRAIN_JOIN = " "  # wikitext2/ptb calibration stream
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_SEGMENTS = 256  # c4 eval text is cut to 256 x seqlen tokens

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
class Source:
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
        src = locate(name, split or EVAL_SPLIT[name], root)
        if src.path is None:
            looked, dirs = src.searched
            raise MisqError(f"the data directory {root} has no {name} {src.split} text: looked for {', '.join(looked)} "
                            f"in {', '.join(dirs)}; put the file there, or drop --data-dir (unset MISQ_DATA_DIR) "
                            "to fetch it with Hugging Face datasets")


def locate(name: str, split: str, data_dir: str | os.PathLike | None) -> Source:
    """Find the file for ``name``/``split``; without one, describe the Hugging Face source."""
    if name not in DATASETS:
        check_dataset_name(name)
        return Source("file", "file", path=Path(name).expanduser())
    root = resolve_data_dir(data_dir)
    dirs = [root / name, root] if root is not None else []
    for patterns in (_FILES[(name, split)], _FALLBACK_FILES.get((name, split), [])):
        for d in dirs:
            for pattern in patterns:
                hits = sorted(p for p in d.glob(pattern) if p.is_file())
                if hits:
                    return Source(name, split, path=hits[0], note=_note(name, split, hits[0]))
    looked = tuple(_FILES[(name, split)] + _FALLBACK_FILES.get((name, split), []))
    return Source(name, split, hub=_hub_kwargs(name, split), searched=(looked, tuple(map(str, dirs))))


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


def _read_file_rows(src: Source, limit: int | None) -> list[str]:
    assert src.path is not None
    try:
        return _parse_rows(src, limit)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise MisqError(f"cannot read {src.path} ({type(err).__name__}): give a UTF-8 text file "
                        "(gzip-compressed only when its name ends in .gz)") from None


def _parse_rows(src: Source, limit: int | None) -> list[str]:
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


def _read_hub_rows(src: Source, limit: int | None) -> list[str]:
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


def read_rows(src: Source, limit: int | None) -> list[str]:
    """The rows of ``src`` (its file's, else the Hugging Face dataset's), at most ``limit``."""
    return _read_file_rows(src, limit) if src.path is not None else _read_hub_rows(src, limit)


def load_rows(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None,
              limit: int | None = None) -> list[str]:
    """The rows of a split as the HF dataset has them (c4: documents); a user file is one row.

    ``split`` defaults to the evaluation split. ``limit`` keeps only the first rows.
    """
    src = locate(name, split or EVAL_SPLIT.get(name, "file"), data_dir)
    rows = read_rows(src, limit)
    return rows[:limit] if limit is not None else rows


# ----------------------------------------------------------------------------- provenance


def describe_source(name: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> dict[str, Any]:
    """Where the text of ``name`` comes from, for results files. ``split`` defaults to evaluation's."""
    src = locate(name, split or EVAL_SPLIT.get(name, "file"), data_dir)
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
