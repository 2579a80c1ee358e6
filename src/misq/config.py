"""Typed configuration. The CLI is a thin layer that fills these and calls the library.

Every config validates itself in ``__post_init__`` and raises :class:`MisqError` with one line
that says what is wrong and how to fix it.

Each field the command line exposes is declared with :func:`option`: its default, help text and
choices live here once, and :mod:`misq.cli` builds its flags from them, so ``--help``, the
defaults and the validation cannot drift apart. This module must not import torch at import
time (the CLI's ``--help`` stays fast); torch is imported where a device is resolved.

:class:`CompressConfig` and its choices live in :mod:`misq.config_compress`, the field
declaration and the text parsers in :mod:`misq.config_fields`; both are re-exported here, so
``from misq.config import ...`` is the one import path for every config name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# CompressConfig, the field declaration and the text parsers live in config_compress and
# config_fields; they are imported here too (misq.config is where the rest of misq looks for them).
from misq.config_compress import (
    AUTO_SPARSITY_NOMINAL,
    BUDGETS,
    DEFAULT_BITS,
    GROUPINGS,
    MI_ESTIMATORS,
    SPARSITY_ALLOCATIONS,
    CompressConfig,
)
from misq.config_fields import (
    TASK_PRESETS,
    SparsityArg,
    option,
    parse_bits,
    parse_datasets,
    parse_tasks,
    sparsity_pattern,
)
from misq.dtypes import DTYPE_NAMES
from misq.errors import MisqError

# The one definition of each set of choices: validation below and the CLI's choices both use it.
# DATASETS is also defined in misq.protocol.data, which imports torch at import time, so it
# cannot be imported from there; that module should import this one instead.
DATASETS = ("wikitext2", "ptb", "c4")
STREAM_MODES = ("auto", "on", "off")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
RUNTIMES = ("packed", "dense")  # how a packed checkpoint's linears run (misq.runtime)


@dataclass
class ModelConfig:
    """Which checkpoint to load and where to run it."""

    model: str = option(help="local checkpoint folder, HF hub id, or a misq packed checkpoint")
    # None: float16 for a plain checkpoint (the protocol's dtype), the saved dtype for a packed one;
    # a dtype given on the command line is applied to both, so no flag is ignored for a packed load.
    dtype: str | None = option(None, "weight dtype (default: float16; a packed checkpoint keeps the dtype it was saved in)",
                               choices=DTYPE_NAMES)
    device: str | None = option(None, "cuda, cuda:1 or cpu (default: cuda if present)")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (off by default)")
    layerwise: bool | None = option(
        None, "1: run one decoder layer at a time on the device (default: only when the model does not fit)")
    # Read decoder layers from the safetensors files one at a time instead of loading the model:
    # on | off | auto (when the weights exceed half the available host memory; misq.models.streaming).
    stream: str = option("auto", "how the weights are read", choices=STREAM_MODES, switch={
        "stream": ("on", ("read decoder layers from the safetensors files one at a time, never the whole model "
                          "(default: only when the weights exceed half the free host memory)")),
        "no-stream": ("off", "load the whole model into host memory"),
    })
    # Only eval spreads a model over GPUs: compression runs layer by layer on one device.
    device_map: str | None = option(
        None, "spread the model over all visible GPUs with transformers' device_map (needs accelerate)",
        choices=DEVICE_MAPS, commands=("eval",))
    # misq generate has its own --runtime (GenerateConfig), packed by default: decoding is what it is for.
    runtime: str = option("dense", "a packed checkpoint's linears: dense (decoded to full weights at load) or packed "
                          "(computed from the codes: weights in about the honest size)", choices=RUNTIMES,
                          commands=("eval",))

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise MisqError(f"--dtype {self.dtype!r} is not supported: use one of {', '.join(DTYPE_NAMES)}")
        if self.stream not in STREAM_MODES:
            raise MisqError(f"stream mode {self.stream!r} is unknown: use one of {', '.join(STREAM_MODES)}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise MisqError(f"--device-map {self.device_map!r} is unknown: use one of {', '.join(DEVICE_MAPS)}")
        if self.runtime not in RUNTIMES:
            raise MisqError(f"--runtime {self.runtime!r} is unknown: use packed or dense")
        if self.stream == "on" and self.layerwise is False:
            raise MisqError("--stream runs one decoder layer at a time: drop --layerwise 0 or --stream")
        if self.stream == "on" and self.device_map is not None:
            raise MisqError("--stream and --device-map exclude each other: stream on one GPU, or spread the model over several")

    @property
    def weight_dtype(self) -> str:
        """The dtype a plain (not packed) checkpoint is loaded in: ``dtype``, else float16."""
        return self.dtype or "float16"

    def resolved_device(self) -> str:
        """``device``, else cuda when a GPU is visible, else cpu."""
        import torch  # here, not at import time: the config and the CLI's --help stay light

        if self.device:
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise MisqError(f"--device {self.device} asked for CUDA but no GPU is visible: use --device cpu")
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class DataConfig:
    """Where text comes from and how it is cut (docs/protocol.md)."""

    data_dir: str | None = option(None, "folder with wikitext2/ptb/c4 files (default: $MISQ_DATA_DIR, else HF datasets)")
    seqlen: int | None = option(None, "window length (default: min(2048, model max positions))")
    cache_dir: str | None = option(None, "tokenized-text cache (default: $MISQ_CACHE_DIR or ~/.cache/misq)")
    # docs/protocol.md: c4 eval cut to 256 x seqlen tokens; False keeps all 1100 documents.
    c4_cut: bool = option(True, "c4 eval: cut to 256 x seqlen tokens (protocol) or keep all 1100 documents (none)",
                          values={"protocol": True, "none": False})

    def __post_init__(self) -> None:
        if self.seqlen is not None and self.seqlen < 2:
            raise MisqError(f"--seqlen {self.seqlen} is too small: use a window of at least 2 tokens, such as 2048")


@dataclass
class EvalConfig:
    """What perplexity is measured on; zero-shot tasks and generations recorded beside it."""

    datasets: tuple[str, ...] = option(DATASETS, "comma-separated: wikitext2,ptb,c4 or text-file paths; none: no perplexity")
    batch_size: int = option(1, "segments per forward pass")
    # Zero-shot accuracy through lm-evaluation-harness (misq.protocol.zeroshot); lm-eval is an optional extra.
    tasks: tuple[str, ...] | None = option(
        None, "lm-evaluation-harness tasks, comma-separated (e.g. piqa,arc_easy), or the preset 'paper' "
              f"({','.join(TASK_PRESETS['paper'])}); needs pip install 'misq[eval]' (default: none)",
        aliases=("eval-tasks",))
    num_fewshot: int = option(0, "lm-eval: examples shown before each question (0: zero-shot, as the papers report)")
    task_limit: int | None = option(None, "lm-eval: at most this many examples per task, for a quick look "
                                          "(not comparable to published numbers; default: all)")
    task_dir: str | None = option(None, "lm-eval: a folder of extra task YAMLs (lm-eval's --include_path), "
                                        "e.g. tasks on local data files")
    task_batch_size: str = option("8", "lm-eval: requests per forward pass, a number or auto")
    # Greedy generations recorded for the report (misq.protocol.generations).
    prompts: str = option("default", "prompts whose greedy generations the results record (shown by misq compare): "
                                     "default (a small built-in set), none, or a file with one prompt per line "
                                     "(or a JSON list)", aliases=("generate-prompts",))
    max_new_tokens: int = option(48, "length cap of each generation, in new tokens")

    def __post_init__(self) -> None:
        no_ppl = self.datasets in ((), [], "", "none") or list(self.datasets) == ["none"]
        self.datasets = () if no_ppl else parse_datasets(self.datasets)
        self.tasks = parse_tasks(self.tasks)
        if self.num_fewshot < 0:
            raise MisqError(f"--num-fewshot {self.num_fewshot} must be 0 (zero-shot) or more")
        if self.task_limit is not None and self.task_limit < 1:
            raise MisqError(f"--task-limit {self.task_limit} must be at least 1 (or left out for every example)")
        if self.task_batch_size != "auto" and not (str(self.task_batch_size).isdigit() and int(self.task_batch_size) > 0):
            raise MisqError(f"--task-batch-size {self.task_batch_size!r} is neither a positive number nor auto")
        if self.max_new_tokens < 1:
            raise MisqError(f"--max-new-tokens {self.max_new_tokens} must be at least 1 (or use --prompts none)")

    @property
    def measures_anything(self) -> bool:
        """Whether there is anything to measure after compressing."""
        return bool(self.datasets or self.tasks or self.prompts != "none")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``datasets`` and ``tasks`` as lists)."""
        d = dataclasses.asdict(self)
        d["datasets"], d["tasks"] = list(self.datasets), list(self.tasks or ())
        return d


def resolved(*configs: Any) -> dict[str, Any]:
    """A JSON-ready dict of several configs, keyed by their role."""
    out: dict[str, Any] = {}
    for cfg in configs:
        key = type(cfg).__name__.replace("Config", "").lower()
        out[key] = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    return out




@dataclass
class GenerateConfig:
    """Text generation from a packed checkpoint or any model (misq generate)."""

    prompt: str = option("Once upon a time", "the prompt")
    max_new_tokens: int = option(64, "length cap, in new tokens", commands=("generate",))
    temperature: float = option(0.0, "0: greedy; above 0: sample at this temperature")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this probability mass")
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template (when it has one)")
    runtime: str = option("packed", "packed: compute from the codes; dense: decode every layer to fp16 first",
                          choices=RUNTIMES)
    baseline: str | None = option(None, "a second model to generate from with the same settings, shown beside the first")
    seed: int = option(0, "random seed for sampling")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MisqError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise MisqError(f"--temperature {self.temperature} must be >= 0 and --top-p {self.top_p} in (0, 1]")
        if self.runtime not in RUNTIMES:
            raise MisqError(f"--runtime {self.runtime!r} is unknown: use packed or dense")


__all__ = [
    "AUTO_SPARSITY_NOMINAL",
    "BUDGETS",
    "DATASETS",
    "DEFAULT_BITS",
    "DEVICE_MAPS",
    "GROUPINGS",
    "MI_ESTIMATORS",
    "SPARSITY_ALLOCATIONS",
    "STREAM_MODES",
    "TASK_PRESETS",
    "CompressConfig",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
    "ModelConfig",
    "SparsityArg",
    "field",
    "option",
    "parse_bits",
    "parse_datasets",
    "parse_tasks",
    "resolved",
    "sparsity_pattern",
]
