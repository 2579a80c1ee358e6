"""The one reader of safetensors checkpoints: headers, shards named by an index, tensors on demand.

Both streaming (a model's own shards) and packed checkpoints (misq's shards) read through here,
so the file names, the dtype spellings and the damage checks live in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
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
            size = os.fstat(f.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        infos, end = {}, 0
        for name, meta in header.items():
            infos[name] = TensorInfo(path, str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
            end = max(end, int(meta["data_offsets"][1]))
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} bytes, the header needs {8 + n + end}")
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as err:
        raise MisqError(f"{path} is truncated or corrupt, not a readable safetensors file ({err}): "
                        "copy or download the checkpoint again") from None
    return infos


def weights_fingerprint(folder: str | os.PathLike) -> str | None:
    """A fingerprint of a checkpoint folder's weight files: names, sizes, mtimes and a hash of each
    file's first 64 KiB (a safetensors header). None when the folder holds no weight files."""
    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json"))
    except OSError:
        return None
    h = hashlib.sha256()
    found = False
    for p in files:
        if p.suffix == ".json" and p.name != INDEX_NAME:
            continue
        st = p.stat()
        found = found or p.suffix != ".json"
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read(64 * 1024)).digest())
    return h.hexdigest() if found else None


def check_covers_layers(folder: str | os.PathLike, n_layers: int, prefix_of: Callable[[int], str]) -> None:
    """Refuse a safetensors checkpoint whose weights hold fewer decoder layers than its config
    claims (transformers would fill the missing ones with random weights). A folder without
    safetensors weights is not checked here."""
    folder = Path(folder)
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file()):
        return
    names = SafetensorsFiles.of_folder(folder).tensors
    missing = [i for i in range(n_layers) if not any(k.startswith(prefix_of(i)) for k in names)]
    if missing:
        raise MisqError(f"{folder}: config.json claims {n_layers} decoder layers but the weights hold none for "
                        f"layer(s) {', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}: the checkpoint "
                        "is incomplete or its config.json is wrong; copy or download it again")


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
