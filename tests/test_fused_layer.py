"""Packed LLaMA decoder layers given the fused batch-1 forward (misq.runtime.fused_layer), on the
CPU: which layers are fused, that the model keeps its modules and state dict, and that off CUDA the
model's own forward runs. The fused kernels' numbers are checked under Triton's interpreter
(tests/kernels_interpreted.py, fused-layer cases) and on a GPU (tests/test_runtime_gpu.py)."""

from __future__ import annotations

import torch
from runtime_layers import random_packed_llama

from misq.runtime import fused_layer
from misq.runtime.fused_layer import fuse_decoder_layers
from misq.runtime.merge import SharedInputSlice


def test_layers_built_as_llama_are_fused_and_keep_their_state_dict():
    model, fused = random_packed_llama((4,), layers=2)
    assert fused == 2
    assert all(isinstance(block.misq_fused, fused_layer.FusedPlan) for block in model.model.layers)
    names = set(model.state_dict())
    assert not any("misq" in n for n in names)  # the plan is not a module: nothing new to save
    plain, _ = random_packed_llama((4,), layers=2)
    assert names == set(plain.state_dict())
    assert fuse_decoder_layers(model) == 2  # again: nothing changes
    assert type(model.model.layers[0]).__name__ == "MisqFusedLlamaDecoderLayer"
    import copy
    import pickle

    again = pickle.loads(pickle.dumps(copy.deepcopy(model)))  # the class is found by name; the plan follows its copy
    block = again.model.layers[0]
    assert isinstance(block, type(model.model.layers[0])) and block.misq_fused.down is block.mlp.down_proj


def test_off_cuda_the_models_own_forward_runs():
    """On the CPU the fused forward hands every call to the model's own: the logits are the same
    bits as an unfused copy's."""
    model, _ = random_packed_llama((3, 4))
    plain, _ = random_packed_llama((3, 4))
    for block in plain.model.layers:  # the same layers without the fused forward
        fused_layer.unfuse(block)
        assert type(block).__name__ == "LlamaDecoderLayer" and not hasattr(block, "misq_fused")
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        assert torch.equal(model(ids[:, :1]).logits, plain(ids[:, :1]).logits)


def test_layers_the_kernels_cannot_serve_are_left_alone():
    """Not fused: groups the h2 kernel does not take (32 columns), unmerged projections, a GELU MLP,
    a norm of another form (Gemma's 1 + weight)."""
    model, fused = random_packed_llama((2,))  # 2-bit: no h2 path
    assert fused == 0 and not hasattr(model.model.layers[0], "misq_fused")
    model, _ = random_packed_llama((4,))
    block = model.model.layers[0]
    fused_layer.unfuse(block)
    assert fused_layer._plan_for(block) is not None
    block.mlp.act_fn = torch.nn.GELU()
    assert fused_layer._plan_for(block) is None
    model, _ = random_packed_llama((4,))
    block = model.model.layers[0]
    norm = block.input_layernorm
    norm.forward = lambda x: (1 + norm.weight) * x  # not LlamaRMSNorm's function
    assert fused_layer._plan_for(block) is None
    model, _ = random_packed_llama((4,))
    block = model.model.layers[0]
    block.self_attn.q_proj = block.self_attn.q_proj.merged  # q/k/v no longer slices of one merged layer
    assert fused_layer._plan_for(block) is None


def test_an_offer_is_spent_once_and_only_for_its_own_input():
    """The norm kernel's pairs go to the merged q/k/v's next call with that very tensor, once."""
    model, _ = random_packed_llama((4,))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SharedInputSlice)
    shared = q._shared
    x, other, pairs = torch.zeros(3), torch.zeros(3), torch.zeros(4, dtype=torch.int32)
    shared.offer(x, pairs)
    assert shared.take_offer(other) is None  # a different tensor, even an equal one: not its pairs
    assert shared.take_offer(x) is None  # the offer was spent by the call before
    shared.offer(x, pairs)
    assert shared.take_offer(x) is pairs and shared.offered is None
