"""``PackedLinear``: a linear layer that keeps its packed codes and computes from them.

Forward, for x [..., C] -> y [..., R]:

* CUDA, fp16, Triton present: M <= 16 rows go through the decode kernels
  (:func:`misq.runtime.decode_plan.decode_matmul`: CUDA cores at M = 1 for one-piece widths, tensor
  cores otherwise; they write the fp16 output with the bias); more rows (prefill) dequantize
  the layer, in its columns' original order, into a per-device fp16 buffer shared by every layer
  and call cuBLAS on x as it is, or, up to ``launch_plan.PREFILL_FUSED_MAX_ROWS`` rows (0 by default: it measured
  slower), go through :func:`misq.runtime.decode_plan.prefill_matmul` (each output tile's weights
  dequantized on the fly) when the layer has one or two widths of at most 10 bits and no 16-bit
  columns.
* otherwise (CPU, other dtypes, no Triton): dequantize this one layer to a temporary dense
  weight and call ``F.linear``, so peak memory is the packed model plus one layer.

On CUDA each layer binds its kernels' launches once (:class:`misq.runtime.decode_plan.DecodePlan`
per row bucket, :func:`misq.runtime.kernels.dequantizer` for prefill; :mod:`misq.runtime.fast_launch`),
so a call passes only what changes: a prompt of a few hundred tokens was otherwise as slow as
the host's launches (BENCHMARKS.md, session 13).

The tensor-core kernel, the dequantize path and the CPU path use the weights
:func:`misq.checkpoint.layer_format.decode_layer` produces, bit for bit (outputs differ from the
dense model's by summation order); the M = 1 CUDA-core kernels scale each group's dot product in
float32 instead of rounding every weight to fp16 first (the 3/4-bit one also rounds each product
and eight-term sum to fp16), so their outputs differ from the dense model's by about the dense
weights' fp16 rounding.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misq.checkpoint.packing import Pattern
from misq.runtime import kernels, launch_plan
from misq.runtime.decode_plan import DecodePlan, gated, out_width, prefill_matmul
from misq.runtime.layout import Segment, build_segments, dequantize, kernel_perm
from misq.runtime.triton_common import HAVE_TRITON

_buffers: dict[torch.device, Tensor] = {}  # prefill's dequantized weight, one per device, reused

# torch.compile cannot trace the kernels' Python side (launch planning, split-K workspaces, Triton
# grids), so under the compiler the GPU forward is one custom op, opaque to it, and the norms,
# rotary embeddings and activations around it fuse. Custom ops take tensors and numbers, not
# modules: hence this table of live layers by handle (their id, set at construction and copy).
_LAYERS: weakref.WeakValueDictionary[int, PackedLinear] = weakref.WeakValueDictionary()


@torch.library.custom_op("misq::packed_linear", mutates_args=())
def packed_linear(x: Tensor, layer: int) -> Tensor:
    """x fp16 [..., C] on CUDA -> [..., R]: PackedLinear ``layer`` (its id)'s kernels."""
    return _LAYERS[layer].kernel_forward(x)


@packed_linear.register_fake
def _packed_linear_shape(x: Tensor, layer: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], _LAYERS[layer].output_features)


def _buffer(device: torch.device, numel: int) -> Tensor:
    buf = _buffers.get(device)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float16, device=device)
        _buffers[device] = buf
    return buf[:numel]


class PackedLinear(nn.Module):
    """A [R, C] linear layer held in the runtime layout (:mod:`misq.runtime.layout`).

    Buffers (so ``.to(device)`` moves them): ``perm`` int32 [C]; ``kperm`` int32 (the tensor-core
    kernel's column order, :func:`misq.runtime.layout.kernel_perm`); per segment i ``seg{i}_w{p}``
    int32 words, ``seg{i}_scales`` fp16 [K_b, R], ``seg{i}_zeros`` uint8 [K_b, R],
    ``seg{i}_gidx`` int32 [n_b]; ``fp_cols`` [R, n_fp] for 16-bit columns; ``bias`` [R].

    ``glu``: the R rows are a LLaMA MLP's gate and up projections, interleaved (gate row i is row
    2i, up row i is row 2i + 1: :func:`misq.runtime.merge.merge_gated`), and forward returns
    SiLU(gate) * up [..., R / 2] (``output_features``): at decode the kernel that writes the output
    makes it from its float32 sums, so the activation takes no launch of its own.
    """

    def __init__(self, perm: Tensor, segments: list[Segment], fp_cols: Tensor | None, rows: int,
                 bias: Tensor | None = None, weight_dtype: torch.dtype = torch.float16, glu: bool = False):
        super().__init__()
        if glu and rows % 2:
            raise ValueError(f"a gated layer holds gate/up row pairs, so an even number of rows, not {rows}")
        self.in_features, self.out_features, self.glu = int(perm.numel()), rows, glu
        self.weight_dtype = weight_dtype  # the dense model's weights are rounded to this dtype
        self.register_buffer("perm", perm.to(torch.int32))
        self.register_buffer("kperm", kernel_perm(self.perm, segments))
        self._meta = [(s.bits, s.start, s.n, s.group_len, sorted(s.words)) for s in segments]
        for i, s in enumerate(segments):
            for p, w in s.words.items():
                self.register_buffer(f"seg{i}_w{p}", w)
            self.register_buffer(f"seg{i}_scales", s.scales)
            self.register_buffer(f"seg{i}_zeros", s.zeros)
            self.register_buffer(f"seg{i}_gidx", s.gidx)
        self.fp_start = sum(s.n for s in segments)
        self.register_buffer("fp_cols", fp_cols)
        self.register_buffer("bias", bias)
        # the kernels' launches, bound to this layer's buffers (decode_plan, kernels.dequantizer):
        # made at the first call of each kind, dropped whenever a buffer is moved or replaced
        self._plans: dict[Any, Any] = {}
        self._register()

    def _register(self) -> None:
        """Make this layer the custom op's ``layer`` self._handle (see _LAYERS)."""
        self._handle = id(self)
        _LAYERS[self._handle] = self

    def __getstate__(self) -> dict[str, Any]:  # bound launches hold this layer's addresses: never copied
        return {k: v for k, v in self.__dict__.items() if k != "_plans"}

    def __setstate__(self, state: dict[str, Any]) -> None:  # copies (copy.deepcopy) get their own handle
        super().__setstate__(state)
        self._plans = {}
        self._register()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_buffers", ()):  # a buffer replaced: launches bound to the old one go
            self.__dict__["_plans"] = {}
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() ... replace the buffers
        self._plans = {}
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def from_file(cls, tensors: dict[str, Tensor], meta: dict[str, Any], pattern: str | Pattern,
                  bias: Tensor | None = None) -> PackedLinear:
        """From one layer's checkpoint tensors (ValueError if they are inconsistent)."""
        perm, segments, fp = build_segments(tensors, meta, pattern)
        return cls(perm, segments, fp, int(meta["rows"]), bias, getattr(torch, str(meta.get("dtype", "float16"))))

    @property
    def segments(self) -> list[Segment]:
        """The segments, viewing this module's (possibly moved) buffers."""
        out = []
        for i, (bits, start, n, group_len, ps) in enumerate(self._meta):
            out.append(Segment(bits=bits, start=start, n=n, group_len=group_len,
                               words={p: getattr(self, f"seg{i}_w{p}") for p in ps},
                               scales=getattr(self, f"seg{i}_scales"), zeros=getattr(self, f"seg{i}_zeros"),
                               gidx=getattr(self, f"seg{i}_gidx")))
        return out

    @property
    def output_features(self) -> int:
        """Features forward returns: the weight's rows, or half of them if ``glu``."""
        return out_width(self.out_features, self.glu)

    @property
    def weight_nbytes(self) -> int:
        """Bytes this layer holds (all buffers but the bias): its share of GPU memory."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight [R, C] in the original column order: rounded to the saved dtype as
        the dense model's is, then cast to ``dtype`` (default: the saved dtype)."""
        W = dequantize(self.perm, self.segments, self.fp_cols, self.out_features, self.weight_dtype)
        return W if dtype is None else W.to(dtype)

    def _kernel_ok(self, x: Tensor) -> bool:
        return HAVE_TRITON and x.is_cuda and x.dtype == torch.float16

    def forward(self, x: Tensor) -> Tensor:
        """x [..., C] -> [..., R] in x's dtype ([..., R / 2] if glu)."""
        if not self._kernel_ok(x):
            y = F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            return gated(y) if self.glu else y
        if torch.compiler.is_compiling():
            return packed_linear(x, self._handle)
        return self.kernel_forward(x)

    def kernel_forward(self, x: Tensor) -> Tensor:
        """x fp16 [..., C] on CUDA -> [..., R] ([..., R / 2] if glu) through the kernels (module
        docstring)."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        M = x2.shape[0]
        if M <= launch_plan.DECODE_MAX_ROWS:  # one fused launch per width or two: gather, dot, bias, fp16
            y = self._decode(x2 if x2.stride(1) == 1 else x2.contiguous())
        else:
            fused = M <= launch_plan.PREFILL_FUSED_MAX_ROWS and self.fused_prefill_ok()
            y = self._prefill_fused(x2) if fused else self._prefill_dequant(x2)
            if self.glu:  # prefill's cuBLAS writes gate and up: the activation is torch's, as the model's own
                y = gated(y)
        return y.reshape(*shape[:-1], self.output_features)

    def _decode(self, x2: Tensor, configs: list | None = None) -> Tensor:
        """x2 fp16 [M <= 16, C] (unit column stride) -> [M, R] ([M, R / 2] if glu): the layer's
        DecodePlan for M's bucket (M = 1, or 2..16), the 16-bit columns' product added.
        ``configs``: one launch_plan.Config per segment (default: the tuned or default settings)."""
        plan = self.decode_plan(x2.shape[0], configs)
        extra = None
        if self.fp_cols is not None:
            extra = (kernels.gather_columns(x2, self.perm[self.fp_start:]) @ self.fp_cols.to(x2.dtype).t()).float()
        return plan(x2, extra)

    def decode_plan(self, M: int, configs: list | None = None) -> DecodePlan:
        """This layer's bound launches for M (<= 16) rows: one plan per bucket (M = 1, 2..16) and
        launch settings (``configs``, or the tuned table's state)."""
        key = (M == 1, launch_plan.TUNED.version if configs is None else tuple(configs))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = DecodePlan(self.perm, self.segments, self.out_features, M, self.bias,
                                                 self.fp_cols is not None, configs, self.kperm, glu=self.glu)
        return plan

    def fused_prefill_ok(self) -> bool:
        return launch_plan.prefill_ok(self.segments, self.fp_cols is not None)

    def _prefill_fused(self, x2: Tensor) -> Tensor:
        """x2 fp16 [M, C] on CUDA -> [M, R]: tiles of W dequantized on the fly (prefill_matmul)."""
        return prefill_matmul(x2, self.kperm, self.segments, self.out_features, self.bias)

    def _prefill_dequant(self, x2: Tensor) -> Tensor:
        """x2 fp16 [M, C] on CUDA -> [M, R]: the layer dequantized into the shared buffer in its
        columns' original order, one cuBLAS matmul (bias included). Few launches, bound once: on
        an H200 the host's launch time, not the GPU's, set prefill's pace at a few hundred rows
        (BENCHMARKS.md, sessions 12-13)."""
        R = self.out_features
        key = ("prefill", kernels.DEQUANT_CONFIG)  # the settings it was bound with (benchmarks change them)
        plan = self._plans.get(key)
        if plan is None:
            fp = None
            if self.fp_cols is not None:  # 16-bit columns: written into their rows after the kernels'
                fp = (self.perm[self.fp_start:].long(), self.fp_cols.t().to(x2.dtype))
            plan = self._plans[key] = (kernels.dequantizer(self.perm, self.segments, R), fp)
        dequantize, fp = plan
        wt = _buffer(x2.device, self.in_features * R).view(self.in_features, R)
        dequantize(wt)
        if fp is not None:
            wt[fp[0]] = fp[1]
        if self.bias is not None:
            return torch.addmm(self.bias.to(x2.dtype), x2, wt)
        return x2 @ wt

    def extra_repr(self) -> str:
        widths = ",".join(str(m[0]) for m in self._meta) + (",16" if self.fp_cols is not None else "")
        glu = ", gated: SiLU(gate) * up of row pairs" if self.glu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, widths={widths}{glu}"
