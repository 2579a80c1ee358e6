"""The results file (``results.json``) of ``misq eval`` and ``misq compress``, as typed records.

One record, :class:`Results`, for both jobs: ``kind`` is ``"baseline"`` (a model evaluated as
it is) or ``"compressed"`` (a compression run, or a packed checkpoint evaluated). The JSON keys
are the ones reports and tests read (:mod:`misq.report.compare`, :mod:`misq.runs.status`); a
section a job does not produce is left out of the file rather than written as null, except
``cuda``, which a compression run always writes (null: it ran without CUDA).

Sections computed elsewhere and only carried here stay plain dicts: ``model``
(:func:`misq.models.layout.model_summary`), ``protocol`` (:func:`misq.protocol.record.protocol_record`),
``eval`` entries (:func:`misq.protocol.perplexity.perplexity`), ``storage``
(:func:`misq.checkpoint.accounting.storage_accounting`), ``bits``
(:func:`misq.compress.bitplan.bit_statistics`), ``layers`` (the driver's per-linear records),
``saved``, ``distributed``, ``zeroshot`` (:func:`misq.protocol.zeroshot.evaluate_tasks`) and
``generations`` (:func:`misq.protocol.generations.generate`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from misq import __version__
from misq.atomic import atomic_write_json
from misq.errors import MisqError

KINDS = ("baseline", "compressed")


def now_utc() -> str:
    """``2026-11-21T17:00:00Z``: the ``created`` stamp of a results file."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Timing:
    """Seconds: ``compress_s`` (compression runs only; a resumed run adds the interrupted run's
    time) and ``eval_s`` by dataset."""

    eval_s: dict[str, float] = field(default_factory=dict)
    compress_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.compress_s is None else {"compress_s": self.compress_s}
        return out | {"eval_s": dict(self.eval_s)}


@dataclass
class Sparsity:
    """Asked-for and achieved fraction of zero weights over all compressed linear layers, and
    the pattern name (:func:`misq.config.sparsity_pattern`)."""

    target: float
    actual: float
    pattern: str

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "actual": self.actual, "pattern": self.pattern}


@dataclass
class Memory:
    """Peak host RSS of the process and peak GPU memory (GiB; None without CUDA), and whether
    the decoder layers were streamed from disk (``--stream``)."""

    peak_rss_gib: float
    peak_gpu_gib: float | None = None
    peak_gpu_reserved_gib: float | None = None
    streamed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"peak_rss_gib": self.peak_rss_gib, "peak_gpu_gib": self.peak_gpu_gib,
                "peak_gpu_reserved_gib": self.peak_gpu_reserved_gib, "streamed": self.streamed}


@dataclass
class Results:
    """One results file. Field order is the key order written."""

    kind: str
    model: dict[str, Any]
    device: str
    protocol: dict[str, Any]
    memory: Memory
    misq_version: str = __version__
    created: str = field(default_factory=now_utc)
    ppl: dict[str, float] = field(default_factory=dict)
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)
    # Compression runs (and, for config, packed checkpoints evaluated):
    cuda: str | None = None
    config: dict[str, Any] | None = None
    sparsity: Sparsity | None = None
    storage: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None
    bits: dict[str, Any] | None = None
    saved: dict[str, Any] | None = None
    distributed: dict[str, Any] | None = None
    # Evaluation of a model that transformers spread over several devices:
    device_map: list[str] | None = None
    # lm-evaluation-harness accuracy (misq.protocol.zeroshot) and greedy generations
    # (misq.protocol.generations), recorded beside the perplexities:
    zeroshot: dict[str, Any] | None = None
    generations: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"results kind must be one of {KINDS}, not {self.kind!r}")

    def add_eval(self, name: str, result: dict[str, Any]) -> None:
        """Record one dataset's :func:`~misq.protocol.perplexity.perplexity` result (with its source)."""
        self.eval[name] = result
        self.ppl[name] = result["ppl"]
        self.timing.eval_s[name] = result["seconds"]

    # -- JSON -------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The dict written to ``results.json`` (and returned by the jobs)."""
        out: dict[str, Any] = {
            "misq_version": self.misq_version, "kind": self.kind, "created": self.created,
            "model": self.model, "device": self.device,
        }
        if self.layers is not None:  # a compression run says which GPU it ran on, null for none
            out["cuda"] = self.cuda
        optional = {"device_map": self.device_map, "protocol": self.protocol, "config": self.config,
                    "ppl": self.ppl, "eval": self.eval, "zeroshot": self.zeroshot, "generations": self.generations,
                    "timing": self.timing.to_json(),
                    "sparsity": self.sparsity.to_json() if self.sparsity is not None else None,
                    "storage": self.storage, "bits": self.bits, "layers": self.layers,
                    "memory": self.memory.to_json(), "saved": self.saved, "distributed": self.distributed}
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (a reader sees the old file or this one); returns the path."""
        atomic_write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def from_json(cls, data: Any, where: str = "results") -> Results:
        """The record of a parsed results file; :class:`MisqError` naming ``where`` if it is not one."""
        if not isinstance(data, dict):
            raise _odd(where, f"a JSON {type(data).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise _odd(where, f"unknown section(s) {', '.join(map(repr, unknown))}")
        missing = [k for k in ("misq_version", "kind", "created", "model", "device", "protocol", "ppl", "eval",
                               "timing", "memory") if k not in data]
        if missing:
            raise _odd(where, f"no {', '.join(map(repr, missing))} section")
        for key, kinds in _TYPES.items():
            value = data.get(key)
            if value is not None and not isinstance(value, kinds):
                raise _odd(where, f"{key!r} is a JSON {type(value).__name__}")
        if data["kind"] not in KINDS:
            raise _odd(where, f"kind {data['kind']!r} is neither 'baseline' nor 'compressed'")
        try:
            timing = Timing(eval_s=dict(data["timing"].get("eval_s") or {}), compress_s=data["timing"].get("compress_s"))
            sparsity = Sparsity(**data["sparsity"]) if data.get("sparsity") is not None else None
            memory = Memory(**data["memory"])
        except TypeError as err:  # a section with missing or extra fields
            raise _odd(where, str(err).replace("__init__() ", "")) from None
        rest = {k: v for k, v in data.items() if k not in ("timing", "sparsity", "memory")}
        return cls(**rest, timing=timing, sparsity=sparsity, memory=memory)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Results:
        """Read a results file; a damaged or foreign file is a one-line :class:`MisqError`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise MisqError(f"cannot read the results file {path} ({err.strerror or err})") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise _odd(str(path), f"damaged JSON: {str(err).splitlines()[0]}") from None
        return cls.from_json(data, str(path))


# The JSON type each section must have when present (bool is an int: "streamed" is checked by Memory).
_TYPES: dict[str, type | tuple[type, ...]] = {
    "misq_version": str, "kind": str, "created": str, "model": dict, "device": str, "cuda": str,
    "protocol": dict, "config": dict, "ppl": dict, "eval": dict, "timing": dict, "sparsity": dict,
    "storage": dict, "bits": dict, "layers": list, "memory": dict, "saved": dict, "distributed": dict,
    "device_map": list, "zeroshot": dict, "generations": dict,
}


def _odd(where: str, why: str) -> MisqError:
    return MisqError(f"{where} is not a misq results file ({why}): pass a results.json written by misq compress or misq eval")
