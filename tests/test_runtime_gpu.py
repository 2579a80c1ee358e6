"""The packed runtime's Triton kernels against dequantize-then-matmul, on the GPU (issue 14):
every width, group size, sparsity pattern and shape edge; decode (M = 1 on CUDA cores, M = 2..16
on the tensor cores, with x gathered in the kernel or before it, split-K or not) and prefill
(tiles dequantized on the fly, or dequantize + cuBLAS); and a tiny model's logits against the
dense-decoded model's."""

from __future__ import annotations

import pytest
import torch
from runtime_layers import random_layer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (widths, group size, pattern): the fast paths (3/4-bit g128, 50% sparse, mixed, act-order g32, 2:4)
# and the exact path (uneven groups, 5/6/8 bits, 16-bit columns).
CASES = [((4,), 128, "dense"), ((3,), 128, "dense"), ((4,), 128, "unstructured"), ((3,), 32, "2:4"),
         ((3, 4), 128, "dense"), ((2, 3, 4, 6, 8, 16), 32, "unstructured"), ((8,), 0, "dense"), ((6,), 32, "dense"),
         ((5,), 0, "dense"), ((2,), 128, "dense")]


def fp16_tolerance(x, W, ref):
    """What the fp16 roundings allow: each dense weight is within half an fp16 ulp (2**-11
    relative) of ``scale * (code - zero)``, which the decode kernel uses unrounded, so the outputs
    may differ by up to 2**-11 * (|x| @ |W|^T); the output itself is rounded to fp16 (half an ulp,
    doubled for the float32 sums' order)."""
    return 2.0 ** -11 * (x.abs().double() @ W.abs().double().t()) + 2.0 ** -10 * ref.abs() + 1e-5


def _check(lin, dense, rows, y_fn, bias=False, calls=2, x_scale=1.0):
    cols = lin.in_features
    if bias:
        lin.bias = torch.randn(lin.out_features, device="cuda", dtype=torch.float16)
    x = (torch.randn(rows, cols, device="cuda") * x_scale).to(torch.float16)
    W = dense.cuda()
    ref = x.double() @ W.double().t()
    if lin.bias is not None:
        ref += lin.bias.double()
    for _ in range(calls):  # the second call checks that the split-K workspace was left clean
        y = y_fn(x)
        assert y.dtype == torch.float16 and y.shape == (rows, lin.out_features)
        err = (y.double() - ref).abs() / fp16_tolerance(x, W, ref)
        assert err.max().item() <= 1.0, err.max().item()


def _layer(widths, groupsize, pattern, seed):
    cols = 392 if pattern == "2:4" else 389  # odd column counts, partial last groups and blocks
    lin, dense, _ = random_layer(72, cols, widths, groupsize, pattern, act_order=groupsize == 32, seed=seed)
    return lin.cuda(), dense


@pytest.mark.parametrize("widths,groupsize,pattern", CASES)
@pytest.mark.parametrize("rows", [1, 2, 13, 16, 40, 300])
def test_kernel_matches_dequantize_then_matmul(widths, groupsize, pattern, rows):
    """The layer's forward: its default path for each number of rows."""
    lin, dense = _layer(widths, groupsize, pattern, rows)
    _check(lin, dense, rows, lin, bias=rows in (13, 300))


@pytest.mark.parametrize("widths", [(4,), (3, 4)])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_maskless_unstructured_layer(widths, rows):
    """A lightly pruned layer stores no mask (its zeros are codes at the zero point, cheaper than
    a bit per weight): the kernels read the same codes and must still match."""
    from misq.checkpoint.layer_format import has_mask

    lin, dense, packed = random_layer(72, 389, widths, 128, "unstructured", seed=rows, pruned=0.05)
    assert not has_mask(packed.meta)
    _check(lin.cuda(), dense, rows, lin)


@pytest.mark.parametrize("widths,groupsize,pattern", CASES)
@pytest.mark.parametrize("rows,cfg", [
    (1, "fma"), (1, "mma"), (5, "mma"), (5, "mma_pregather"), (16, "mma_split"), (3, "dot"), (1, "fma_pregather"),
    (1, "h2"), (1, "h2_nosplit"), (1, "h2_wide"), (1, "h2_fused"), (1, "h2_fused_nosplit"), (1, "h2_pdl"),
    (5, "mma_staged"), (16, "mma_wide_staged"),
])
def test_decode_paths(widths, groupsize, pattern, rows, cfg):
    """Every decode path and launch shape: CUDA cores at M = 1, tensor cores with x gathered in the
    kernel or before it (for the CUDA cores: float32, pre-scaled), deep split-K (workspace), the
    previous per-tile dot path, the h2 kernel as its gather's programmatic dependent, the tensor
    cores' loop over blocks software-pipelined (num_stages > 1, as the tuner may pick)."""
    from misq.runtime.launch_plan import Config

    config = {"fma": Config("fma", 64, 2112, 4), "mma": Config("mma", 32, 64, 4),
              "mma_pregather": Config("mma", 64, 2112, 4, pregather=True), "mma_split": Config("mma", 64, 4096, 4),
              "dot": Config("dot", 128, 2112, 4), "fma_pregather": Config("fma", 64, 2112, 4, pregather=True),
              "h2": Config("h2", 128, 2112, 4, pregather=True), "h2_nosplit": Config("h2", 64, 1, 4, pregather=True),
              "h2_wide": Config("h2", 512, 1056, 4, pregather=True), "h2_fused": Config("h2", 256, 2112, 4),
              "h2_fused_nosplit": Config("h2", 64, 1, 4), "h2_pdl": Config("h2", 64, 1320, 2, 2, pregather=True, pdl=True),
              "mma_staged": Config("mma", 64, 528, 4, 2, pregather=True),
              "mma_wide_staged": Config("mma", 128, 1056, 8, 3, pregather=True)}[cfg]
    lin, dense = _layer(widths, groupsize, pattern, rows)
    _check(lin, dense, rows, lambda x: lin._decode(x, [config] * len(lin.segments)), bias=rows == 5)


@pytest.mark.parametrize("widths", [(4,), (3,), (3, 4)])
@pytest.mark.parametrize("programs", [1, 264])
def test_several_blocks_a_program(widths, programs):
    """The h2 kernel (as its gather's programmatic dependent) and the tensor cores' at 16 rows
    over 1100 columns: several 3-bit blocks (512 columns) a program, the last partial."""
    from misq.runtime.launch_plan import Config

    lin, dense, _ = random_layer(72, 1100, widths, 128, "dense", seed=3)
    lin = lin.cuda()
    config = Config("h2", 64, programs, 4, 2, pregather=True, pdl=True)
    _check(lin, dense, 1, lambda x: lin._decode(x, [config] * len(lin.segments)))
    mma = Config("mma", 64, programs, 4, pregather=True)
    _check(lin, dense, 16, lambda x: lin._decode(x, [mma] * len(lin.segments)))


@pytest.mark.parametrize("widths", [(4,), (3,), (3, 4)])
@pytest.mark.parametrize("groupsize", [0, 256, 512])
@pytest.mark.parametrize("programs", [1, 264])
def test_h2_groups_of_several_blocks(widths, groupsize, programs):
    """The h2 kernel finds a block's group by dividing by the group's runs of 128 columns, a
    division Triton leaves out when that is 1 (groups of 128): groups of 256 and 512 columns and
    one group a row (0) take the division, over 1100 columns (several blocks a program, the last
    partial), plainly and as the gather's programmatic dependent."""
    from misq.runtime.launch_plan import Config

    lin, dense, _ = random_layer(72, 1100, widths, groupsize, "dense", seed=groupsize + programs)
    lin = lin.cuda()
    for pdl in (False, True):
        config = Config("h2", 64, programs, 4, 2, pregather=True, pdl=pdl)
        _check(lin, dense, 1, lambda x, c=config: lin._decode(x, [c] * len(lin.segments)))


@pytest.mark.parametrize("widths", [(4,), (3,), (3, 4)])
@pytest.mark.parametrize("maxnreg", [72, 64])
def test_h2_with_registers_capped(widths, maxnreg):
    """The h2 kernel compiled with its registers capped (Config.maxnreg, as the default for large
    4-bit layers sets it; 64 makes the compiler spill at 4 bits), plainly and as the gather's
    programmatic dependent, several blocks a program, the last partial."""
    from misq.runtime.launch_plan import Config

    lin, dense, _ = random_layer(136, 1100, widths, 128, "dense", seed=maxnreg)
    lin = lin.cuda()
    for pdl in (False, True):
        config = Config("h2", 64, 24, 2 if widths == (4,) else 4, 2, pregather=True, pdl=pdl, maxnreg=maxnreg)
        _check(lin, dense, 1, lambda x, c=config: lin._decode(x, [c] * len(lin.segments)))


@pytest.mark.parametrize("widths", [(4,), (3, 4)])
def test_bound_launches_in_a_cuda_graph(widths):
    """A layer's bound launches (fast_launch: the compiled kernels' launchers called directly, the
    h2 kernel launched plainly and as a programmatic dependent: the default's setting and the
    other) captured in a CUDA graph and replayed on new x."""
    from misq.runtime import launch_plan
    from misq.runtime.launch_plan import Config

    lin, dense = _layer(widths, 128, "dense", 1)
    x = torch.zeros(1, lin.in_features, device="cuda", dtype=torch.float16)
    W = dense.cuda().double()
    other = Config("h2", 64, 1320, 2, 2, pregather=True, pdl=not launch_plan.H2_PDL)
    for cfgs in (None, [other] * len(widths)):
        lin._decode(x, cfgs)  # plan made and kernels compiled outside the capture
        lin._decode(x, cfgs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lin._decode(x, cfgs)
        for seed in range(3):
            x.copy_(torch.randn(1, lin.in_features, generator=torch.Generator().manual_seed(seed)).half())
            graph.replay()
            ref = x.double() @ W.t()
            assert ((y.double() - ref).abs() / fp16_tolerance(x, W, ref)).max().item() <= 1.0


@pytest.mark.parametrize("widths", [(4,), (3,), (3, 4)])
def test_gather_as_programmatic_dependent_in_a_cuda_graph(widths, monkeypatch):
    """launch_plan.GATHER_PDL: the h2 path's gather launched as the programmatic dependent of the
    kernel that makes x (here a multiply, in the same CUDA graph) waits for its writes: new x
    each replay, outputs within the fp16 tolerance."""
    from misq.runtime import launch_plan

    monkeypatch.setattr(launch_plan, "GATHER_PDL", True)
    lin, dense = _layer(widths, 128, "dense", 1)
    src = torch.zeros(1, lin.in_features, device="cuda", dtype=torch.float16)
    W = dense.cuda().double()
    for _ in range(2):  # plan made and kernels compiled outside the capture
        lin._decode(src * 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x = src * 2
        y = lin._decode(x)
    for seed in range(3):
        src.copy_(torch.randn(1, lin.in_features, generator=torch.Generator().manual_seed(seed)).half())
        graph.replay()
        ref = (src.double() * 2) @ W.t()
        assert ((y.double() - ref).abs() / fp16_tolerance(src * 2, W, ref)).max().item() <= 1.0


@pytest.mark.parametrize("widths,pattern", [((4,), "dense"), ((4,), "unstructured"), ((3,), "dense")])
@pytest.mark.parametrize("x_scale", [1e-3, 300.0, 4096.0])
@pytest.mark.parametrize("fused", [False, True])
def test_h2_kernel_scales_large_and_small_x(widths, pattern, x_scale, fused):
    """The fp16 pairs kernel (3 and 4 bits, M = 1) sums eight products in fp16: x above 256 is
    scaled down per layout block (else the sums overflow), and small x must keep its precision."""
    from misq.runtime.launch_plan import Config

    lin, dense = _layer(widths, 128, pattern, 1)
    cfg = Config("h2", 128, 2112, 4, pregather=not fused)
    _check(lin, dense, 1, lambda x: lin._decode(x, [cfg]), x_scale=x_scale)


@pytest.mark.parametrize("widths,groupsize,pattern", CASES)
@pytest.mark.parametrize("path,rows", [("fused", 40), ("fused", 300), ("dequant", 40)])
def test_prefill_paths(widths, groupsize, pattern, path, rows):
    """Prefill: tiles dequantized on the fly (layers it takes), or dequantize + cuBLAS."""
    lin, dense = _layer(widths, groupsize, pattern, rows)
    if path == "fused" and not lin.fused_prefill_ok():
        pytest.skip("the fused prefill kernel does not take this layer (16-bit columns, > 2 widths or > 10 bits)")
    _check(lin, dense, rows, lin._prefill_fused if path == "fused" else lin._prefill_dequant, bias=True, calls=1)


@pytest.mark.parametrize("widths", [(3,), (4,), (3, 4)])
def test_llama_shaped_layer(widths):
    """Whole layout blocks (no padding), several blocks a program and several programs a block row:
    every path on a 13B-like [640, 1536] layer, groups of 128."""
    from misq.runtime.launch_plan import Config

    lin, dense, _ = random_layer(640, 1536, widths, 128, "dense", act_order=True, seed=1)
    lin = lin.cuda()
    for rows in (1, 4, 16, 200):
        _check(lin, dense, rows, lin)
    _check(lin, dense, 300, lin._prefill_fused, calls=1)
    from misq.runtime.decode_plan import decode_matmul

    for cfg in (Config("mma", 64, 1056, 4), Config("mma", 128, 1056, 8, pregather=True)):
        _check(lin, dense, 8, lambda x, cfg=cfg: decode_matmul(
            x, lin.perm, lin.segments, 640, None, None, configs=[cfg] * len(lin.segments), kperm=lin.kperm))


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


def test_compiled_packed_model_on_gpu(packed_tiny):
    """torch.compile over a packed model: each layer enters the graph as the opaque op
    misq::packed_linear (one whole graph, no break) and the logits match eager's."""
    import misq

    packed = misq.load(str(packed_tiny), runtime="packed", dtype="float16", device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(packed, fullgraph=True)
    for T in (1, 40):
        ids = torch.randint(0, packed.config.vocab_size, (1, T), device="cuda")
        with torch.no_grad():
            a = packed(ids, use_cache=False).logits.float()
            b = compiled(ids, use_cache=False).logits.float()
        assert (a - b).abs().max().item() < 2e-2, T  # the compiled norms and activations round differently


@pytest.mark.parametrize("widths,pattern", [((4,), "unstructured"), ((3,), "dense"), ((3, 4), "dense"),
                                            ((2, 3, 4, 6, 8, 16), "unstructured")])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_gated_layer_on_gpu(widths, pattern, rows):
    """gate and up merged gated (misq.runtime.merge.merge_gated): SiLU(gate) * up from the kernel
    that writes the output at decode (its split-K workspace's last program, or the only one), from
    torch after prefill's matmul; within the fp16 tolerance carried through SiLU and the product,
    on two calls (the workspace left clean), and replayed in a CUDA graph at M = 1."""
    from kernels_interpreted import gated_tolerance

    from misq.runtime.merge import merge_gated

    parts = [random_layer(72, 389, widths, 128 if len(widths) < 3 else 32, pattern, act_order=True, seed=rows + i,
                          order_seed=5)[:2] for i in range(2)]
    glu = merge_gated(parts[0][0], parts[1][0]).cuda()
    glu.bias = torch.randn(144, device="cuda", dtype=torch.float16)
    W = torch.stack([parts[0][1], parts[1][1]], 1).flatten(0, 1).cuda().double()
    x = torch.randn(rows, 389, device="cuda").half()

    def error(y):  # max |y - SiLU(gate) * up| over its tolerance, for x as it is now
        product = x.double() @ W.t()
        ref, tol = gated_tolerance(product + glu.bias.double(), fp16_tolerance(x, W, product))
        return ((y.double() - ref).abs() / tol).max().item()

    for _ in range(2):
        y = glu(x)
        assert y.dtype == torch.float16 and y.shape == (rows, 72)
        assert error(y) <= 1.0
    if rows == 1:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = glu(x)
        x.copy_(torch.randn(1, 389, device="cuda").half())
        graph.replay()
        assert error(y) <= 1.0


def test_merged_projections_on_gpu(packed_uniform, capsys):
    """A uniform checkpoint's q/k/v and gate/up run merged (misq.runtime.merge): the logits equal
    the unmerged layers' within fp16 rounding at decode and prefill, eager, compiled (one graph)
    and in misq generate (static cache, CUDA graphs)."""
    import misq
    from misq.config import GenerateConfig
    from misq.runtime.generate import run_generate
    from misq.runtime.merge import GatedMLP, SharedInputSlice

    merged = misq.load(str(packed_uniform), runtime="packed", dtype="float16", device="cuda")
    plain = misq.load(str(packed_uniform), runtime="packed", dtype="float16", device="cuda", merge=False)
    assert sum(isinstance(m, SharedInputSlice) for m in merged.modules()) == 3 * merged.config.num_hidden_layers
    assert sum(isinstance(m, GatedMLP) for m in merged.modules()) == merged.config.num_hidden_layers
    torch._dynamo.reset()
    compiled = torch.compile(merged, fullgraph=True)
    for T in (1, 40):
        ids = torch.randint(0, merged.config.vocab_size, (1, T), device="cuda")
        with torch.no_grad():
            a = plain(ids, use_cache=False).logits.float()
            b = merged(ids, use_cache=False).logits.float()
            c = compiled(ids, use_cache=False).logits.float()
        assert (a - b).abs().max().item() < 2e-2, T  # split-K cut differently: fp16 rounding only
        assert (b - c).abs().max().item() < 2e-2, T
    texts = run_generate(str(packed_uniform), GenerateConfig(prompt="the cat", max_new_tokens=8), device="cuda")
    assert len(texts) == 1 and capsys.readouterr().out.strip()


def test_generate_on_gpu(packed_tiny, capsys):
    from misq.config import GenerateConfig
    from misq.runtime.generate import run_generate

    texts = run_generate(str(packed_tiny), GenerateConfig(prompt="the cat", max_new_tokens=8), device="cuda")
    assert len(texts) == 1 and capsys.readouterr().out.strip()


@pytest.mark.parametrize("rows,cols,k", [(1, 389, 389), (16, 5120, 5120), (13, 13824, 7000), (300, 392, 392)])
def test_gather_columns_matches_index_select(rows, cols, k):
    """The column gather every packed linear runs first: equal to index_select, also for rows
    that are not contiguous (a view into a wider tensor)."""
    from misq.runtime.kernels import gather_columns

    torch.manual_seed(rows)
    wide = torch.randn(rows, cols + 8, device="cuda", dtype=torch.float16)
    x = wide[:, 4:cols + 4]
    idx = torch.randperm(cols, device="cuda")[:k].to(torch.int32)
    assert torch.equal(gather_columns(x, idx), x.index_select(1, idx))
