"""One forward per decoder layer (issue 17): each step's pass continues from the previous one's
activations, and the result is the step-by-step path's, bit for bit, on the CPU.

The reference is the driver before issue 17, still reachable through the private switch
``step_activations._REUSE = False``: every step runs the layer from its input up to the step's
first linear, and the compressed layer runs once more in full for its output. Keeping it as a
switch rather than as stored golden tensors makes the comparison independent of the machine's
kernels (a golden file written on one CPU need not match another's fp32 rounding); the switch
changes nothing but where each pass starts. (Before the change, these same configurations were
also checked against outputs saved from the old code: equal bit for bit.)
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import transformers

from misq.compress import driver
from misq.config import CompressConfig
from misq.demo.toy import build_model
from misq.models import execution, step_activations


def _family(model_type: str) -> torch.nn.Module:
    if model_type == "llama":
        return build_model(200, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, seed=3).float().eval()
    config, cls = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM")}[model_type]
    # head_dim 24 x 4 heads = 96 != hidden 64: o_proj's input and the attention's output differ in width
    cfg = getattr(transformers, config)(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    return getattr(transformers, cls)(cfg).float().eval()


CALIB = torch.randint(0, 200, (5, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))


def _run(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, *, reuse: bool, batch_size: int = 1,
         budget: str = "layer", cache_down: bool | None = None) -> dict:
    """Compress a copy of ``model``; its weights, records, plans and logits on PROBE. ``budget``
    "model": mixed widths over Hessian-ordered channel groups, measured first (the slow grouping
    only there); "layer": uniform 4 bits."""
    monkeypatch.setattr(step_activations, "_REUSE", reuse)
    monkeypatch.setattr(step_activations, "_CACHE_DOWN_INPUT", cache_down)
    scheme = dict(grouping="hessian", n_groups=2, target_avg_bits=3.5) if budget == "model" else dict(grouping="uniform", wbits=4)
    cfg = CompressConfig(**scheme, sparsity=0.5, nsamples=CALIB.shape[0], batch_size=batch_size, blocksize=32, groupsize=0,
                         act_order=False, mse=False, budget=budget)
    m = copy.deepcopy(model)
    plans = driver.measure_model_plan(m, CALIB, cfg, "cpu") if budget == "model" else None
    out = driver.compress_model(m, CALIB, cfg, "cpu", plans=plans)
    return {"state": m.state_dict(), "logits": m(PROBE).logits,
            "records": [{k: v for k, v in r.items() if k != "solve_s"} for r in out.records],
            "bits": {k: p.bits.tolist() for k, p in out.plans.items()}}


_REFERENCE: dict[str, dict] = {}


def _reference(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The step-by-step path on the tiny LLaMA (uniform, one window per forward), computed once."""
    if not _REFERENCE:
        _REFERENCE.update(_run(_family("llama"), monkeypatch, reuse=False))
    return _REFERENCE


def _assert_same(a: dict, b: dict) -> None:
    assert a["records"] == b["records"] and a["bits"] == b["bits"]
    assert a["state"].keys() == b["state"].keys()
    for name, t in a["state"].items():
        assert torch.equal(t, b["state"][name]), name
    assert torch.equal(a["logits"], b["logits"])


@pytest.mark.parametrize("model_type,batch_size,budget", [("llama", 1, "model"), ("qwen3", 1, "layer"),
                                                           ("gemma", 1, "layer"), ("llama", 3, "layer")])
def test_one_forward_per_layer_is_the_step_by_step_path(model_type, batch_size, budget, monkeypatch):
    """Weights, records, plans (the model budget measures through the same passes) and outputs,
    bit for bit; three windows per forward too (5 windows: batches of 3 and 2)."""
    model = _family(model_type)
    _assert_same(_run(model, monkeypatch, reuse=True, batch_size=batch_size, budget=budget),
                 _run(model, monkeypatch, reuse=False, batch_size=batch_size, budget=budget))


def test_recomputing_the_mlp_instead_of_caching_its_input(monkeypatch):
    _assert_same(_run(_family("llama"), monkeypatch, reuse=True, cache_down=False), _reference(monkeypatch))


def _computations(model: torch.nn.Module) -> collections.Counter:
    """Counts the forwards that each linear of layer 0 really computes (not those stopped before it)."""
    counts: collections.Counter = collections.Counter()
    for name, module in model.model.layers[0].named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda *_a, name=name: counts.update([name]))
    return counts


@pytest.mark.parametrize("reuse", [True, False])
def test_each_linear_runs_about_once_per_window(reuse, monkeypatch):
    """5 windows in batches of 2 = 3 layer calls per pass. One forward per layer: q/k/v, gate/up
    and down once per batch; o_proj and down_proj once more for the first batch (the check that
    the attention and the MLP return their last linear's output) and o_proj in the cached
    attention output. The step-by-step path runs q/k/v in four passes."""
    model = copy.deepcopy(_family("llama"))
    counts = _computations(model)
    monkeypatch.setattr(step_activations, "_REUSE", reuse)
    driver.compress_model(model, CALIB, CompressConfig(grouping="uniform", wbits=4, nsamples=5, batch_size=2, groupsize=0,
                                                       act_order=False, mse=False), "cpu")
    if reuse:
        assert counts["self_attn.q_proj"] == counts["mlp.gate_proj"] == 3
        assert counts["self_attn.o_proj"] == 3 + 1 and counts["mlp.down_proj"] == 3 + 1
    else:
        assert counts["self_attn.q_proj"] == 4 * 3 and counts["mlp.gate_proj"] == 2 * 3


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_a_norm_that_only_feeds_a_stub_is_skipped(model_type, monkeypatch):
    """Three calls per pass (5 windows in batches of 2) and five passes per layer: the attention's
    norm runs in the q/k/v and o passes only, the MLP's in the gate/up and down passes only (the
    output pass serves both modules from their caches); the stepwise path runs them every time."""
    model = copy.deepcopy(_family(model_type))
    layer = model.model.layers[0]
    counts: collections.Counter = collections.Counter()
    for name in ("input_layernorm", "post_attention_layernorm"):
        getattr(layer, name).register_forward_hook(lambda *_a, name=name: counts.update([name]))
    driver.compress_model(model, CALIB, CompressConfig(grouping="uniform", wbits=4, nsamples=5, batch_size=2, groupsize=0,
                                                       act_order=False, mse=False), "cpu")
    assert counts == {"input_layernorm": 2 * 3, "post_attention_layernorm": 2 * 3}


def test_an_attention_that_changes_o_projs_output_is_run_in_full(monkeypatch, caplog):
    """A layer that breaks the stubs' assumption is detected on the first batch and run in full
    (a stub serving o_proj's output would lose the halving, and the results would differ)."""
    model = _family("llama")
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda _m, _a, out: (out[0] * 0.5, *out[1:]))
    with caplog.at_level("WARNING", logger=step_activations.__name__):
        new = _run(model, monkeypatch, reuse=True)
    assert "self_attn does not return its self_attn.o_proj's output" in caplog.text
    _assert_same(new, _run(model, monkeypatch, reuse=False))


def test_no_room_for_a_cache_means_recomputing(monkeypatch):
    monkeypatch.setattr(step_activations, "free_bytes", lambda _where: 1024)
    _assert_same(_run(_family("llama"), monkeypatch, reuse=True), _reference(monkeypatch))


def test_the_memory_rule():
    """Caches live with the hidden states; down_proj's input never leaves the compute device."""
    hidden = torch.zeros(4, 8, 16)
    passes = step_activations.LayerPasses(torch.nn.Identity(), execution.LayerInputs(hidden, {}, 2), "cuda")  # offloaded
    attn, mlp = passes.tails["self_attn.o_proj"], passes.tails["mlp.down_proj"]
    assert passes._place(attn, (4, 8, 16), torch.float16) == torch.device("cpu")
    assert passes._place(mlp, (4, 8, 64), torch.float16) is None
    on_cpu = step_activations.LayerPasses(torch.nn.Identity(), execution.LayerInputs(hidden, {}, 2), "cpu")
    assert on_cpu._place(mlp, (4, 8, 64), torch.float16) == torch.device("cpu")
    room = step_activations.free_bytes(torch.device("cpu"))
    if room is not None:  # more than half of what is free: recompute
        assert on_cpu._place(mlp, (room // 2 + 1,), torch.uint8) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)")
def test_copying_the_next_layer_ahead_changes_nothing(monkeypatch):
    """Layer i + 1 crosses to the GPU during layer i's output pass (execution.Prefetcher): the
    compressed model is bit for bit the one of copying each layer when its turn comes."""
    model = build_model(200, hidden=64, layers=3, heads=4, kv_heads=2, ffn=128, seed=3).half().eval()
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, nsamples=CALIB.shape[0], batch_size=1, blocksize=32,
                         groupsize=0, act_order=False, mse=False)
    real_start = execution.Prefetcher.start
    states, copies = [], []
    for ahead in (True, False):
        def start(self, module, dtype=None, ahead=ahead):
            got = real_start(self, module, dtype) if ahead else None
            copies.append(got is not None)
            return got

        monkeypatch.setattr(execution.Prefetcher, "start", start)
        m = copy.deepcopy(model)
        driver.compress_model(m, CALIB, cfg, "cuda")
        assert all(p.device.type == "cpu" for p in m.parameters())
        states.append(m.state_dict())
    assert copies == [True, True, False, False]  # layers 1 and 2 were copied ahead in the first run
    for name, t in states[0].items():
        assert torch.equal(t, states[1][name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)")
def test_pinned_write_back_puts_the_device_values_home(monkeypatch):
    """on_device with a HostStaging: the layer goes in through the pinned buffer, and the
    changed device values land in the original host tensors (same storage) on the way out,
    the buffer grown when a larger layer comes; with the limit at 0 the pageable path does the same."""
    staging = execution.HostStaging()
    for limit in (execution.PINNED_MAX_BYTES, 0):
        monkeypatch.setattr(execution, "PINNED_MAX_BYTES", limit)
        for width in (8, 40):
            layer = torch.nn.Sequential(torch.nn.Linear(width, 6).half(), torch.nn.LayerNorm(6).half())
            ptrs = [p.data_ptr() for p in layer.parameters()]
            before = [p.detach().clone() for p in layer.parameters()]
            with execution.on_device(layer, "cuda", staging=staging) as mod:
                for p, b in zip(mod.parameters(), before, strict=True):  # in through the same buffer
                    assert p.device.type == "cuda" and torch.equal(p.cpu(), b)
                for p in mod.parameters():
                    p.data.mul_(3).add_(1)
                want = [p.detach().cpu() for p in mod.parameters()]
            assert [p.data_ptr() for p in layer.parameters()] == ptrs
            for p, w in zip(layer.parameters(), want, strict=True):
                assert p.device.type == "cpu" and torch.equal(p.data, w)
    assert staging._buf is not None and staging._buf.is_pinned()


def test_no_pinned_write_back_off_cuda():
    host = torch.zeros(3)
    assert not execution.HostStaging().copy_back([(torch.ones(3), host)]) and torch.equal(host, torch.zeros(3))


def test_no_copy_ahead_off_cuda():
    layer = torch.nn.Linear(4, 4)
    assert execution.Prefetcher("cpu").start(layer) is None
    assert execution.Prefetcher("cuda", enabled=False).start(layer) is None


def test_refit_scales_describe_the_stored_weights():
    """After the driver's solves, every per-row grid it keeps reproduces the model's weights:
    the refit (misq.algorithms.scale_refit) wrote its scales into those grids."""
    from misq.algorithms.quantizer import quantize_with_grid

    model = copy.deepcopy(_family("llama"))
    cfg = CompressConfig(grouping="uniform", wbits=3, sparsity=0.5, nsamples=5, batch_size=1, blocksize=32, groupsize=0,
                         act_order=False, mse=False)
    out = driver.compress_model(model, CALIB, cfg, "cpu")
    weights = dict(model.named_parameters())
    for name, grid in out.grids.items():
        W = weights[name + ".weight"].detach()
        torch.testing.assert_close(quantize_with_grid(W, grid) * (W != 0), W, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offload", [False, True])
def test_offloading_turns_off_the_descents_recorded_passes(offload, monkeypatch):
    """--offload-activations is for the smallest GPU: the driver's solves then keep no memory for the
    descent's CUDA graphs (SolverOptions.record_descent); otherwise they may record them."""
    seen = []
    real = driver.solve

    def spy(*args, **kwargs):
        seen.append(kwargs["options"].record_descent)
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "solve", spy)
    cfg = CompressConfig(grouping="uniform", wbits=4, sparsity=0.5, nsamples=5, batch_size=1, blocksize=32, groupsize=0,
                         act_order=False, mse=False, offload_activations=offload)
    driver.compress_model(copy.deepcopy(_family("llama")), CALIB, cfg, "cpu")
    assert seen and set(seen) == {not offload}
