"""One forward per decoder layer during its sequential compression (issue 17).

The driver compresses a layer step by step (q/k/v -> o -> gate/up -> down, see
:data:`misq.models.layout.SEQUENTIAL_STEPS`); each step needs the input of its first linear
*with the earlier steps already compressed*. Running the layer from its input up to that
linear for every step, and once more for its output, costs about four partial forwards and a
full one. :class:`LayerPasses` runs each pass from where the previous one left off instead:

* q/k/v: the layer runs up to ``q_proj`` (the input norm only);
* o: the layer runs up to ``o_proj``, whose input X_o [n, seqlen, heads*head_dim] is kept;
  once o_proj is solved, the attention's output o_proj(X_o) [n, seqlen, d] replaces it;
* gate/up: the layer runs with ``self_attn`` replaced by a stub that returns that cached output
  (the norms and the residual run, q/k/v and the attention do not), up to ``gate_proj``;
* down: the same, up to ``down_proj`` (gate/up run once, compressed); its input X_d
  [n, seqlen, ffn] is kept when the memory rule allows (:meth:`LayerPasses._down_input_fits`);
* output: the layer runs with the attention stub and, when X_d was kept, an ``mlp`` stub that
  returns down_proj(X_d); otherwise the real MLP recomputes gate/up.

The stubs rely only on the decoder layer calling ``self.self_attn(...)`` and ``self.mlp(...)``
once per forward and on those modules returning their last linear's output (as a tensor or as
the first element of a tuple), which is true of every LLaMA-family layer misq knows (Llama,
Mistral, Qwen2/3, Gemma): everything else the layer does (Gemma's norms, Qwen3's q/k norms
inside the attention, residuals) still runs its own code. The first window batch of a caching
pass checks both assumptions (the module's output against its last linear's), and a layer that
breaks them is simply run in full. On the CPU every result is bit for bit the one of running
the whole layer for each step: the same kernels see the same tensors in the same batches.

A stubbed module's input is never read, so the norm that only feeds it (``input_layernorm``
before the attention; the MLP's own norm before the MLP) is skipped too while the stub stands
in: 4 of the 8 RMSNorm runs per window (fp32 elementwise passes over [seqlen, d], ~75 ms of a
13B layer). A norm is skipped only after a pass in which its module ran showed that the norm's
output is exactly that module's input, and never when the same norm also feeds the other one.

Caches live where the hidden states live (the accelerator, or the CPU under
``--offload-activations``), each batch going to the compute device when a pass needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from misq.models import execution

log = logging.getLogger(__name__)

# A cache is made only when it takes at most this share of the memory free where it would live:
# the rest is for the solves (down_proj's Hessian and its inverse alone take 2·ffn² fp32 values).
CACHE_FREE_FRACTION = 0.5

# Private switches for the equality tests: _REUSE = False runs every step's pass from the layer's
# input and the output with the whole layer (the driver before issue 17); _CACHE_DOWN_INPUT
# forces (True) or forbids (False) keeping down_proj's input instead of the memory rule (None).
_REUSE = True
_CACHE_DOWN_INPUT: bool | None = None

_UNKNOWN = -1  # a tail's output structure before its first batch was seen

# The norm in front of each stubbable module in LLaMA-family layers (Gemma 2/3 put
# pre_feedforward_layernorm before the MLP and apply post_attention_layernorm to the attention's
# output). Only a candidate: a pass checks that its output *is* the module's input.
_NORM_CANDIDATES = {"self_attn": ("input_layernorm",), "mlp": ("pre_feedforward_layernorm", "post_attention_layernorm")}


@dataclass
class _Tail:
    """A module of the layer (attention, MLP) whose output is its last linear's output.

    store: the linear's input [n, seqlen, C] while it is being solved, then (``outputs``) what
    the stub returns from: the module's output [n, seqlen, d] (attention), or still the input
    (MLP: the stub applies the solved linear itself, it is used once).
    arity: None when the module returns a tensor, k when a k-tuple whose first element is it.
    """

    module: str  # "self_attn"
    linear: str  # "self_attn.o_proj"
    precompute: bool  # replace the kept input by the module's output once the linear is solved
    store: Tensor | None = None
    arity: int | None = _UNKNOWN
    ready: bool = False  # the stub may stand in for the module
    enabled: bool = True  # False: this layer runs the module in full (no room, or it broke the assumptions)
    norm: str | None = None  # the norm whose output is the module's input, once a pass has shown it


class _Stub(nn.Module):
    """Stands in for a layer's attention or MLP: serves the cached output window by window."""

    def __init__(self, serve: Callable[[slice], Tensor], arity: int | None, n: int, name: str):
        super().__init__()
        self.serve, self.arity, self.n, self.name = serve, arity, n, name
        self.cursor = 0  # the next window: a pass goes over the windows in order, one batch per layer call

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple:
        x = args[0] if args else kwargs["hidden_states"]
        sl = slice(self.cursor, self.cursor + x.shape[0])
        if sl.stop > self.n:
            raise RuntimeError(f"the decoder layer called {self.name} more than once per forward: "
                               "misq's step activations assume one call (LLaMA-family layers)")
        self.cursor = sl.stop
        out = self.serve(sl)
        return out if self.arity is None else (out,) + (None,) * (self.arity - 1)


class _PassThrough(nn.Module):
    """Stands in for a norm whose only consumer is a stub (which reads no values of its input)."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x


class LayerPasses:
    """The passes of one decoder layer (on ``device``) over all windows of ``inputs``.

    Use as a context manager: the caches are freed on exit. ``step_inputs`` for each step in
    order, ``solved`` after each step's weights are final on this rank, ``output`` last.
    """

    def __init__(self, layer: nn.Module, inputs: execution.LayerInputs, device: torch.device | str):
        self.layer, self.inputs, self.device = layer, inputs, torch.device(device)
        self.storage = inputs.hidden.device
        self.n = inputs.hidden.shape[0]
        self.reuse = _REUSE
        self.tails = {t.linear: t for t in (_Tail("self_attn", "self_attn.o_proj", precompute=True),
                                            _Tail("mlp", "mlp.down_proj", precompute=False))}

    def __enter__(self) -> LayerPasses:
        return self

    def __exit__(self, *exc: Any) -> None:
        for tail in self.tails.values():
            tail.store = None

    # -- the passes -------------------------------------------------------------------------
    @torch.no_grad()
    def step_inputs(self, first: str, consume: Callable[[Tensor], None]) -> None:
        """Hand ``consume`` the input x [b, seqlen, C] of linear ``first`` (a dotted name inside
        the layer) for every window batch, in order; the forward stops right after it."""
        tail = self.tails.get(first) if self.reuse else None
        linear = self.layer.get_submodule(first)
        batch: list[slice] = []  # the current batch, for the hooks
        seen: dict[str, Tensor] = {}

        def before(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            consume(x)
            if tail is not None and tail.enabled and self._keep(tail, batch[0], x) and tail.arity == _UNKNOWN:
                return  # the first batch runs the module to its end once: _learn checks its output
            raise execution.StopForward

        handles = [linear.register_forward_pre_hook(before)]
        watching = self._watch_norms(first)  # removed after the first batch (or on an error, below)
        if tail is not None and tail.enabled and tail.arity == _UNKNOWN:
            handles.append(linear.register_forward_hook(lambda _m, _a, out: seen.__setitem__("linear", out)))
            handles.append(self.layer.get_submodule(tail.module).register_forward_hook(
                lambda _m, _a, out: self._learn(tail, out, seen.pop("linear", None))))
        try:
            with self._stubbed():
                for sl in execution.window_batches(self.n, self.inputs.batch_size):
                    batch[:] = [sl]
                    try:
                        execution.call_layer(self.layer, self.inputs.hidden[sl].to(self.device),
                                             self.inputs.batch_kwargs(sl.stop - sl.start, self.device))
                    except execution.StopForward:
                        pass
                    for h in watching:  # one batch shows which norm feeds which module
                        h.remove()
                    if len(handles) > 1 and tail.arity != _UNKNOWN:
                        for h in handles[1:]:
                            h.remove()
                        del handles[1:]
        finally:
            for h in handles + watching:  # removing a handle twice is harmless
                h.remove()

    @torch.no_grad()
    def solved(self, step: tuple[str, ...]) -> None:
        """The weights of ``step`` are final on this rank: a tail whose linear it holds may stand in."""
        for name in step:
            tail = self.tails.get(name)
            if tail is None or tail.store is None or not tail.enabled:
                continue
            if tail.precompute:
                self._precompute(tail)
            tail.ready = tail.store is not None

    @torch.no_grad()
    def output(self, out: Tensor) -> Tensor:
        """The compressed layer's output [n, seqlen, d] into ``out`` (may be ``inputs.hidden``)."""
        with self._stubbed():
            return execution.run_layer(self.layer, self.inputs, self.device, out=out)

    # -- the caches -------------------------------------------------------------------------
    def _keep(self, tail: _Tail, sl: slice, x: Tensor) -> bool:
        """Store batch ``sl`` of ``tail``'s linear input; False when this layer keeps none."""
        if tail.store is None:
            shape = (self.n, *x.shape[1:])
            where = self._place(tail, shape, x.dtype)
            if where is None:
                tail.enabled = False
                return False
            tail.store = torch.empty(shape, dtype=x.dtype, device=where)
        tail.store[sl] = x.to(tail.store.device)
        return True

    def _place(self, tail: _Tail, shape: tuple[int, ...], dtype: torch.dtype) -> torch.device | None:
        """Where ``tail``'s cache of ``shape`` goes, or None to recompute the module instead.

        The rule: a cache lives with the hidden states and only if it takes at most
        :data:`CACHE_FREE_FRACTION` of the memory free there. down_proj's input [n, seqlen, ffn]
        is also never kept off the compute device (``--offload-activations``): sending it to the
        host and back costs more than recomputing gate/up, two GEMMs, in the output pass.
        """
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if tail.linear == "mlp.down_proj":
            if _CACHE_DOWN_INPUT is not None:
                return self.storage if _CACHE_DOWN_INPUT else None
            if not _same_device(self.storage, self.device):
                return None
        room = free_bytes(self.storage)
        if room is not None and nbytes > CACHE_FREE_FRACTION * room:
            log.info("%s: its %.2f GiB cache does not fit in %.2f GiB free on %s: this layer runs %s in full",
                     tail.linear, nbytes / 1024**3, room / 1024**3, self.storage, tail.module)
            return None
        return self.storage

    def _learn(self, tail: _Tail, out: Any, linear_out: Tensor | None) -> None:
        """From the first batch: what ``tail.module`` returns, and whether it is its linear's output."""
        first = out[0] if isinstance(out, tuple) and out else out
        same = isinstance(first, Tensor) and linear_out is not None and (first is linear_out or torch.equal(first, linear_out))
        if not same:
            log.warning("%s does not return its %s's output: the layer's passes run it in full", tail.module, tail.linear)
            tail.enabled, tail.store = False, None
        tail.arity = len(out) if isinstance(out, tuple) else None
        raise execution.StopForward

    def _precompute(self, tail: _Tail) -> None:
        """Replace the kept input X [n, seqlen, C] of ``tail``'s solved linear by its output [n, seqlen, R]."""
        linear = self.layer.get_submodule(tail.linear)
        src = tail.store
        dst = src if src.shape[-1] == linear.out_features else None
        if dst is None:
            shape = (*src.shape[:-1], linear.out_features)
            if self._place(tail, shape, src.dtype) is None:
                tail.enabled, tail.store = False, None
                return
            dst = torch.empty(shape, dtype=src.dtype, device=src.device)
        for sl in execution.window_batches(self.n, self.inputs.batch_size):  # the batches the layer saw: the same GEMMs
            dst[sl] = linear(src[sl].to(self.device)).to(dst.device)
        tail.store = dst

    @contextmanager
    def _stubbed(self) -> Iterator[None]:
        """The ready tails' modules are stubs inside the block, the real ones again after it."""
        swapped: list[tuple[str, nn.Module]] = []
        try:
            stubbed = [t for t in self.tails.values() if self.reuse and t.ready and t.enabled]
            for tail in stubbed:
                swapped.append((tail.module, self.layer.get_submodule(tail.module)))
                setattr(self.layer, tail.module, _Stub(self._server(tail), tail.arity, self.n, tail.module))
            running = {t.norm for t in self.tails.values() if t not in stubbed}
            for tail in stubbed:  # its input is never read: the norm that only feeds it need not run
                if tail.norm is not None and tail.norm not in running:
                    swapped.append((tail.norm, self.layer.get_submodule(tail.norm)))
                    setattr(self.layer, tail.norm, _PassThrough())
            yield
        finally:
            for name, module in swapped:
                setattr(self.layer, name, module)

    def _watch_norms(self, first: str) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks for the first batch of the pass to ``first``: for each module that runs in full
        up to its input in this pass and has no known norm yet, whether a candidate norm's
        output is exactly that input (then ``tail.norm`` is set)."""
        handles = []
        for tail in self.tails.values():
            if not self.reuse or tail.norm is not None or tail.ready or not first.startswith(tail.module + "."):
                continue
            names = [n for n in _NORM_CANDIDATES.get(tail.module, ()) if isinstance(getattr(self.layer, n, None), nn.Module)]
            if not names:
                continue
            outputs: dict[str, Tensor] = {}
            for name in names:
                handles.append(getattr(self.layer, name).register_forward_hook(
                    lambda _m, _a, out, name=name, outputs=outputs: outputs.__setitem__(name, out)))

            def check(_m: nn.Module, args: tuple, kwargs: dict, tail: _Tail = tail, outputs: dict = outputs) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                tail.norm = next((n for n, out in outputs.items() if out is x), None)

            handles.append(self.layer.get_submodule(tail.module).register_forward_pre_hook(check, with_kwargs=True))
        return handles

    def _server(self, tail: _Tail) -> Callable[[slice], Tensor]:
        store, device = tail.store, self.device
        if tail.precompute:
            # A copy even on the device: the layer must not be able to change the cache in place.
            return lambda sl: store[sl].to(device, copy=True)
        linear = self.layer.get_submodule(tail.linear)
        return lambda sl: linear(store[sl].to(device))


def free_bytes(where: torch.device) -> int | None:
    """Memory a new tensor can still take on ``where`` (torch's cached blocks included); None if unknown."""
    if where.type == "cuda":
        free, _total = torch.cuda.mem_get_info(where)
        return free + torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(where)
    if where.type == "cpu":
        from misq.models.streaming import available_host_bytes

        return available_host_bytes()
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when either leaves the index open."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
