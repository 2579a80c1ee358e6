"""The jobs a user runs: ``misq eval`` (:func:`run_eval`) and ``misq compress`` (:func:`run_compress`)."""

from misq.jobs.compress import run_compress
from misq.jobs.evaluate import run_eval

__all__ = ["run_compress", "run_eval"]
