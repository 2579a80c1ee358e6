"""The packed runtime: run a misq packed checkpoint from its codes (docs/architecture.md).

``load_packed_runtime`` builds the transformers model with :class:`PackedLinear` layers;
``misq.load(path, runtime="packed")`` calls it. :mod:`misq.runtime.generate` is ``misq generate``.
"""

from misq.runtime.linear import PackedLinear
from misq.runtime.load import load_packed_runtime, weights_nbytes

__all__ = ["PackedLinear", "load_packed_runtime", "weights_nbytes"]
