"""Shared fixtures.

Real data and the llama-9m checkpoint live beside the checkout in ``../shared`` (never inside
it). Tests find them through ``MISQ_SHARED_DIR`` (or ``MISQ_DATA_DIR`` for the data alone),
falling back to the sibling folder; a test that needs them skips, saying why, when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    env = os.environ.get("MISQ_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    env = os.environ.get("MISQ_DATA_DIR")
    path = Path(env) if env else shared_root() / "data"
    if not (path / "wikitext2").is_dir():
        pytest.skip(f"shared evaluation data not found at {path} (set MISQ_DATA_DIR or MISQ_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def llama9m_dir() -> Path:
    path = shared_root() / "models" / "llama-9m"
    if not (path / "config.json").is_file():
        pytest.skip(f"llama-9m checkpoint not found at {path} (set MISQ_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained GQA LLaMA + BPE tokenizer saved in HF layout (built once per session)."""
    from misq.demo.toy import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", steps=0)


@pytest.fixture(scope="session")
def tiny_corpus_file(tmp_path_factory) -> Path:
    """A synthetic text file usable as a calibration / evaluation dataset."""
    from misq.demo.toy import synthetic_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(synthetic_corpus(3000, seed=1))
    return path


@pytest.fixture(scope="session")
def packed_uniform(tiny_checkpoint, tiny_corpus_file, tmp_path_factory):
    """A packed checkpoint at the default recipe's shape: uniform 4 bits, groups, act-order, 50%."""
    from misq import jobs
    from misq.config import CompressConfig, DataConfig, ModelConfig

    tmp = tmp_path_factory.mktemp("uniform")
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=4, groupsize=16, act_order=True, sparsity=0.5,
                         refine_passes=0)
    jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=32, cache_dir=str(tmp / "c")),
                      cfg, None, str(tmp / "run"), save_dir=str(tmp / "packed"))
    return tmp / "packed"


def randomly_pruned(W, pat, gen):
    """W [R, C] pruned as pattern ``pat`` would leave it: half the weights at random (unstructured,
    drawn from ``gen``), the smallest of every M (N:M), or W itself (dense). Test helper."""
    import torch

    from misq.checkpoint.packing import nm_keep_mask

    if pat.kind == "unstructured":
        W[torch.rand(W.shape, generator=gen) < 0.5] = 0
    elif pat.kind == "nm":
        W = torch.where(nm_keep_mask(W, pat.n, pat.m), W, 0.0)
    return W
