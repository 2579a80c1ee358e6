"""The packed runtime's Triton kernels against dequantize-then-matmul, on the GPU (issue 14):
every width, group size, sparsity pattern and shape edge; decode (M <= 16) and prefill paths;
and a tiny model's logits against the dense-decoded model's."""

from __future__ import annotations

import itertools

import pytest
import torch
from runtime_layers import random_layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WIDTHS = [(2,), (3,), (4,), (6,), (8,), (16,), (3, 4), (2, 3, 4, 6, 8, 16)]
GROUPS = [0, 32, 128]
PATTERNS = ["dense", "unstructured", "2:4"]


@pytest.mark.parametrize("widths,groupsize,pattern", list(itertools.product(WIDTHS, GROUPS, PATTERNS)))
@pytest.mark.parametrize("rows", [1, 13, 40])
def test_kernel_matches_dequantize_then_matmul(widths, groupsize, pattern, rows):
    cols = 392 if pattern == "2:4" else 389  # odd column counts, partial last groups
    lin, dense, _ = random_layer(72, cols, widths, groupsize, pattern, act_order=groupsize == 32, seed=rows)
    lin = lin.cuda()
    x = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    ref = (x.float() @ dense.cuda().float().t())
    y = lin(x)
    assert y.dtype == torch.float16 and y.shape == (rows, 72)
    # same fp16 weights; only the fp32 summation order and the final fp16 rounding differ
    torch.testing.assert_close(y.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def packed_tiny(tiny_checkpoint, tiny_corpus_file, tmp_path_factory):
    from misq import jobs
    from misq.config import CompressConfig, DataConfig, ModelConfig

    tmp = tmp_path_factory.mktemp("rtgpu")
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, n_groups=4, grouping="hessian", budget="model",
                         target_size=3.6, groupsize=16, act_order=True, sparsity=0.5)
    jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp / "c")),
                      cfg, None, str(tmp / "run"), save_dir=str(tmp / "packed"))
    return tmp / "packed"


def test_tiny_model_logits_on_gpu(packed_tiny):
    import misq

    dense = misq.load(str(packed_tiny), dtype="float16", device="cuda")
    packed = misq.load(str(packed_tiny), runtime="packed", dtype="float16", device="cuda")
    for T in (1, 40):  # decode kernel and prefill path
        ids = torch.randint(0, packed.config.vocab_size, (1, T), device="cuda")
        with torch.no_grad():
            a, b = dense(ids).logits.float(), packed(ids).logits.float()
        assert (a - b).abs().max().item() < 2e-2, T  # fp16 rounding of activations along the way


def test_generate_on_gpu(packed_tiny, capsys):
    from misq.config import GenerateConfig
    from misq.runtime.generate import run_generate

    texts = run_generate(str(packed_tiny), GenerateConfig(prompt="the cat", max_new_tokens=8), device="cuda")
    assert len(texts) == 1 and capsys.readouterr().out.strip()
