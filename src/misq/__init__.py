"""misq: one-shot SparseGPT pruning + MI-grouped mixed-precision quantization for LLaMA models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path: str, **kwargs):
    """Load a misq packed checkpoint (or any HF causal LM folder) as a transformers model."""
    from misq.checkpoint.packed import load_packed

    return load_packed(path, **kwargs)
