"""Golden checks on the shared llama-9m checkpoint against the public reference figures.

The figures come from ../shared/models/README.md (public GPTQ/SparseGPT code, same protocol).
These tests need ../shared (found through MISQ_SHARED_DIR / MISQ_DATA_DIR or the sibling
folder) and skip, saying so, when it is absent.
"""

from __future__ import annotations

import pytest

from misq import jobs
from misq.config import CompressConfig, DataConfig, EvalConfig, ModelConfig

DENSE = {"wikitext2": 111.12, "ptb": 260.51, "c4": 146.21}
SPARSEGPT_50_4BIT = {"wikitext2": 127.10, "ptb": 272.52, "c4": 156.52}
GPTQ_4BIT = {"wikitext2": 112.66, "ptb": 261.88, "c4": 147.96}

pytestmark = pytest.mark.slow


def test_dense_perplexity_matches_reference(llama9m_dir, shared_data_dir, tmp_path):
    # The reference's c4 figure keeps all 1100 documents (146.209 with no cut, measured on an
    # H200; the protocol's 256 x seqlen cut (docs/protocol.md) gives 147.058), so compare it without the cut.
    res = jobs.run_eval(ModelConfig(str(llama9m_dir), device="cpu"),
                            DataConfig(data_dir=str(shared_data_dir), cache_dir=str(tmp_path), c4_cut=False),
                            EvalConfig(batch_size=4), str(tmp_path / "baseline.json"))
    assert res["protocol"]["seqlen"] == 1024 and res["protocol"]["c4_max_tokens"] is None
    for name, ref in DENSE.items():
        assert res["ppl"][name] == pytest.approx(ref, rel=0.005), name


@pytest.mark.parametrize("sparsity,reference", [(0.5, SPARSEGPT_50_4BIT), (0.0, GPTQ_4BIT)], ids=["sparsegpt50-4bit", "gptq-4bit"])
def test_uniform_parity_with_reference(llama9m_dir, shared_data_dir, tmp_path, sparsity, reference):
    # wikitext2 only, to keep CI on 2 CPU cores inside its budget; the three-dataset table
    # (measured on an H200) is in BENCHMARKS.md.
    cfg = CompressConfig(dataset="c4", nsamples=128, seed=0, sparsity=sparsity, grouping="uniform", wbits=4, batch_size=16)
    res = jobs.run_compress(ModelConfig(str(llama9m_dir), device="cpu"), DataConfig(data_dir=str(shared_data_dir), cache_dir=str(tmp_path)),
                                cfg, EvalConfig(datasets=("wikitext2",), batch_size=4), str(tmp_path / "run"))
    reference = {"wikitext2": reference["wikitext2"]}
    for name, ref in reference.items():
        assert res["ppl"][name] <= ref * 1.01, f"{name}: {res['ppl'][name]:.2f} vs reference {ref}"
    assert res["bits"]["actual_avg_bits"] == 4.0
    assert res["sparsity"]["actual"] == pytest.approx(sparsity, abs=0.01)
