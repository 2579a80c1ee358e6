"""Running decoder layers one at a time: capture layer 0's inputs, run a layer over all
calibration windows, move a layer to the accelerator and back.

Layer-by-layer execution is what lets a 13B model run on one modest GPU: the embeddings run
once, layer 0's inputs are captured together with *every* keyword argument the model passes
it (transformers 5.x hands over ``position_embeddings`` and may pass ``attention_mask=None``),
and then one decoder layer at a time is moved to the accelerator, run on all sequences, and
moved back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from misq.models.layout import decoder_layers


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs we need have been seen."""


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, for all sequences, plus the layer's kwargs.

    hidden: [n, seqlen, d] on ``storage`` (the accelerator, or the CPU when offloading)
    kwargs: every keyword argument the model passed to layer 0 for a batch of ``batch_size``
    """

    hidden: Tensor
    kwargs: dict[str, Any]
    batch_size: int

    def batch_kwargs(self, n: int, device: torch.device | str) -> dict[str, Any]:
        """kwargs for a batch of ``n`` sequences on ``device`` (slicing per-sequence tensors)."""
        return {k: _to_device(_fit_batch(v, self.batch_size, n), device) for k, v in self.kwargs.items()}


def _fit_batch(value: Any, captured: int, n: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and captured > 1 and value.shape[0] == captured and n != captured:
        return value[:n]
    if isinstance(value, tuple):
        return tuple(_fit_batch(v, captured, n) for v in value)
    return value


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def window_batches(n: int, batch_size: int) -> Iterator[slice]:
    """The window slices of every pass over ``n`` windows: each pass uses the same batches, so
    the same kernels see the same tensors (what keeps results bit for bit across passes)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, input_ids: Tensor, device: torch.device | str, *, batch_size: int = 8,
    storage: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
) -> LayerInputs:
    """Run the embeddings on ``input_ids`` [n, seqlen] and capture what layer 0 receives.

    Only the embedding, rotary and (for some models) norm modules visit ``device``.
    """
    storage = storage or device
    layers = decoder_layers(model)
    inner = model.model
    small = [m for name, m in inner.named_children() if name != "layers"]
    dtype = compute_dtype or next(model.parameters()).dtype
    n, seqlen = input_ids.shape
    hidden = torch.empty(n, seqlen, model.config.hidden_size, dtype=dtype, device=storage)
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache", "hidden_states")}
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    kwargs: dict[str, Any] = {}
    try:
        for m in small:
            m.to(device=device)
        for sl in window_batches(n, batch_size):
            try:
                model(input_ids=input_ids[sl].to(device), use_cache=False)
            except StopForward:
                pass
            hidden[sl] = captured["hidden"].to(device=storage, dtype=dtype)
            if not kwargs:
                kwargs = {k: _cast_float(v, dtype) for k, v in captured["kwargs"].items()}
    finally:
        handle.remove()
        for m in small:
            m.to("cpu")
    return LayerInputs(hidden=hidden, kwargs=kwargs, batch_size=min(batch_size, n))


def _cast_float(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast_float(v, dtype) for v in value)
    return value


def call_layer(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """One decoder layer on one batch; transformers 4.x returns a tuple, 5.x a tensor."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device | str, out: Tensor | None = None) -> Tensor:
    """Run ``layer`` (already on ``device``) over all sequences of ``inputs``; returns [n, seqlen, d].

    ``out`` may be ``inputs.hidden`` itself: each batch is read before it is overwritten.
    """
    hidden = inputs.hidden
    out = torch.empty_like(hidden) if out is None else out
    for sl in window_batches(hidden.shape[0], inputs.batch_size):
        kw = inputs.batch_kwargs(sl.stop - sl.start, device)
        out[sl] = call_layer(layer, hidden[sl].to(device), kw).to(out.device)
    return out


def _host_to_device_only(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Does moving ``module`` to ``device``/``dtype`` only copy host tensors to an accelerator?"""
    p = next(module.parameters())
    return (dtype is None or dtype == p.dtype) and p.device.type == "cpu" and torch.device(device).type != "cpu"


# A layer of at most this many bytes crosses between host and device through a pinned buffer
# (:class:`HostStaging`); a larger one (a 70B layer, 1.7 GB) is copied from or into pageable memory.
PINNED_MAX_BYTES = 1 << 30
PINNED_PREFETCH = True  # layers copied ahead (:class:`Prefetcher`) go through pinned memory too


class HostStaging:
    """One reused page-locked host buffer for moving decoder layers between host and CUDA.

    A copy between pageable memory and the GPU goes through the driver's small bounce buffers
    at a fraction of the bus's speed, blocks the calling thread, and holds up kernel launches
    from other threads meanwhile (42 ms to write a 13B layer back on an H200, with the GPU
    idle). Through pinned memory the bus runs at full speed as one DMA; the step between pinned
    and the layer's own host storage is a multi-threaded host copy, which never touches CUDA.
    """

    def __init__(self) -> None:
        self._buf: Tensor | None = None

    def views(self, like: list[Tensor]) -> list[Tensor] | None:
        """Pinned tensors shaped and typed as ``like``, carved from the buffer (grown as needed;
        the previous views are invalid then); None where the total exceeds
        :data:`PINNED_MAX_BYTES`."""
        sizes = [_aligned(t.numel() * t.element_size()) for t in like]
        if not like or sum(sizes) > PINNED_MAX_BYTES:
            return None
        if self._buf is None or self._buf.numel() < sum(sizes):
            self._buf = None  # the old buffer is unpinned before the larger one is pinned
            self._buf = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        out, offset = [], 0
        for t, size in zip(like, sizes):
            out.append(self._buf[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
            offset += size
        return out

    def copy_in(self, hosts: list[Tensor], device: torch.device | str) -> list[Tensor] | None:
        """Copies of ``hosts`` on CUDA ``device``: host copies into the pinned buffer, then one
        DMA each, queued on the current stream (the buffer must not be written again before
        they are done); None (nothing done) where pinned memory does not apply: off CUDA, or
        too large."""
        views = self.views(hosts) if torch.device(device).type == "cuda" else None
        if views is None:
            return None
        for view, host in zip(views, hosts):
            view.copy_(host)
        return [view.to(device, non_blocking=True) for view in views]

    def copy_back(self, pairs: list[tuple[Tensor, Tensor]]) -> bool:
        """Copy each (device tensor, its host storage) pair's device values into the host
        tensor; False (nothing done) where pinned memory does not apply: off CUDA, or too large."""
        if not all(d.is_cuda for d, _h in pairs):
            return False
        views = self.views([d for d, _h in pairs])
        if views is None:
            return False
        for (dev, _host), view in zip(pairs, views):
            view.copy_(dev, non_blocking=True)
        torch.cuda.current_stream(pairs[0][0].device).synchronize()
        for (_dev, host), view in zip(pairs, views):
            host.copy_(view)
        return True


def _aligned(nbytes: int, to: int = 64) -> int:
    return (nbytes + to - 1) // to * to


class DeviceCopy:
    """``module``'s parameters and buffers being copied from host memory to CUDA ``device`` in
    the background: a worker thread issues the copies on ``stream``, so that decoder layer
    i + 1 crosses the bus while layer i still computes (68 ms of a 13B layer's 1.2 s otherwise).

    :func:`on_device` takes it (``ready=``) instead of copying; the copies join the caller's
    stream there. Costs one extra layer of device memory while both are resident.
    """

    def __init__(self, module: nn.Module, device: torch.device, stream: torch.cuda.Stream,
                 staging: HostStaging | None = None):
        self.device, self.stream, self.staging = device, stream, staging
        self.hosts = [t.data for t in itertools.chain(module.parameters(), module.buffers())]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="misq-h2d")
        self._future = pool.submit(self._copy)
        pool.shutdown(wait=False)

    def _copy(self) -> tuple[list[Tensor], torch.cuda.Event]:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            copies = self.staging.copy_in(self.hosts, self.device) if self.staging is not None else None
            staged = copies is not None  # else pageable memory: each copy returns once it is there
            if not staged:
                copies = [h.to(self.device) for h in self.hosts]
            done = torch.cuda.Event()
            done.record(self.stream)
            if staged:
                done.synchronize()  # the buffer is free for the next layer once this returns
        return copies, done

    def take(self) -> list[Tensor]:
        """The device copies, in the order of ``module``'s parameters then buffers, usable on
        the current stream."""
        copies, done = self._future.result()
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for c in copies:  # allocated on the copy stream, used and freed on this one
            c.record_stream(stream)
        return copies


class Prefetcher:
    """Starts :class:`DeviceCopy` of decoder layers to CUDA ``device`` ahead of their turn, all
    on one side stream (so that the allocator reuses one layer's worth of blocks); a no-op
    (``start`` gives None) when disabled or off CUDA, or where a move is more than a host copy."""

    def __init__(self, device: torch.device | str, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda"
        self._stream: torch.cuda.Stream | None = None
        self._staging = HostStaging()  # its own buffer: a copy ahead can overlap a write-back

    def start(self, module: nn.Module, dtype: torch.dtype | None = None) -> DeviceCopy | None:
        if not (self.enabled and _host_to_device_only(module, self.device, dtype)):
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return DeviceCopy(module, self.device, self._stream, self._staging if PINNED_PREFETCH else None)


@contextmanager
def on_device(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None,
              ready: DeviceCopy | None = None, staging: HostStaging | None = None) -> Iterator[nn.Module]:
    """Temporarily move ``module`` to ``device`` (and ``dtype``), then back to where it was.

    When only the device changes, the tensors are copied back into their original host
    storage instead of fresh allocations: faulting in new host pages for every layer cost
    0.45 s per 13B layer, the copy 0.04 s (through ``staging``'s pinned buffer where given,
    less). ``ready``: the copies a :class:`Prefetcher` started for this module (its host
    tensors must not have changed since).
    """
    p = next(module.parameters())
    home_device, home_dtype = p.device, p.dtype
    if not _host_to_device_only(module, device, dtype):
        module.to(device=device, dtype=dtype or home_dtype)
        try:
            yield module
        finally:
            module.to(device=home_device, dtype=home_dtype)
        return
    homes = [(t, t.data) for t in itertools.chain(module.parameters(), module.buffers())]
    hosts = [host for _t, host in homes]
    copies = None
    if ready is not None:
        copies = ready.take()
    elif staging is not None:  # the buffer's next writer, the write-back below, syncs first
        copies = staging.copy_in(hosts, device)
    if copies is None:  # straight from pageable memory
        copies = [host.to(device) for host in hosts]
    for (t, _host), copy in zip(homes, copies, strict=True):
        t.data = copy
    try:
        yield module
    finally:
        if staging is None or not staging.copy_back([(t.data, host) for t, host in homes]):
            for t, host in homes:
                host.copy_(t.data)
        for t, host in homes:
            t.data = host


class LayerSource(Protocol):
    """Gives decoder layer ``i`` its weights only while a caller needs them (``misq.models.streaming``).

    A model that holds all its weights in memory needs no source: callers take ``None``.
    """

    def load(self, i: int) -> None: ...

    def release(self, i: int) -> None: ...


@contextmanager
def layer_weights(source: LayerSource | None, i: int, ahead: int | None = None) -> Iterator[None]:
    """Decoder layer ``i`` has real weights inside the block; a no-op without a source.

    ``ahead``: the layer the caller works on next. A source that can (``prefetch(j)``, as
    :class:`misq.models.streaming.StreamedModel`) starts reading it in the background now, so
    that the disk works while layer ``i`` computes.
    """
    if source is None:
        yield
        return
    source.load(i)
    prefetch = getattr(source, "prefetch", None)
    if ahead is not None and prefetch is not None:
        prefetch(ahead)
    try:
        yield
    finally:
        source.release(i)


def compute_dtype_for(model: nn.Module, device: torch.device | str) -> torch.dtype:
    """The dtype layers run in: the model's own on an accelerator; float32 on the CPU, where
    half-precision kernels are slow or missing (the numbers differ from fp16 only in rounding)."""
    dtype = next(model.parameters()).dtype
    return torch.float32 if str(device).startswith("cpu") else dtype
