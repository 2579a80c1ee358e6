"""misq.runtime.fast_launch on the CPU: a kernel launched again through its compiled launcher gets
the same arguments Triton's own launch would (fixed tensors as their addresses, the slots' values,
the constexprs in the kernel's order), and anything Triton specializes on that changed goes back
through Triton. Triton's launch and the compiled kernel are stand-ins that record their calls (the
real ones need a GPU; tests/test_runtime_gpu.py runs them there); and PackedLinear drops its
bound launches whenever its buffers move or change."""

from __future__ import annotations

import copy

import pytest
import torch

triton = pytest.importorskip("triton")

from misq.runtime import fast_launch  # noqa: E402
from misq.runtime.fast_launch import BoundLaunch, Slot  # noqa: E402


@triton.jit
def _kernel(out_ptr, w_ptr, x_ptr, n, m, BLOCK: triton.language.constexpr, FLAG: triton.language.constexpr):
    pass


class _Compiled:
    """Stands in for triton.compiler.CompiledKernel: records what its launcher gets."""

    packed_metadata = "meta"
    function = "fn-handle"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("fast", args))


class _Driver:
    class active:  # mirrors triton.runtime.driver.active
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)


@pytest.fixture
def launched(monkeypatch):
    log: list = []

    def jit_run(*args, grid, warmup, **kwargs):
        log.append(("jit", grid, args, kwargs))
        return _Compiled(log)

    monkeypatch.setattr(_kernel, "run", jit_run)
    monkeypatch.setattr(fast_launch, "driver", _Driver)
    return log


def test_second_call_goes_straight_to_the_compiled_launcher(launched):
    w = torch.zeros(64, dtype=torch.int32)
    launch = BoundLaunch(_kernel, (3, 2), [Slot(1), w, Slot(0, 8), 77, Slot(2)], {"BLOCK": 64, "FLAG": True}, 4, 2)
    x, out = torch.zeros(64, dtype=torch.float16), torch.zeros(32)
    launch(x, out, 5)
    kind, grid, args, kwargs = launched[0]
    assert kind == "jit" and grid == (3, 2, 1)
    assert args[0] is out and args[1] is w and args[3] == 77 and args[4] == 5
    assert args[2].data_ptr() == x.data_ptr() + 16  # 8 fp16 elements on
    assert kwargs == {"BLOCK": 64, "FLAG": True, "num_warps": 4, "num_stages": 2}

    launch(x, out, 5)
    kind, args = launched[1]
    assert kind == "fast"
    assert args[:7] == (3, 2, 1, 1234, "fn-handle", "meta", None)
    assert args[9:] == (out.data_ptr(), w.data_ptr(), x.data_ptr() + 16, 77, 5, 64, True)

    launch(x, out, 5, grid=(7,))  # a grid of this call only
    assert launched[2][1][:3] == (7, 1, 1)
    assert len(launched) == 3


def test_a_changed_specialization_goes_back_through_triton(launched):
    launch = BoundLaunch(_kernel, (1,), [Slot(0), Slot(1), Slot(1), Slot(2), 3], {"BLOCK": 16, "FLAG": False})
    out, x = torch.zeros(64), torch.zeros(64, dtype=torch.float16)
    launch(out, x, 2)
    launch(out, x, 2)
    assert [k[0] for k in launched] == ["jit", "fast"]
    launch(out, x, 1)  # Triton makes 1 a constant
    launch(out, x, 32)  # ... and marks multiples of 16
    launch(out, x.view(-1)[1:], 32)  # an address off 16 bytes
    launch(out.half(), x, 2)  # another dtype
    assert [k[0] for k in launched] == ["jit", "fast", "jit", "jit", "jit", "jit"]
    launch(out, x, 1)
    assert launched[-1][0] == "fast"
    assert launched[2][3] == {"BLOCK": 16, "FLAG": False}  # Triton's own warps and stages when not given


def test_launch_hooks_see_every_launch(launched, monkeypatch):
    launch = BoundLaunch(_kernel, (1,), [Slot(0), Slot(0), Slot(0), 1, 2], {"BLOCK": 16, "FLAG": False})
    t = torch.zeros(16)
    launch(t)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    launch(t)
    assert [k[0] for k in launched] == ["jit", "jit"]


def test_register_cap_goes_to_triton_and_the_large_4bit_default_sets_it(launched):
    from misq.runtime.launch_plan import default_config

    t = torch.zeros(16)
    BoundLaunch(_kernel, (1,), [Slot(0), Slot(0), Slot(0), 1, 2], {"BLOCK": 16, "FLAG": False}, 2, maxnreg=72)(t)
    assert launched[0][3] == {"BLOCK": 16, "FLAG": False, "num_warps": 2, "maxnreg": 72}
    # 14 programs an SM on the 13B MLP-sized 4-bit layers at batch 1; 5120 x 5120 and 3 bits as the compiler picks
    assert default_config(1, 4, 13824, 5120).maxnreg == 72 and default_config(1, 4, 13824, 5120).target_programs == 14 * 132
    assert default_config(1, 4, 5120, 5120).maxnreg == 0 and default_config(1, 3, 13824, 5120).maxnreg == 0


def test_arguments_must_cover_the_kernel():
    with pytest.raises(TypeError, match="do not cover"):
        BoundLaunch(_kernel, (1,), [Slot(0), Slot(0), Slot(0), 1], {"BLOCK": 16, "FLAG": False})


def test_packed_linear_drops_its_launches_when_buffers_change():
    from runtime_layers import random_layer

    lin = random_layer(8, 64, (4,), 32, "dense", seed=0)[0]
    lin._plans["prefill"] = "bound"
    twin = copy.deepcopy(lin)
    assert twin._plans == {} and lin._plans == {"prefill": "bound"}
    lin.bias = torch.zeros(8, dtype=torch.float16)
    assert lin._plans == {}
    lin._plans["prefill"] = "bound"
    lin.to("cpu")
    assert lin._plans == {}
    lin._plans["prefill"] = "bound"
    lin.some_attribute = 1  # not a buffer
    assert lin._plans == {"prefill": "bound"}


def test_decode_plans_follow_rows_and_launch_settings():
    """One plan per row bucket, made again when the tuned settings change (benchmarks tune them
    between calls) or other settings are asked for."""
    from runtime_layers import random_layer

    from misq.runtime import launch_plan

    lin = random_layer(8, 300, (3, 4), 128, "dense", seed=0)[0]
    one, sixteen = lin.decode_plan(1), lin.decode_plan(16)
    assert lin.decode_plan(1) is one and lin.decode_plan(2) is sixteen and one is not sixteen
    assert [type(s).__name__ for s in one.steps] == ["_H2Step"]  # the mixed pair: one launch
    key = ("m1", 3, 8, 300)
    try:
        launch_plan.TUNED[key] = launch_plan.Config("fma", 64, 132, 4)
        retuned = lin.decode_plan(1)
        assert retuned is not one and [type(s).__name__ for s in retuned.steps] == ["_TileStep", "_H2Step"]
    finally:
        launch_plan.TUNED.pop(key, None)
    other = lin.decode_plan(1, [launch_plan.Config("mma", 64, 132, 4)] * 2)
    assert [type(s).__name__ for s in other.steps] == ["_MmaStep"]
