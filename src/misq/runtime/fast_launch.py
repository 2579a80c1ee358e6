"""Launching a Triton kernel again with most of its arguments unchanged, at a fraction of the
host time ``kernel[grid](...)`` takes.

Why: a prompt through a packed model is as fast as the host launches its kernels when the
layers are small or the prompt short (BENCHMARKS.md, session 12: about 30 µs a Triton launch on
the H200 machine's host, where ``F.linear`` took 21 µs). Each ``kernel[grid](...)`` binds and
specializes every argument and looks the compiled kernel up, and the driver's launcher then
calls ``data_ptr()`` and asks CUDA (``cuPointerGetAttribute``, one driver call) about every
tensor argument: a decode launch has up to 30. Between two calls of a packed layer only x, the
output, scratch buffers and the row count change; :class:`BoundLaunch` keeps the rest (the
weights' pointers as plain integers) and, once Triton has compiled the kernel for the changing
arguments' specialization, hands the compiled kernel's launcher the whole argument list itself.

Correctness rests on what Triton specializes a kernel on: each tensor's dtype and whether its
address is a multiple of 16, each integer's being 1 or a multiple of 16 (and its width). The
changing arguments' key below covers all of these, so a call whose key was not seen before goes
through ``kernel[grid](...)`` (which compiles or finds the right variant) and is remembered. Under
Triton's CPU interpreter, or while a launch hook (a profiler) is installed, every call takes that
path. The fixed tensors are held here, so their memory cannot be freed under the integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # CPU-only installs never launch one (runtime.triton_common.HAVE_TRITON)
    knobs = driver = JITFunction = None


class Slot:
    """A launch argument given at each call: the ``index``-th value passed to
    :meth:`BoundLaunch.__call__`, or, ``offset`` > 0, a pointer ``offset`` elements past that
    tensor's first element (a column slice's start, say)."""

    __slots__ = ("index", "offset")

    def __init__(self, index: int, offset: int = 0):
        self.index, self.offset = index, offset


def _key(v: Any) -> Any:
    """What Triton specializes a non-tensor kernel argument on (see the module docstring)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v == 1, v % 16 == 0, -2 ** 31 <= v < 2 ** 31
    return type(v), v


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is installed: Triton 3.6 keeps a chain (empty when none), a user may
    set a function."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    """A launch grid of one to three axes, as the launcher takes it (three)."""
    return tuple(grid) + (1,) * (3 - len(grid))


class BoundLaunch:
    """``fn[grid](*args, **consts, num_warps=..., num_stages=...)`` with every argument but the
    :class:`Slot` ones fixed. ``args``: the kernel's leading (non-constexpr) arguments in order;
    ``consts``: every other parameter by name (the constexprs); ``num_warps`` / ``num_stages``:
    Triton's defaults when None; ``launch_pdl``: launched as a programmatic dependent launch;
    ``maxnreg`` > 0: compiled to use at most that many registers a thread. Calling it with the
    slots' values launches the kernel on the current stream."""

    def __init__(self, fn: Any, grid: tuple[int, ...], args: Sequence[Any], consts: dict[str, Any],
                 num_warps: int | None = None, num_stages: int | None = None, launch_pdl: bool = False,
                 maxnreg: int = 0):
        names = list(fn.arg_names)
        missing = [n for n in names[len(args):] if n not in consts]
        if missing or len(args) + len(consts) != len(names):
            raise TypeError(f"{names[0]}...: {len(args)} arguments and {sorted(consts)} do not cover {names}")
        self.fn, self.grid = fn, _grid3(grid)
        self.args, self.consts = list(args), consts
        # Triton's defaults where not given, as a plain launch would have them
        self.options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
        if launch_pdl:  # a programmatic dependent of the kernel before it (Hopper): it may start early
            self.options["launch_pdl"] = True
        if maxnreg:  # at most this many registers a thread (Triton's compile option)
            self.options["maxnreg"] = maxnreg
        self._slots = [(i, a.index, a.offset) for i, a in enumerate(self.args) if isinstance(a, Slot)]
        # the launcher's argument list: pointers of fixed tensors as integers, constexprs in place
        self._template = [a.data_ptr() if isinstance(a, Tensor) else a for a in self.args]
        self._template += [consts[n] for n in names[len(args):]]
        self._compiled: dict[tuple, Any] = {}  # (device, the slots' keys) -> compiled kernel
        # Triton's CPU interpreter runs the function itself: nothing compiled to launch again
        self._reuse = isinstance(fn, JITFunction)

    def __call__(self, *values: Any, grid: tuple[int, ...] | None = None) -> None:
        """Launch with the slots' values (``grid``: this call's, when it is not the bound one)."""
        if not self._reuse:
            self._jit_launch(values, (), self.grid if grid is None else _grid3(grid))
            return
        device = driver.active.get_current_device()
        full = self._template.copy()
        key = [device]
        for i, index, offset in self._slots:
            v = values[index]
            if isinstance(v, Tensor):  # what Triton specializes on: the dtype, the address's alignment
                ptr = v.data_ptr() + offset * v.element_size() if offset else v.data_ptr()
                key += (v.dtype, ptr & 15 == 0, v.is_cuda)  # a host tensor goes to Triton, which refuses it
                full[i] = ptr
            else:
                key.append(_key(v))
                full[i] = v
        key = tuple(key)
        kernel = self._compiled.get(key)
        g0, g1, g2 = self.grid if grid is None else _grid3(grid)
        if kernel is None or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            self._jit_launch(values, key, (g0, g1, g2))
            return
        kernel.run(g0, g1, g2, driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata,
                   None, None, None, *full)

    def _jit_launch(self, values: Sequence[Any], key: tuple, grid: tuple[int, int, int]) -> None:
        """Triton's own launch (compiling if needed); its compiled kernel is kept for ``key``."""
        args = list(self.args)
        for i, index, offset in self._slots:
            v = values[index]
            # a pointer into v: a one-element view there (the kernel reads the address only)
            args[i] = torch.as_strided(v, (1,), (1,), v.storage_offset() + offset) if offset else v
        kernel = self.fn[grid](*args, **self.consts, **self.options)  # the interpreter's returns nothing
        if kernel is not None and self._reuse:
            self._compiled[key] = kernel

