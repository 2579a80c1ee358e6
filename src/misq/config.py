"""Typed configuration. The CLI is a thin layer that fills these and calls the library.

Every config validates itself in ``__post_init__`` and raises :class:`MisqError` with one line
that says what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from misq.dtypes import DTYPE_NAMES
from misq.errors import MisqError

DATASETS = ("wikitext2", "ptb", "c4")
DEFAULT_BITS = (2, 3, 4, 6, 8)
GROUPINGS = ("mi", "hessian", "uniform")
BUDGETS = ("layer", "model")
STREAM_MODES = ("auto", "on", "off")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def sparsity_pattern(sparsity: float, prunen: int = 0, prunem: int = 0) -> str:
    """The one name of a run's sparsity pattern: ``"N:M"``, ``"unstructured"`` or ``"dense"`` (no pruning).

    Results files, checkpoints, size accounting and reports all label a run with this.
    """
    if prunen and prunem:
        return f"{prunen}:{prunem}"
    return "unstructured" if sparsity > 0 else "dense"


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


def parse_datasets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``"wikitext2,ptb,c4"``; a path to a text file is accepted as a custom dataset."""
    items = list(text) if isinstance(text, (list, tuple)) else [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise MisqError("no dataset given: use e.g. --datasets wikitext2,ptb,c4")
    from misq.protocol.data import (
        check_dataset_name,  # local import: data imports config
    )

    for name in items:
        check_dataset_name(name)
    return tuple(items)


@dataclass
class ModelConfig:
    """Which checkpoint to load and where to run it."""

    model: str
    dtype: str = "float16"
    device: str | None = None  # None: cuda if available, else cpu
    trust_remote_code: bool = False
    layerwise: bool | None = None  # None: layer by layer only when the model does not fit
    # Read decoder layers from the safetensors files one at a time instead of loading the model:
    # on | off | auto (when the weights exceed half the available host memory; misq.models.streaming).
    stream: str = "auto"
    device_map: str | None = None  # eval only: transformers' device_map ("auto": spread over the GPUs)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise MisqError(f"--dtype {self.dtype!r} is not supported: use one of {', '.join(DTYPE_NAMES)}")
        if self.stream not in STREAM_MODES:
            raise MisqError(f"stream mode {self.stream!r} is unknown: use one of {', '.join(STREAM_MODES)}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise MisqError(f"--device-map {self.device_map!r} is unknown: use one of {', '.join(DEVICE_MAPS)}")
        if self.stream == "on" and self.layerwise is False:
            raise MisqError("--stream runs one decoder layer at a time: drop --layerwise 0 or --stream")
        if self.stream == "on" and self.device_map is not None:
            raise MisqError("--stream and --device-map exclude each other: stream on one GPU, or spread the model over several")

    def resolved_device(self) -> str:
        import torch

        if self.device:
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise MisqError(f"--device {self.device} asked for CUDA but no GPU is visible: use --device cpu")
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class DataConfig:
    """Where text comes from and how it is cut (docs/protocol.md)."""

    data_dir: str | None = None  # else $MISQ_DATA_DIR, else Hugging Face datasets
    seqlen: int | None = None  # None: min(2048, model max positions)
    cache_dir: str | None = None  # tokenized-text cache; None: $MISQ_CACHE_DIR or ~/.cache/misq
    c4_cut: bool = True  # docs/protocol.md: c4 eval cut to 256 x seqlen tokens; False keeps all 1100 documents

    def __post_init__(self) -> None:
        if self.seqlen is not None and self.seqlen < 2:
            raise MisqError(f"--seqlen {self.seqlen} is too small: use a window of at least 2 tokens, such as 2048")


@dataclass
class CompressConfig:
    """Everything that decides the compressed weights. Two equal configs give equal weights."""

    dataset: str = "c4"  # calibration source: c4, wikitext2, ptb or a text file
    nsamples: int = 128
    seed: int = 0
    sparsity: float = 0.5  # unstructured; ignored when prunen/prunem set
    prunen: int = 0
    prunem: int = 0
    grouping: str = "hessian"  # mi | hessian | uniform (hessian: as good as mi on llama-9m, see BENCHMARKS.md)
    wbits: int = 4  # uniform width (grouping == "uniform")
    n_groups: int = 10
    target_avg_bits: float = 4.0
    bits: tuple[int, ...] = DEFAULT_BITS
    budget: str = "layer"  # layer | model
    blocksize: int = 128
    percdamp: float = 0.01
    mse: bool = False  # grid search for the clipping range instead of plain min-max
    mi_estimator: str = "gaussian"  # gaussian | binned
    offload_activations: bool = False
    # Calibration windows per forward pass. 1 is the reference's own scheme: same rounding, so
    # parity with the public SparseGPT/GPTQ figures holds (BENCHMARKS.md); 8 is 7% faster on 13B.
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        if self.nsamples < 1:
            raise MisqError(f"--nsamples {self.nsamples} must be at least 1 (the protocol uses 128)")
        if not 0.0 <= self.sparsity < 1.0:
            raise MisqError(f"--sparsity {self.sparsity} is outside [0, 1): use e.g. 0.5 for 50% (or 0 for none)")
        if self.prunen or self.prunem:
            if self.prunen < 1 or self.prunem < 2 or self.prunen >= self.prunem:
                raise MisqError(
                    f"N:M pattern {self.prunen}:{self.prunem} is invalid: N must be at least 1 and smaller than M, e.g. --prunen 2 --prunem 4"
                )
        if self.grouping not in GROUPINGS:
            raise MisqError(f"--grouping {self.grouping!r} is unknown: use one of {', '.join(GROUPINGS)}")
        if self.budget not in BUDGETS:
            raise MisqError(f"--budget {self.budget!r} is unknown: use layer or model")
        if not 2 <= self.wbits <= 16:
            raise MisqError(f"--wbits {self.wbits} is outside 2..16: use e.g. --wbits 4 (16 keeps fp16)")
        if self.grouping != "uniform":
            if self.n_groups < 1:
                raise MisqError(f"--n_groups {self.n_groups} must be at least 1")
            lo, hi = min(self.bits), max(self.bits)
            if not (lo <= self.target_avg_bits <= hi) or math.isnan(self.target_avg_bits):
                raise MisqError(
                    f"--target_avg_bits {self.target_avg_bits} is outside the widths in --bits ({lo}..{hi}): "
                    f"choose a target between {lo} and {hi}, or widen --bits"
                )
        if self.blocksize < 1:
            raise MisqError(f"--blocksize {self.blocksize} must be positive (128 is standard)")
        if self.prunem and self.blocksize % self.prunem:
            raise MisqError(f"--blocksize {self.blocksize} must be a multiple of --prunem {self.prunem}")
        if not 0.0 < self.percdamp < 1.0:
            raise MisqError(f"--percdamp {self.percdamp} must be in (0, 1); 0.01 is standard")
        if self.mi_estimator not in ("gaussian", "binned"):
            raise MisqError(f"--mi-estimator {self.mi_estimator!r} is unknown: use gaussian or binned")
        if self.batch_size < 1:
            raise MisqError(f"--batch-size {self.batch_size} must be at least 1")

    @property
    def structured(self) -> bool:
        return bool(self.prunen and self.prunem)

    @property
    def pattern(self) -> str:
        """``"N:M"``, ``"unstructured"`` or ``"dense"``: see :func:`sparsity_pattern`."""
        return sparsity_pattern(self.sparsity, self.prunen, self.prunem)

    @property
    def mixed_precision(self) -> bool:
        return self.grouping != "uniform"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bits"] = list(self.bits)
        return d


@dataclass
class EvalConfig:
    datasets: tuple[str, ...] = DATASETS
    batch_size: int = 1  # segments per forward pass

    def __post_init__(self) -> None:
        self.datasets = parse_datasets(self.datasets)


def resolved(*configs: Any) -> dict[str, Any]:
    """A JSON-ready dict of several configs, keyed by their role."""
    out: dict[str, Any] = {}
    for cfg in configs:
        key = type(cfg).__name__.replace("Config", "").lower()
        out[key] = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    return out


__all__ = [
    "CompressConfig",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "DATASETS",
    "DEFAULT_BITS",
    "parse_bits",
    "parse_datasets",
    "resolved",
    "field",
]
