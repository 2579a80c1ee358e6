"""The packed runtime's Triton kernels against dequantize-then-matmul, on the GPU (issue 14):
every width, group size, sparsity pattern and shape edge; decode (M <= 16) and prefill paths;
and a tiny model's logits against the dense-decoded model's."""

from __future__ import annotations

import pytest
import torch
from runtime_layers import random_layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (widths, group size, pattern): the fast paths (3/4-bit g128, 50% sparse, mixed, act-order g32, 2:4)
# and the exact path (uneven groups, 5/6/8 bits, 16-bit columns). The Triton interpreter covers
# more (every width 2..8) on the CPU when TRITON_INTERPRET=1.
CASES = [((4,), 128, "dense"), ((3,), 128, "dense"), ((4,), 128, "unstructured"), ((3,), 32, "2:4"),
         ((3, 4), 128, "dense"), ((2, 3, 4, 6, 8, 16), 32, "unstructured"), ((8,), 0, "dense"), ((6,), 32, "dense"),
         ((5,), 0, "dense"), ((2,), 128, "dense")]


def fp16_tolerance(x, W, ref):
    """What the fp16 roundings allow: each dense weight is within half an fp16 ulp (2**-11
    relative) of ``scale * (code - zero)``, which the decode kernel uses unrounded, so the outputs
    may differ by up to 2**-11 * (|x| @ |W|^T); the output itself is rounded to fp16 (half an ulp,
    doubled for the float32 sums' order)."""
    return 2.0 ** -11 * (x.abs().double() @ W.abs().double().t()) + 2.0 ** -10 * ref.abs() + 1e-5


@pytest.mark.parametrize("widths,groupsize,pattern", CASES)
@pytest.mark.parametrize("rows", [1, 13, 16, 40])
def test_kernel_matches_dequantize_then_matmul(widths, groupsize, pattern, rows):
    cols = 392 if pattern == "2:4" else 389  # odd column counts, partial last groups
    lin, dense, _ = random_layer(72, cols, widths, groupsize, pattern, act_order=groupsize == 32, seed=rows)
    lin = lin.cuda()
    if rows == 13:
        lin.bias = torch.randn(72, device="cuda", dtype=torch.float16)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    W = dense.cuda()
    ref = x.double() @ W.double().t()
    if lin.bias is not None:
        ref += lin.bias.double()
    for _ in range(2):  # the second call checks that the split-K workspace was left clean
        y = lin(x)
        assert y.dtype == torch.float16 and y.shape == (rows, 72)
        err = (y.double() - ref).abs() / fp16_tolerance(x, W, ref)
        assert err.max().item() <= 1.0, err.max().item()


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
