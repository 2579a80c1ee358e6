"""How a configuration field is declared and how its command-line text is parsed.

:func:`option` declares a dataclass field that :mod:`misq.cli` turns into a flag; the parsers
turn the text of ``--bits``, ``--sparsity``, ``--tasks`` and ``--datasets`` into values, with
one clear line for bad input. Split from :mod:`misq.config` so that module holds the configs
themselves. No torch at import time.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import MISSING, field
from typing import Any

from misq.errors import MisqError


def option(
    default: Any = MISSING,
    help: str = "",  # the argparse word; misq.cli reads it
    *,
    choices: tuple[Any, ...] | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    values: Mapping[str, Any] | None = None,
    switch: Mapping[str, tuple[Any, str]] | None = None,
    commands: tuple[str, ...] | None = None,
    given: bool = False,
) -> Any:
    """A dataclass field that the command line exposes; :mod:`misq.cli` reads the metadata.

    ``help``: the flag's help; "(default: X)" is appended from ``default`` (a None default is
    described by the help itself). ``choices``: the allowed values. ``flag``: the dashed name
    (default: the field name with ``-``; the ``_`` spelling is always an alias). ``aliases``:
    more spellings. ``values``: CLI word -> field value (``--c4-cut none`` -> False).
    ``switch``: flag -> (value, help), a group of exclusive flags instead of one option
    (``--stream``/``--no-stream``). ``commands``: only these subcommands get the flag.
    ``given``: the parser's default is None so the CLI can tell a flag given from one left at
    its default (needed where another flag implies this one); the field's default still applies.
    A field without a default becomes a positional argument.
    """
    meta: dict[str, Any] = {"help": help}
    for key, value in (("choices", choices), ("flag", flag), ("values", values), ("switch", switch),
                       ("commands", commands)):
        if value is not None:
            meta[key] = value
    if aliases:
        meta["aliases"] = aliases
    if given:
        meta["given"] = True
    return field(default=default, metadata=meta)


def sparsity_pattern(sparsity: float, prunen: int = 0, prunem: int = 0) -> str:
    """The one name of a run's sparsity pattern: ``"N:M"``, ``"unstructured"`` or ``"dense"`` (no pruning).

    Results files, checkpoints, size accounting and reports all label a run with this.
    """
    if prunen and prunem:
        return f"{prunen}:{prunem}"
    return "unstructured" if sparsity > 0 else "dense"


class SparsityArg(float):
    """``--sparsity`` as typed on the command line: a fraction, or the word ``auto``.

    The CLI builds each flag's type from the field's annotation, so this class is that type:
    calling it parses (``SparsityArg("0.5") -> 0.5``, ``SparsityArg("auto") -> "auto"``) and
    anything else is refused in one line. The field itself holds a plain float once the config
    is built (``auto`` becomes ``sparsity_allocation="auto"``, see :class:`CompressConfig`).
    """

    def __new__(cls, text: Any) -> Any:  # type: ignore[misc]
        if isinstance(text, str) and text.strip().lower() == "auto":
            return "auto"
        try:
            return float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"--sparsity {text!r} is neither a fraction in [0, 1) nor auto: "
                                             "use e.g. --sparsity 0.5, or --sparsity auto") from None


def parse_bits(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"2,3,4,6,8"`` into a sorted tuple of distinct widths in 2..16."""
    if isinstance(text, (list, tuple)):
        items = [str(x) for x in text]
    else:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise MisqError("--bits is empty: give a comma-separated list of widths, e.g. --bits 2,3,4,6,8")
    try:
        bits = sorted({int(t) for t in items})
    except ValueError:
        raise MisqError(f"--bits {text!r} is malformed: give whole numbers separated by commas, e.g. 2,3,4,6,8") from None
    bad = [b for b in bits if not 2 <= b <= 16]
    if bad:
        raise MisqError(f"--bits has width(s) {bad} outside 2..16: use widths between 2 and 16 (16 = keep fp16)")
    return tuple(bits)


# Named sets of lm-eval tasks (--tasks paper): the zero-shot set the SparseGPT/Wanda-era papers report.
TASK_PRESETS = {"paper": ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")}


def parse_tasks(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Parse ``"piqa,arc_easy"`` (presets such as ``paper`` expanded, duplicates dropped); none -> ()."""
    if text is None:
        return ()
    items = list(text) if isinstance(text, (list, tuple)) else [t.strip() for t in str(text).split(",") if t.strip()]
    out: list[str] = []
    for item in items:
        if item == "none":
            continue
        for task in TASK_PRESETS.get(item, (item,)):
            if task not in out:
                out.append(task)
    return tuple(out)


def parse_datasets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``"wikitext2,ptb,c4"``; a path to a text file is accepted as a custom dataset."""
    items = list(text) if isinstance(text, (list, tuple)) else [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise MisqError("no dataset given: use e.g. --datasets wikitext2,ptb,c4")
    from misq.protocol.sources import check_dataset_name  # local import: sources imports config

    for name in items:
        check_dataset_name(name)
    return tuple(items)
