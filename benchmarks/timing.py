"""Clock helpers shared by the benchmark scripts: wall time that waits for the GPU to finish."""

from __future__ import annotations

import time

import torch


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def now() -> float:
    """perf_counter after the queued GPU work is done, so differences are real elapsed time."""
    sync()
    return time.perf_counter()
