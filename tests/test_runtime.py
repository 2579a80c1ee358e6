"""The packed runtime on the CPU (issue 14): layout round trip, the dequantize-per-layer
fallback, and a tiny compressed model's logits against the dense-decoded model's."""

from __future__ import annotations

import pytest
import torch
from runtime_layers import random_layer, stand_in_kernels

import misq
from misq import jobs
from misq.config import CompressConfig, DataConfig, ModelConfig
from misq.errors import MisqError
from misq.runtime import PackedLinear, weights_nbytes
from misq.runtime.layout import block_cols, chunk_tiles, kernel_order, pack_words, unpack_words


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11])
def test_words_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 77))
    words = pack_words(codes, bits)
    pad = -(-77 // block_cols(bits)) * block_cols(bits)  # 77 columns -> whole blocks
    assert sum(w.numel() for w in words.values()) == 5 * pad * bits // 32  # exactly b bits a padded weight
    assert torch.equal(unpack_words(words, bits, 77), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11])
def test_kernel_order_permutes_each_block(bits):
    """The tensor-core kernel's column order: each block's columns, once each (padding past n),
    in chunks of chunk_tiles(bits) tiles that pair column c with column c + 16 T / 2."""
    n, B = 700, block_cols(bits)
    order = kernel_order(bits, n)
    assert order.numel() == -(-n // B) * B
    for b in range(order.numel() // B):
        blk = order[b * B:(b + 1) * B]
        assert sorted(blk.tolist()) == torch.arange(b * B, (b + 1) * B).clamp(max=n).tolist()
        assert torch.equal(blk[1::2] - blk[0::2], torch.full((B // 2,), B // 2)) or b * B + B > n
    assert 16 * chunk_tiles(bits) <= B


def test_kernel_perm_follows_perm():
    lin, _, _ = random_layer(8, 300, (3, 4), 32, "dense", act_order=True)
    pos = 0
    for seg in lin.segments:
        order = kernel_order(seg.bits, seg.n)
        ok = order < seg.n
        assert torch.equal(lin.kperm[pos:pos + order.numel()][ok].long(), lin.perm[seg.start + order[ok]].long())
        pos += order.numel()
    assert pos == lin.kperm.numel()


@pytest.mark.parametrize("widths,groupsize,pattern,act_order", [
    ((4,), 128, "dense", False), ((3,), 32, "dense", True), ((2, 3, 4, 6, 8, 16), 32, "unstructured", True),
    ((3, 4), 0, "2:4", False), ((8,), 0, "dense", False),
])
def test_layer_dequantizes_to_the_decoded_weight(widths, groupsize, pattern, act_order):
    lin, dense, _ = random_layer(40, 200 if pattern != "2:4" else 160, widths, groupsize, pattern, act_order=act_order)
    assert torch.equal(lin.dequantize(torch.float16), dense)
    x = torch.randn(2, 3, lin.in_features)
    torch.testing.assert_close(lin(x), x @ dense.float().t(), atol=1e-4, rtol=1e-4)  # summation order


@pytest.fixture(scope="module")
def packed_tiny(tiny_checkpoint, tiny_corpus_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    cfg = CompressConfig(dataset=str(tiny_corpus_file), nsamples=8, n_groups=4, grouping="hessian", budget="model",
                         target_size=3.6, groupsize=16, act_order=True, sparsity=0.5)
    jobs.run_compress(ModelConfig(str(tiny_checkpoint), device="cpu"), DataConfig(seqlen=64, cache_dir=str(tmp / "c")),
                      cfg, None, str(tmp / "run"), save_dir=str(tmp / "packed"))
    return tmp / "packed"


def test_lightly_pruned_layer_without_a_mask_dequantizes_exactly():
    """Under an unstructured pattern a layer with 2% zeros stores no mask (its zeros are codes at
    the zero point): the runtime's layout reads it as dense and computes the same weight."""
    lin, dense, packed = random_layer(40, 200, (4,), 32, "unstructured", pruned=0.02)
    assert "mask" not in packed.tensors and packed.meta["masked"] is False
    assert torch.equal(lin.dequantize(torch.float16), dense)


def test_decode_launches_pair_a_mixed_layers_widths():
    """At batch 1 a mixed 3/4-bit layer (groups of 128) runs one h2 launch for both widths, its
    split-K programs divided between them (with no split-K, one run along K each); other widths
    and groups fall back to their own launches; at 16 rows the tensor-core path pairs them."""
    from misq.runtime.launch_plan import Config, config_for, plan_launches

    lin, _, _ = random_layer(72, 1024, (3, 4), 128, "dense", act_order=True, seed=0)
    segs = lin.segments
    assert [s.bits for s in segs] == [3, 4]
    (one,) = plan_launches(segs, [config_for(1, s.bits, 72, 1024) for s in segs], 72, 1)
    assert one.cfg.path == "h2" and one.segs == segs and one.cfg.num_warps == 4
    assert 0 < one.off2 < one.split and one.off2 * one.bps[0] * 512 >= segs[0].n > (one.off2 - 1) * one.bps[0] * 512
    (whole,) = plan_launches(segs, [Config("h2", 64, 1, 4, pregather=True)] * 2, 72, 1)
    assert (whole.split, whole.off2) == (2, 1)
    assert len(plan_launches(segs, [config_for(1, s.bits, 72, 1024) for s in segs], 72, 1, pair_h2=False)) == 2
    (tc,) = plan_launches(segs, [config_for(16, s.bits, 72, 1024) for s in segs], 72, 16)
    assert tc.cfg.path == "mma" and len(tc.segs) == 2
    g32, _, _ = random_layer(72, 1024, (3, 4), 32, "dense", act_order=True, seed=0)  # not h2's groups
    assert all(lc.cfg.path != "h2" for lc in plan_launches(g32.segments, [config_for(1, s.bits, 72, 1024)
                                                                            for s in g32.segments], 72, 1))


def test_compiled_model_calls_the_layer_as_one_opaque_op(monkeypatch):
    """Under torch.compile the GPU forward is the custom op misq::packed_linear (the compiler
    cannot trace the kernels' launch code): a whole graph with no break, the op called with the
    layer's own handle (a deep copy gets its own), the same output as eager."""
    import copy

    from misq.runtime import linear

    calls = stand_in_kernels(monkeypatch)
    lin = random_layer(24, 64, (4,), 32, "dense", seed=0)[0]
    twin = copy.deepcopy(lin)
    assert twin._handle != lin._handle and linear._LAYERS[twin._handle] is twin
    model = torch.nn.Sequential(twin, torch.nn.ReLU())
    x = torch.randn(3, 64)
    ref = model(x)
    torch._dynamo.reset()
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(y, ref)
    assert calls == [twin, twin]  # eager, then the compiled graph's op (tracing runs the fake, not the layer)


def test_packed_runtime_logits_equal_dense(packed_tiny):
    dense = misq.load(str(packed_tiny))
    packed = misq.load(str(packed_tiny), runtime="packed")
    n_packed = sum(isinstance(m, PackedLinear) for m in packed.modules())
    assert n_packed == 2 * 7  # every linear of the 2 decoder layers
    ids = torch.randint(0, packed.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = dense(ids).logits, packed(ids).logits
    assert (a - b).abs().max().item() < 1e-3  # summation order only
    sizes = weights_nbytes(packed)
    assert sizes["packed"] > 0 and sizes["total"] == sizes["packed"] + sizes["other"]


def test_unknown_runtime_is_refused(packed_tiny):
    with pytest.raises(MisqError, match="runtime"):
        misq.load(str(packed_tiny), runtime="fast")


def test_eval_with_the_packed_runtime(packed_tiny, tiny_checkpoint, tmp_path):
    """`misq eval PACKED --runtime packed` computes from the codes (on the CPU: one layer
    dequantized at a time) and gives the dense runtime's perplexity; a plain checkpoint is refused."""
    from misq.config import EvalConfig
    from misq.demo.toy import synthetic_corpus

    text = tmp_path / "eval.txt"  # a few windows: the CPU fallback dequantizes every layer per batch
    text.write_text(synthetic_corpus(120, seed=4))
    data = DataConfig(seqlen=64, cache_dir=str(tmp_path / "c"))
    evals = EvalConfig(datasets=[str(text)], prompts="none")
    ppl = {runtime: jobs.run_eval(ModelConfig(str(packed_tiny), device="cpu", runtime=runtime), data, evals, None)["ppl"]
           for runtime in ("dense", "packed")}
    assert ppl["packed"] == pytest.approx(ppl["dense"], rel=1e-4) and len(ppl["packed"]) == 1
    with pytest.raises(MisqError, match="plain checkpoint"):
        jobs.run_eval(ModelConfig(str(tiny_checkpoint), device="cpu", runtime="packed"), data, evals, None)


def test_generate_streams_and_shows_the_baseline(packed_tiny, tiny_checkpoint, capsys):
    from misq.cli import main

    rc = main(["generate", str(packed_tiny), "--prompt", "the cat", "--max-new-tokens", "6", "--device", "cpu",
               "--baseline", str(tiny_checkpoint)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"=== {packed_tiny} ===" in out and f"=== {tiny_checkpoint} ===" in out and " | " in out


def test_generate_sampled_chat_dense(packed_tiny, capsys):
    from misq.cli import main

    rc = main(["generate", str(packed_tiny), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu",
               "--temperature", "0.8", "--top-p", "0.9", "--chat", "--runtime", "dense"])
    assert rc == 0 and capsys.readouterr().out.strip() != ""
