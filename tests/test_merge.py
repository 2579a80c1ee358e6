"""Projections that read one input merged into one packed layer (misq.runtime.merge), on the CPU."""

from __future__ import annotations

import pytest
import torch
from runtime_layers import random_layer, stand_in_kernels

import misq
from misq.runtime import PackedLinear, weights_nbytes
from misq.runtime.merge import GatedMLP, SharedInputSlice, merge_gated, merge_linears, merge_shared_inputs, mergeable


def _step(rows=(24, 8, 8), widths=(3, 4), bias=False):
    """Layers of one step: one act-order permutation and layout, their own codes (and bias)."""
    layers = []
    for i, r in enumerate(rows):
        lin = random_layer(r, 256, widths, 32, "unstructured", act_order=True, seed=10 + i, order_seed=7)[0]
        if bias:
            lin.bias = torch.randn(r).half()
        layers.append(lin)
    return layers


@pytest.mark.parametrize("bias", [False, True])
def test_merged_layer_holds_each_layers_rows(bias):
    layers = _step(bias=bias)
    assert mergeable(layers)
    merged = merge_linears(layers)
    per_column = sum(t.numel() * t.element_size() for t in (layers[0].perm, layers[0].kperm,
                                                             *(seg.gidx for seg in layers[0].segments)))
    assert merged.out_features == 40  # the column order and groups are held once, not three times
    assert merged.weight_nbytes == sum(layer.weight_nbytes for layer in layers) - 2 * per_column
    assert torch.equal(merged.dequantize(), torch.cat([layer.dequantize() for layer in layers]))
    x = torch.randn(5, 256)
    torch.testing.assert_close(merged(x), torch.cat([layer(x) for layer in layers], -1), atol=1e-5, rtol=1e-5)


def test_layers_that_read_differently_are_not_merged():
    a, b = _step(rows=(16, 16))
    assert mergeable([a, b])
    other_order = random_layer(16, 256, (3, 4), 32, "unstructured", act_order=True, seed=11, order_seed=8)[0]
    other_widths = random_layer(16, 256, (4,), 32, "unstructured", act_order=True, seed=11, order_seed=7)[0]
    other_groups = random_layer(16, 256, (3, 4), 64, "unstructured", act_order=True, seed=11, order_seed=7)[0]
    for c in (other_order, other_widths, other_groups):
        assert not mergeable([a, c])
    b.bias = torch.zeros(16).half()
    assert not mergeable([a, b])


def _sliced(layers):
    """A module holding ``layers`` as slices of one merged layer, and the merged layer's call count."""
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    block = torch.nn.Module()
    block.proj = torch.nn.Module()
    for name, layer in zip("qkv", layers):
        block.proj.add_module(name, layer)
    holder.model.layers = torch.nn.ModuleList([block])
    assert merge_shared_inputs(holder, [("proj.q", "proj.k", "proj.v"), ("proj.q",)]) == 1
    merged = block.proj.q.merged
    calls = []
    merged.register_forward_hook(lambda *a: calls.append(1))
    return block.proj, calls


def test_slices_compute_once_per_input_and_hold_nothing_after():
    layers = _step()
    refs = [layer.dequantize().float() for layer in layers]
    proj, calls = _sliced(layers)
    assert all(isinstance(m, SharedInputSlice) for m in (proj.q, proj.k, proj.v))
    x = torch.randn(2, 3, 256)
    outs = [proj.q(x), proj.k(x), proj.v(x)]
    assert len(calls) == 1 and proj.q._shared.y is None and proj.q._shared.x is None
    for y, W in zip(outs, refs):
        torch.testing.assert_close(y, x @ W.t(), atol=1e-5, rtol=1e-5)
    x2 = torch.randn(2, 3, 256)  # out of order, repeated, alone: still right, only recomputed
    torch.testing.assert_close(proj.v(x2), x2 @ refs[2].t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.v(x2), x2 @ refs[2].t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.k(x), x @ refs[1].t(), atol=1e-5, rtol=1e-5)
    assert len(calls) == 3  # v(x2) twice shares one call; k(x) after x was dropped runs again


def test_compiled_slices_are_one_graph_and_one_call(monkeypatch):
    """Under torch.compile (fullgraph: no break) the three slices trace to one call of the merged
    layer's op, with the eager outputs."""
    calls = stand_in_kernels(monkeypatch)
    proj, _ = _sliced(_step())

    def attention_inputs(x):
        return proj.q(x).view(2, 3, 3, 8).transpose(1, 2) * 2, proj.k(x) + 1, proj.v(x).relu()

    x = torch.randn(2, 3, 256)
    ref = attention_inputs(x)
    assert len(calls) == 1
    torch._dynamo.reset()
    out = torch.compile(attention_inputs, backend="aot_eager", fullgraph=True)(x)
    assert len(calls) == 2  # the compiled graph's op ran once for all three
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert proj.q._shared.x is None and proj.q._shared.y is None


def test_gated_layer_returns_silu_of_gate_times_up():
    """merge_gated interleaves gate's and up's rows (gate i at 2i, up i at 2i + 1) and its forward
    returns SiLU(gate) * up; rows must pair."""
    gate, up = _step(rows=(16, 16), bias=True)
    glu = merge_gated(gate, up)
    assert glu.glu and glu.out_features == 32 and glu.output_features == 16
    assert torch.equal(glu.dequantize()[0::2], gate.dequantize()) and torch.equal(glu.dequantize()[1::2], up.dequantize())
    assert torch.equal(glu.bias[1::2], up.bias)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(glu(x), torch.nn.functional.silu(gate(x)) * up(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        merge_gated(gate, _step(rows=(8,))[0])
    with pytest.raises(ValueError, match="even"):
        PackedLinear(glu.perm, glu.segments, None, 31, glu=True)


def _tiny_llama(hidden_act: str = "silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, hidden_act=hidden_act)
    model = LlamaForCausalLM(cfg).eval()
    for i, block in enumerate(model.model.layers):  # gate and up share one column order, as misq's solves give them
        for j, name in enumerate(("gate_proj", "up_proj")):
            lin = random_layer(128, 256, (3, 4), 32, "unstructured", act_order=True, seed=20 + 2 * i + j, order_seed=i)[0]
            block.mlp.set_submodule(name, lin)
    return model


def test_llama_mlp_becomes_one_gated_layer_with_the_same_logits():
    """A LLaMA MLP's packed gate and up become a GatedMLP (one gated layer and down); its logits
    are the unmerged model's. Under torch.compile (fullgraph) the MLP is one op call for gate/up."""
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    assert merge_shared_inputs(model, [("mlp.gate_proj", "mlp.up_proj")]) == 2
    assert all(isinstance(b.mlp, GatedMLP) and b.mlp.gate_up.glu for b in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_compiled_gated_mlp_is_one_op_call(monkeypatch):
    calls = stand_in_kernels(monkeypatch)
    model = _tiny_llama()
    merge_shared_inputs(model, [("mlp.gate_proj", "mlp.up_proj")])
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, 256)
    with torch.no_grad():
        ref = mlp(x)
        torch._dynamo.reset()
        out = torch.compile(mlp, backend="aot_eager", fullgraph=True)(x)
    assert [c for c in calls if c.glu] == [mlp.gate_up, mlp.gate_up]  # eager, then the compiled graph's one call
    torch.testing.assert_close(out, ref)


def test_mlp_gated_otherwise_stays_two_slices():
    """An MLP gated by another activation (GELU, as Gemma's) keeps gate and up as slices of one
    merged layer, and so does any MLP with gated merging turned off."""
    for model, gated in ((_tiny_llama("gelu"), True), (_tiny_llama(), False)):
        assert merge_shared_inputs(model, [("mlp.gate_proj", "mlp.up_proj")], gated=gated) == 2
        assert not any(isinstance(m, GatedMLP) for m in model.modules())
        assert sum(isinstance(m, SharedInputSlice) for m in model.modules()) == 4


def test_packed_runtime_merges_each_step_of_a_uniform_checkpoint(packed_uniform):
    """misq solves q/k/v (and gate/up) stacked, so a uniform checkpoint's steps share a layout:
    the loader merges them (2 groups a layer: q/k/v as slices, gate/up as a GatedMLP), with the
    same logits as unmerged and a little less memory (each merged group holds its column order once)."""
    merged = misq.load(str(packed_uniform), runtime="packed")
    plain = misq.load(str(packed_uniform), runtime="packed", merge=False)
    n_layers = merged.config.num_hidden_layers
    slices = [m for m in merged.modules() if isinstance(m, SharedInputSlice)]
    assert len(slices) == 3 * n_layers  # q, k, v
    assert sum(isinstance(m, GatedMLP) for m in merged.modules()) == n_layers
    assert sum(isinstance(m, PackedLinear) for m in merged.modules()) == 4 * n_layers  # qkv, o, gate_up, down
    assert not any(isinstance(m, SharedInputSlice) for m in plain.modules())
    sizes, plain_sizes = weights_nbytes(merged), weights_nbytes(plain)
    assert sizes["other"] == plain_sizes["other"] and 0.9 * plain_sizes["packed"] < sizes["packed"] < plain_sizes["packed"]
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = merged(ids).logits, plain(ids).logits
    assert (a - b).abs().max().item() < 1e-4  # summation order only
    dense = misq.load(str(packed_uniform))
    with torch.no_grad():
        assert (dense(ids).logits - a).abs().max().item() < 1e-3

