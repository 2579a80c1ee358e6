"""The weight dtypes misq runs in, by the name users type (``--dtype``): one table for all.

Torch is imported only when a dtype object is asked for, so the config and the CLI's help
stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float16", "bfloat16", "float32")


def torch_dtype(name: str) -> torch.dtype:
    """``torch.float16`` for ``"float16"``; a name outside :data:`DTYPE_NAMES` is a KeyError."""
    import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """``"float16"`` for ``torch.float16`` (the spelling results files use)."""
    return str(dtype).replace("torch.", "")
