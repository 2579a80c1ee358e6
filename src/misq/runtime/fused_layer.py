"""A packed LLaMA decoder layer's batch-1 decode step in fewer launches.

At batch 1 a layer's four h2 kernels (q/k/v merged, o, gate/up merged, down) each had x's pairs
made first by a launch of their own (half2_gather._gather_pairs), and the layer's norms, residual
adds and SiLU * up ran as kernels of their own too: launches of 2-4 us each, with a GPU that reads
the layer's weights in about 66 us (BENCHMARKS.md, session 20). Here the kernel that makes a
projection's x makes its pairs too:

* RMSNorm before q/k/v: one launch makes the normed x and the merged q/k/v's pairs, which the
  attention's q/k/v slices then start from (merge._SharedOutput.offer);
* the residual add and RMSNorm before gate/up: one launch makes the sum, the normed x and the
  merged gate/up's pairs;
* SiLU(gate) * up: one launch makes down's input and its pairs;
* the residual add after down: in down's own output (the kernel's bias, given at each call).

o_proj keeps its own gather (its x comes from the attention kernel). The model keeps its modules
and state dict: the layer becomes a subclass of its own class (``MisqFused<class>``) whose forward falls back to the model's
own forward for anything but one fp16 row on CUDA (prefill, CPU, positional arguments). Only
layers built as LLaMA's are fused: an RMSNorm of the usual form (checked on a random row), a SiLU
MLP, q/k/v and gate/up merged, and all three consumers one h2 launch (PackedLinear.pairs_ok).
Where a launch plan changes later so that a consumer cannot take the pairs, each step falls back
to the model's operations (the ops below), so the result stays right.

Numerics: each op rounds to fp16 where the model's operations do (the residual sums, the norm
before and after its weight, SiLU and its product); the residual after down is added in float32
to down's output before its one rounding, instead of after it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misq.runtime import launch_plan
from misq.runtime.linear import _LAYERS, PackedLinear
from misq.runtime.merge import SharedInputSlice

log = logging.getLogger(__name__)

NORM_SOURCE, SILU_SOURCE = 1, 2  # half2_gather._source_x's SOURCE


def _rms_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm's forward: float32 statistics, rounded to h's dtype before the weight."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _one_row(x: Tensor) -> bool:
    return x.is_contiguous() and x.shape[:-1].numel() == 1


def _norm_pairs(a: Tensor, b: Tensor | None, weight: Tensor, eps: float, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """(h = a + b, or a; y = RMSNorm(h) * weight; y's pairs for ``layer``, empty where its plan
    cannot take them)."""
    step = _LAYERS[layer].paired_step() if _one_row(a) and (b is None or _one_row(b)) else None
    if step is None:
        h = a if b is None else a + b
        return h, _rms_norm(h, weight, eps), a.new_empty(0, dtype=torch.int32)
    y = torch.empty_like(a)
    h = a if b is None else torch.empty_like(a)
    pairs = step.make_pairs(NORM_SOURCE, a, y, b, weight, None if b is None else h, eps)
    return h, y, pairs


@torch.library.custom_op("misq::rms_norm_pairs", mutates_args=())
def rms_norm_pairs(x: Tensor, weight: Tensor, eps: float, layer: int) -> tuple[Tensor, Tensor]:
    """x fp16 [..., C] -> (RMSNorm(x) * weight, its pairs for PackedLinear ``layer``)."""
    _, y, pairs = _norm_pairs(x, None, weight, eps, layer)
    return y, pairs


@rms_norm_pairs.register_fake
def _rms_norm_pairs_shape(x: Tensor, weight: Tensor, eps: float, layer: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int32)


@torch.library.custom_op("misq::add_rms_norm_pairs", mutates_args=())
def add_rms_norm_pairs(a: Tensor, b: Tensor, weight: Tensor, eps: float, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """a, b fp16 [..., C] -> (h = a + b, RMSNorm(h) * weight, its pairs for ``layer``)."""
    return _norm_pairs(a, b, weight, eps, layer)


@add_rms_norm_pairs.register_fake
def _add_rms_norm_pairs_shape(a: Tensor, b: Tensor, weight: Tensor, eps: float,
                              layer: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(a), torch.empty_like(a), a.new_empty(torch.library.get_ctx().new_dynamic_size(),
                                                                 dtype=torch.int32)


@torch.library.custom_op("misq::silu_mul_pairs", mutates_args=())
def silu_mul_pairs(gate_up: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """gate_up fp16 [..., 2 I] (gate's rows, then up's) -> (SiLU(gate) * up [..., I], its pairs
    for ``layer``)."""
    n = gate_up.shape[-1] // 2
    step = _LAYERS[layer].paired_step() if _one_row(gate_up) else None
    if step is None:
        return F.silu(gate_up[..., :n]) * gate_up[..., n:], gate_up.new_empty(0, dtype=torch.int32)
    act = gate_up.new_empty(*gate_up.shape[:-1], n)
    return act, step.make_pairs(SILU_SOURCE, gate_up, act)


@silu_mul_pairs.register_fake
def _silu_mul_pairs_shape(gate_up: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    return (gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2),
            gate_up.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int32))


class FusedPlan:
    """What a fused layer's forward needs: the model's own forward, and the three consumers: the
    merged q/k/v (its slices' shared state, for the offer), the merged gate/up, down."""

    def __init__(self, base_forward: Any, qkv: SharedInputSlice, gate_up: PackedLinear, gate_rows: int,
                 down: PackedLinear):
        self.base_forward = base_forward  # the model's own layer forward (a plain function)
        self.qkv, self.gate_up, self.gate_rows, self.down = qkv, gate_up, gate_rows, down

    def applies(self, block: nn.Module, x: Tensor) -> bool:
        """One fp16 row on CUDA (a batch-1 decode step), fp16 norms, launch_plan.FUSED_DECODER on."""
        return (launch_plan.FUSED_DECODER and x.is_cuda and x.dtype == torch.float16 and x.shape[:-1].numel() == 1
                and block.input_layernorm.weight.dtype == block.post_attention_layernorm.weight.dtype == torch.float16)


def fused_forward(self: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The decoder layer's forward (LlamaDecoderLayer's, transformers 5) in the launches of the
    module docstring; the model's own for anything else."""
    plan: FusedPlan = self.misq_fused
    if args or not plan.applies(self, hidden_states):
        return plan.base_forward(self, hidden_states, *args, **kwargs)
    norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
    qkv = plan.qkv.merged
    normed, pairs = rms_norm_pairs(hidden_states, norm1.weight, norm1.variance_epsilon, qkv._handle)
    plan.qkv._shared.offer(normed, pairs)
    attn, _ = self.self_attn(hidden_states=normed, **kwargs)
    h, normed, pairs = add_rms_norm_pairs(hidden_states, attn, norm2.weight, norm2.variance_epsilon,
                                          plan.gate_up._handle)
    gate_up = plan.gate_up.pairs_forward(normed, pairs)
    act, pairs = silu_mul_pairs(gate_up, plan.down._handle)
    return plan.down.pairs_forward(act, pairs, residual=h)


def _llama_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` computes LlamaRMSNorm's function (checked on a random row, on the CPU)."""
    w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(w, Tensor) or w.dim() != 1 or not isinstance(eps, float) or w.device.type == "meta":
        return False
    x = torch.randn(1, w.numel(), generator=torch.Generator().manual_seed(0)).to(w.dtype)
    with torch.no_grad():
        got = norm(x.to(w.device)).cpu()
        want = _rms_norm(x, w.detach().cpu(), eps)
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=2e-3, atol=1e-3)


def _silu(act: Any) -> bool:
    """Whether ``act`` computes SiLU (nn.SiLU, transformers' SiLUActivation...), checked on CPU values."""
    if not callable(act):
        return False
    x = torch.linspace(-8, 8, 33)
    try:
        with torch.no_grad():
            return torch.allclose(act(x), F.silu(x), rtol=1e-5, atol=1e-6)
    except Exception:  # an activation that takes no CPU tensors is not one we know
        return False


def _plan_for(block: nn.Module) -> FusedPlan | None:
    """The block's FusedPlan when it is built as LLaMA's and its consumers take pairs, else None."""
    if {n for n, _ in block.named_children()} != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
        return None
    attn, mlp = block.self_attn, block.mlp
    q, gate, up, down = (getattr(attn, "q_proj", None), getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None),
                         getattr(mlp, "down_proj", None))
    k, v = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
    if not all(isinstance(m, SharedInputSlice) for m in (q, k, v, gate, up)) or not isinstance(down, PackedLinear):
        return None
    if not (q.merged is k.merged is v.merged) or gate.merged is not up.merged:
        return None
    n = gate.out_features
    if (gate.start, gate.stop, up.start, up.stop) != (0, n, n, 2 * n) or down.in_features != n or down.bias is not None:
        return None
    if not _silu(getattr(mlp, "act_fn", None)) or not all(m.pairs_ok() for m in (q.merged, gate.merged, down)):
        return None
    if not (_llama_norm(block.input_layernorm) and _llama_norm(block.post_attention_layernorm)):
        return None
    return FusedPlan(type(block).forward, q, gate.merged, n, down)


def _fused_class(cls: type) -> type:
    """The subclass of decoder-layer class ``cls`` whose forward is :func:`fused_forward`: one per
    class, kept in this module under its name (so a pickled model finds it). A subclass, not a
    forward set on the instance, so that torch.compile traces it as any module."""
    name = f"MisqFused{cls.__name__}"
    fused = globals().get(name)
    if fused is None or fused.__bases__ != (cls,):
        fused = type(name, (cls,), {"forward": fused_forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = fused
    return fused


def unfuse(block: nn.Module) -> None:
    """Give a fused decoder layer back its own class and forward."""
    if hasattr(block, "misq_fused"):
        block.__class__ = type(block).__bases__[0]
        del block.misq_fused


def fuse_decoder_layers(model: nn.Module) -> int:
    """Give every decoder layer of ``model.model.layers`` that :func:`_plan_for` takes the fused
    forward (module docstring); returns how many. Needs transformers 5 (a layer's forward returns
    the hidden states, not a tuple) and merged projections (misq.runtime.merge)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        log.debug("fused decoder layers need transformers 5, not %s", transformers.__version__)
        return 0
    fused = 0
    for block in getattr(getattr(model, "model", None), "layers", ()):
        if hasattr(block, "misq_fused"):
            fused += 1
            continue
        plan = _plan_for(block)
        if plan is None:
            continue
        block.misq_fused = plan
        block.__class__ = _fused_class(type(block))
        fused += 1
    log.debug("fused the batch-1 decode of %d decoder layers", fused)
    return fused
