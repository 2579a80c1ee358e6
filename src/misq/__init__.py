"""misq: one-shot SparseGPT pruning + MI-grouped mixed-precision quantization for LLaMA models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path: str, runtime: str = "dense", **kwargs):
    """Load a misq packed checkpoint (or any HF causal LM folder) as a transformers model.

    ``runtime="dense"`` decodes every compressed layer to a dense weight; ``runtime="packed"``
    keeps the codes and computes from them (:mod:`misq.runtime`): less memory, fast decoding.
    """
    if runtime == "packed":
        from misq.runtime import load_packed_runtime

        return load_packed_runtime(path, **kwargs)
    if runtime != "dense":
        from misq.errors import MisqError

        raise MisqError(f"runtime {runtime!r} is unknown: use dense or packed")
    from misq.checkpoint.packed import load_packed

    return load_packed(path, **kwargs)
