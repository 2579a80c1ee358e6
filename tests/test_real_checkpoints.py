"""misq on a real pretrained checkpoint that nobody here trained: stories260K (../shared/models).

It is the odd one out among LLaMA checkpoints: grouped-query attention (8 query heads on 4 KV
heads, head_dim 8), tied embeddings, float32 weights and a SentencePiece tokenizer. The whole
path must handle it: load, compress at a budget, evaluate, save packed, reload.
"""

from __future__ import annotations

import pytest
from conftest import shared_root

from misq import jobs
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig


@pytest.fixture(scope="module")
def stories_dir():
    pytest.importorskip("sentencepiece", reason="stories260K's tokenizer needs sentencepiece")
    path = shared_root() / "models" / "stories260K" / "hf"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260K not found at {path} (set MISQ_SHARED_DIR)")
    return path


@pytest.fixture(scope="module")
def stories_text():
    path = shared_root() / "data" / "tinystories" / "tinystories_sample.txt"
    if not path.is_file():
        pytest.skip(f"TinyStories sample not found at {path} (set MISQ_SHARED_DIR)")
    return path


def test_stories260k_compresses_evaluates_and_reloads(stories_dir, stories_text, tmp_path):
    model = ModelConfig(str(stories_dir), device="cpu", dtype="float32")
    data = DataConfig(seqlen=128, cache_dir=str(tmp_path / "cache"))
    evals = EvalConfig(datasets=(str(stories_text),))
    base = jobs.run_eval(model, data, evals, None)
    # 25% sparsity: a 260K-parameter model loses 5x perplexity at 50% even unquantized (31.3 vs 6.03),
    # while 4.0 mixed bits alone cost 8% (6.52); see BENCHMARKS.md.
    cfg = CompressConfig(dataset=str(stories_text), nsamples=4, sparsity=0.25, n_groups=4, target_avg_bits=4.0, grouping="hessian", groupsize=0, act_order=False, mse=False)
    res = jobs.run_compress(model, data, cfg, evals, str(tmp_path / "run"), save_dir=str(tmp_path / "packed"))

    summary = res["model"]
    assert (summary["heads"], summary["kv_heads"], summary["tied_embeddings"], summary["dtype"]) == (8, 4, True, "float32")
    assert abs(res["bits"]["actual_avg_bits"] - 4.0) <= 0.01
    assert res["sparsity"]["actual"] == pytest.approx(0.25, abs=0.01)
    name = str(stories_text)
    # Degrades gracefully: worse than the dense model, but not broken.
    assert base["ppl"][name] < res["ppl"][name] < 1.5 * base["ppl"][name]
    reloaded = jobs.run_eval(ModelConfig(str(tmp_path / "packed"), device="cpu"), data, evals, None)
    assert reloaded["ppl"][name] == pytest.approx(res["ppl"][name], rel=1e-5)
