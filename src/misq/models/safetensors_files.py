"""The one reader of safetensors checkpoints: headers, shards named by an index, tensors on demand.

Both streaming (a model's own shards) and packed checkpoints (misq's shards) read through here,
so the file names, the dtype spellings and the damage checks live in one place.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from misq.errors import MisqError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# safetensors' spelling of each dtype, and bytes per element of each spelling.
SAFETENSORS_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                     torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                     torch.bool: "BOOL"}
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024**2


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is (from the safetensors header)."""

    file: Path
    dtype: str  # safetensors spelling: F16, BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, by name, without mapping or reading the data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise MisqError(f"{path} is not a readable safetensors file ({err}): copy or download the checkpoint again") from None
    header.pop("__metadata__", None)
    return {name: TensorInfo(path, meta["dtype"], tuple(meta["shape"])) for name, meta in header.items()}


class SafetensorsFiles:
    """The tensors of one checkpoint (one file, or shards named by an index), read on demand."""

    def __init__(self, files: Iterable[Path]):
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            if not path.is_file():
                raise MisqError(f"{path} is missing: the checkpoint is incomplete, copy or download it again")
            self.tensors.update(read_header(path))

    @classmethod
    def of_folder(cls, folder: Path) -> SafetensorsFiles:
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise MisqError(f"{index} is damaged ({err!r}): copy or download the checkpoint again") from None
            return cls(folder / s for s in shards)
        return cls([folder / WEIGHTS_NAME])

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the floating-point tensors once cast to ``dtype`` (the others as stored)."""
        size = torch.empty(0, dtype=dtype).element_size()
        return sum(t.numel * (size if t.dtype.startswith(("F", "BF")) else _ELEMENT_BYTES.get(t.dtype, 1))
                   for t in self.tensors.values())

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Copies of the tensors ``names`` in host memory; floating ones cast to ``dtype``.

        Each file is opened and closed here, so no mapping outlives the call (see the module
        docstring); the tensors returned own their memory.
        """
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.tensors:
                raise MisqError(f"tensor {name} is missing from the checkpoint: it is incomplete or not a "
                                "transformers LLaMA-family layout; drop --stream to let transformers load it")
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    cast = dtype is not None and t.is_floating_point() and t.dtype != dtype
                    out[name] = t.to(dtype) if cast else t.clone()  # either way: off the mapping
        return out
