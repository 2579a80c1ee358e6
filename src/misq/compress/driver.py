"""The sequential driver: compress a model one decoder layer at a time.

    capture layer 0's inputs for the calibration windows (with every keyword argument)
    for each decoder layer:
        for each step (q/k/v → o → gate/up → down):
            continue the layer's forward from the previous step's activations up to the step's
            input, accumulating H = 2/n Σ xxᵀ (misq.models.step_activations: one forward per layer)
            group channels, choose widths, solve the step's layers as one stacked matrix
        finish the *compressed* layer's forward to produce the next layer's inputs

Only the current layer and the activations live on the accelerator (activations go to the
CPU with ``offload_activations``); a streamed model reads layer i + 1 while layer i is solved.
The driver knows the model's layout through :mod:`misq.models` and the algorithms through their
public functions only. Under torchrun each rank runs its share of the windows, the Hessians are
all-reduced, layers are planned by one rank each and every solve is split by rows over the ranks
(:mod:`misq.distributed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from misq.algorithms.column_layout import ColumnLayout
from misq.algorithms.fused import get_block_fn
from misq.algorithms.hessian import HessianAccumulator
from misq.algorithms.quantizer import QuantGrid
from misq.algorithms.sparsegpt import (
    DEFAULT_OPTIONS,
    SolverOptions,
    column_params,
    solve,
)
from misq.compress import bitplan
from misq.config import CompressConfig
from misq.distributed import LOCAL, Dist
from misq.errors import NumericalError
from misq.models import execution, layout, step_activations
from misq.models.layout import layer_prefix, linear_name

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    def update(self, stage: str, layer: int | None = None, sublayer: str | None = None, **extra: Any) -> None: ...


class _NoProgress:
    def update(self, stage: str, layer: int | None = None, sublayer: str | None = None, **extra: Any) -> None:
        pass


@dataclass
class CompressionOutput:
    """records: one dict per linear layer (error, sparsity, bits, time); grids: full name ->
    QuantGrid on the CPU; plans: full name -> ModulePlan."""

    records: list[dict[str, Any]] = field(default_factory=list)
    grids: dict[str, QuantGrid] = field(default_factory=dict)
    plans: dict[str, bitplan.ModulePlan] = field(default_factory=dict)
    seconds: float = 0.0


def hessian_batch_rows(cfg: CompressConfig) -> int:
    """Input rows per Hessian product (:class:`HessianAccumulator`): four 2048-token windows, or
    one product per window under ``--offload-activations``, whose point is the least device
    memory (the buffer is 0.47 GB at a 70B FFN width)."""
    return 0 if cfg.offload_activations else 4 * 2048


def _accumulate_step_hessian(passes: step_activations.LayerPasses, first: str, name: str, device: str,
                             dist: Dist = LOCAL, batch_rows: int = 0) -> Tensor:
    """H [C, C] of the input of linear ``first`` (dotted inside the layer; full name ``name``, for
    errors) over all windows, from the pass of ``passes`` that reaches it. Under torchrun the
    passes hold this rank's windows and H is all-reduced over the ranks. ``batch_rows``: see
    :class:`HessianAccumulator`."""
    acc: HessianAccumulator | None = None

    def add(x: Tensor) -> None:
        nonlocal acc
        if acc is None:
            acc = HessianAccumulator(x.shape[-1], device, batch_rows=batch_rows)
        acc.add(x)

    passes.step_inputs(first, add)
    assert acc is not None, "the step's first linear layer never ran"
    H = acc.free()
    # One check per step, not per window: a NaN/Inf in any input reaches H (x xᵀ keeps it on the
    # diagonal), and a check per window is a host sync that starves the GPU (0.5 s of a 13B layer).
    if not torch.isfinite(H).all():
        raise NumericalError(f"{name}: its calibration inputs hold NaN/Inf "
                             "(the model already overflows before it): check the checkpoint's weights, or load it "
                             "with --dtype bfloat16 or float32 if float16 overflows")
    return dist.reduce_hessian(H, acc.nsamples)


def _step_weights(linears: dict[str, nn.Linear], step: tuple[str, ...]) -> dict[str, Tensor]:
    """name -> float32 weight [R, C] of the layers ``step``."""
    return {name: linears[name].weight.data.float() for name in step}


T = TypeVar("T")
_Solved = tuple[QuantGrid, bitplan.ModulePlan, dict[str, Any]]  # (grid on the CPU, plan, record)


def _layer_steps(i: int, passes: step_activations.LayerPasses, device: str, dist: Dist,
                 work: Callable[[tuple[str, ...], dict[str, nn.Linear], Tensor, int], dict[str, T]], *,
                 before_step: Callable[[tuple[str, ...]], None] | None = None, hessian_rows: int = 0,
                 ) -> Iterator[tuple[tuple[str, ...], dict[str, T]]]:
    """The per-step sequence of decoder layer ``i`` (``passes.layer``), shared by measuring and compressing.

    For each step of ``layout.SEQUENTIAL_STEPS``: H [C, C] of the step's input (all-reduced
    under torchrun) -> ``work(step, linears, H, turn)`` on every rank (``turn`` numbers the step
    in the model), which leaves every rank with the same results and, when it solves, the same
    new weights, before the next step's inputs are computed from them (each pass continues from
    the previous one's activations: :mod:`misq.models.step_activations`).
    Yields (step, short name -> result for every layer of the step), in step order;
    ``passes.output`` comes after.
    """
    linears = layout.layer_linears(passes.layer)
    for j, step in enumerate(layout.SEQUENTIAL_STEPS):
        if before_step is not None:
            before_step(step)
        H = _accumulate_step_hessian(passes, step[0], linear_name(i, step[0]), device, dist, hessian_rows)
        done = work(step, linears, H, i * len(layout.SEQUENTIAL_STEPS) + j)
        del H  # its [C, C] is the largest buffer alive
        passes.solved(step)  # every rank holds the step's final weights now: its cached outputs may be made
        yield step, done


def _plan_layers(weights: dict[str, Tensor], H: Tensor, cfg: CompressConfig, dist: Dist, turn: int, *,
                 with_costs: bool = False) -> dict[str, bitplan.ModulePlan]:
    """:func:`bitplan.plan_step` of layers ``weights`` (name -> [R, C]) sharing H [C, C]. Under
    torchrun each layer is planned by one rank (:meth:`Dist.assign`, rotating with ``turn``) and
    every rank gets every plan: a plan needs the whole weight, and one rank cannot disagree with itself."""
    owners = dict(zip(weights, dist.assign([w.shape[0] for w in weights.values()], turn)))
    mine = {n: w for n, w in weights.items() if owners[n] == dist.rank}
    plans = dist.gather_dicts(bitplan.plan_step(mine, H, cfg, with_costs=with_costs) if mine else {})
    return {n: plans[n] for n in weights}


@torch.no_grad()
def measure_model_plan(model: nn.Module, calib: Tensor, cfg: CompressConfig, device: str,
                       dist: Dist = LOCAL, *, layer_source: execution.LayerSource | None = None) -> dict[str, bitplan.ModulePlan]:
    """First pass for ``--budget model``: groups and cost tables of every layer on the dense
    model, then one global allocation. Returns plans by full layer name (the same on every rank)."""
    dtype = execution.compute_dtype_for(model, device)
    storage = "cpu" if cfg.offload_activations else device
    inputs = execution.capture_layer0_inputs(model, dist.shard_windows(calib), device, batch_size=cfg.batch_size,
                                            storage=storage, compute_dtype=dtype)
    plans: dict[str, bitplan.ModulePlan] = {}

    def measure(step: tuple[str, ...], linears: dict[str, nn.Linear], H: Tensor, turn: int) -> dict[str, bitplan.ModulePlan]:
        return _plan_layers(_step_weights(linears, step), H, cfg, dist, turn, with_costs=True)

    layers = layout.decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="measure layers", unit="layer", leave=False)):
        with execution.layer_weights(layer_source, i, ahead=_ahead(i, layers)), execution.on_device(layer, device, dtype), \
                step_activations.LayerPasses(layer, inputs, device) as passes:
            for step, part in _layer_steps(i, passes, device, dist, measure, hessian_rows=hessian_batch_rows(cfg)):
                for name in step:
                    plans[linear_name(i, name)] = part[name]
            passes.output(out=inputs.hidden)
    if dist.is_main:
        res = bitplan.allocate_model(plans, cfg)
        what = "bits per parameter on disk" if cfg.target_size is not None else "average channel bits"
        log.info("model budget: %.4f %s over %d layers (target %.2f)", res.average, what, len(plans), bitplan.budget_target(cfg))
    return dist.broadcast_object(plans)  # rank 0's allocation, so that no rank can disagree


@torch.no_grad()
def compress_model(
    model: nn.Module,
    calib: Tensor,
    cfg: CompressConfig,
    device: str,
    *,
    progress: ProgressSink | None = None,
    plans: dict[str, bitplan.ModulePlan] | None = None,
    start_layer: int = 0,
    on_layer_done: Callable[[int, dict[str, Tensor], CompressionOutput], None] | None = None,
    block_fn: Callable | None = None,
    prior: CompressionOutput | None = None,
    dist: Dist | None = None,
    layer_source: execution.LayerSource | None = None,
    solver: SolverOptions = DEFAULT_OPTIONS,
) -> CompressionOutput:
    """Compress every decoder layer of ``model`` in place with calibration windows ``calib`` [n, seqlen].

    ``plans`` fixes groups and widths (from :func:`measure_model_plan`); without it each layer
    is planned on its own (``--budget layer``). Layers before ``start_layer`` are taken as
    already compressed (resume; their records and grids come in ``prior``): they are only run
    to rebuild the next layer's inputs. Under torchrun (``dist`` from :func:`misq.distributed.from_env`)
    each rank passes the same ``calib`` and runs its share of it; all ranks end with the same model.
    With a ``layer_source`` (streaming) each layer gets its weights just before its turn and loses
    them after ``on_layer_done(i, layer_state, out)``, the sink that must persist it (``layer_state``:
    the compressed layer's tensors by full name, ``model.layers.i.…`` -> tensor). ``solver`` says how to compute
    (inverse-Cholesky method, fast error products, fused sweep); the result does not depend on it.
    """
    t0 = time.perf_counter()
    progress = progress or _NoProgress()
    if block_fn is None:  # the fused Triton block sweep on CUDA; pass sparsegpt.block_loop to force the eager one
        block_fn = get_block_fn(device, enabled=solver.fused)
    out = prior or CompressionOutput()
    dtype = execution.compute_dtype_for(model, device)
    store_dtype = next(model.parameters()).dtype
    storage = "cpu" if cfg.offload_activations else device
    if cfg.offload_activations:  # the smallest GPU: no memory kept for the descent's recorded passes
        solver = replace(solver, record_descent=False)
    dist = dist or LOCAL
    progress.update("calibration-inputs")
    inputs = execution.capture_layer0_inputs(model, dist.shard_windows(calib), device, batch_size=cfg.batch_size, storage=storage, compute_dtype=dtype)
    layers = layout.decoder_layers(model)
    size_budget = bitplan.SizeBudget(plans, cfg) if bitplan.SizeBudget.applies(plans, cfg) else None
    # In memory, layer i + 1 is copied to the device during layer i's output pass (its solves are
    # over, so their buffers are free); a streamed model's next layer is still being read, and
    # --offload-activations keeps one layer on the device at a time (a 70B layer is 1.7 GB).
    prefetcher = execution.Prefetcher(device, enabled=layer_source is None and not cfg.offload_activations)
    staging = execution.HostStaging()  # compressed layers go back to the host through one pinned buffer
    ready: execution.DeviceCopy | None = None
    bar = tqdm(range(len(layers)), desc="compress", unit="layer")
    for i in bar:
        layer = layers[i]

        def prefetch_next(i: int = i) -> None:
            nonlocal ready
            ready = prefetcher.start(layers[i + 1], dtype) if i + 1 < len(layers) else None

        with execution.layer_weights(layer_source, i, ahead=_ahead(i, layers)):  # streaming: i + 1 is read meanwhile
            with execution.on_device(layer, device, dtype, ready=ready, staging=staging):
                ready = None
                if i >= start_layer:  # also runs the compressed layer: its outputs replace inputs.hidden
                    _compress_layer(i, layer, inputs, cfg, device, plans, out, progress, block_fn, store_dtype, dist=dist,
                                    solver=solver, size_budget=size_budget, before_output=prefetch_next)
                else:
                    progress.update("replay", layer=i + 1)
                    for step in layout.SEQUENTIAL_STEPS:  # a resume re-plans as the interrupted run did
                        _spend(size_budget, i, step, layer, out, plans, dist)
                    prefetch_next()
                    execution.run_layer(layer, inputs, device, out=inputs.hidden)
                if not torch.isfinite(inputs.hidden).all():
                    raise NumericalError(f"model.layers.{i}: its outputs hold NaN/Inf after compression")
            if i >= start_layer and on_layer_done is not None:
                # Before the weights are released (streaming): the sink reads them.
                layer_state = {layer_prefix(i) + k: v for k, v in layer.state_dict().items()}
                on_layer_done(i, layer_state, out)
        progress.update("compress", layer=i + 1, layer_done=True)
    out.seconds = time.perf_counter() - t0
    return out


def _ahead(i: int, layers: nn.ModuleList) -> int | None:
    """The layer a streamed run reads while layer ``i`` is worked on (None after the last)."""
    return i + 1 if i + 1 < len(layers) else None


def _compress_layer(i: int, layer: nn.Module, inputs: execution.LayerInputs, cfg: CompressConfig, device: str,
                    plans: dict[str, bitplan.ModulePlan] | None, out: CompressionOutput, progress: ProgressSink,
                    block_fn: Callable | None, store_dtype: torch.dtype, dist: Dist = LOCAL,
                    solver: SolverOptions = DEFAULT_OPTIONS, size_budget: bitplan.SizeBudget | None = None,
                    before_output: Callable[[], None] | None = None) -> None:
    """Compress decoder layer ``i`` (on ``device``) in place, step by step; adds its grids,
    plans and records to ``out``, then runs the compressed layer: its outputs [n, seqlen, d]
    replace ``inputs.hidden`` (``before_output`` is called just before that pass). With a
    ``size_budget`` the layers still to come are re-planned after every step, from the size
    the solved ones really take."""
    def work(step: tuple[str, ...], linears: dict[str, nn.Linear], H: Tensor, turn: int) -> dict[str, _Solved]:
        return _solve_layers(i, step, linears, H, cfg, plans, block_fn, store_dtype, solver, dist=dist, turn=turn)

    def announce(step: tuple[str, ...]) -> None:
        progress.update("compress", layer=i + 1, sublayer="+".join(n.split(".")[-1] for n in step))

    with step_activations.LayerPasses(layer, inputs, device) as passes:
        for step, solved in _layer_steps(i, passes, device, dist, work, before_step=announce,
                                         hessian_rows=hessian_batch_rows(cfg)):
            for name in step:
                full = linear_name(i, name)
                out.grids[full], out.plans[full], record = solved[name]
                out.records.append(record)
                log.info("%s: rel. error %.5f, sparsity %.3f, %.3f bits", full, record["rel_error"], record["sparsity"], record["avg_bits"])
            _spend(size_budget, i, step, layer, out, plans, dist)
        if before_output is not None:
            before_output()
        passes.output(out=inputs.hidden)


def _spend(size_budget: bitplan.SizeBudget | None, i: int, step: tuple[str, ...], layer: nn.Module,
           out: CompressionOutput, plans: dict[str, bitplan.ModulePlan] | None, dist: Dist) -> None:
    """Measure the solved layers of ``step`` and re-plan the rest (``--target-size``, sparse)."""
    if size_budget is None or plans is None:
        return
    linears = layout.layer_linears(layer)
    for short in step:
        size_budget.measured(linear_name(i, short), linears[short].weight.data, out.grids[linear_name(i, short)])
    widths = dist.broadcast_object(size_budget.replan())  # rank 0's, so that no rank can disagree
    for name, bits in widths.items():
        plans[name].bits = bits


def _solve_layers(i: int, names: tuple[str, ...], linears: dict[str, nn.Linear], H: Tensor, cfg: CompressConfig,
                  plans: dict[str, bitplan.ModulePlan] | None, block_fn: Callable | None,
                  store_dtype: torch.dtype, solver: SolverOptions = DEFAULT_OPTIONS, *, dist: Dist = LOCAL,
                  turn: int = 0) -> dict[str, _Solved]:
    """Plan, grid and solve layers ``names`` of one step of layer ``i`` against their shared
    H [C, C] (read only), and write their weights back.

    Layers that are solved in the same column order are stacked into one matrix (all of them,
    without ``--act-order``/``--groupsize``). Returns name -> (grid on the CPU, plan, record).
    Rows are independent and unstructured masks are chosen per layer, so solving any subset of
    a step gives those layers exactly what the whole step's stacked solve gives them. Under
    torchrun (``dist``) every rank calls this for the whole step: plans come from
    :func:`_plan_layers` (``turn``), each stacked matrix is solved by rows over the ranks.
    """
    weights = _step_weights(linears, names)
    full = {name: linear_name(i, name) for name in names}
    if plans is not None:
        step_plans = {name: plans[full[name]] for name in names}
    else:
        step_plans = _plan_layers(weights, H, cfg, dist, turn)
    batches = bitplan.solve_batches(step_plans, H, cfg, names)
    solved = {}
    for batch, col_layout in batches:  # solve leaves H as it is: every batch reads the same one
        solved.update(_solve_batch(batch, col_layout, weights, step_plans, full, linears, H, cfg, block_fn,
                                   store_dtype, solver, dist))
    return {name: solved[name] for name in names}


def _solve_batch(names: tuple[str, ...], col_layout: ColumnLayout | None, weights: dict[str, Tensor],
                 step_plans: dict[str, bitplan.ModulePlan], full: dict[str, str], linears: dict[str, nn.Linear],
                 H: Tensor, cfg: CompressConfig, block_fn: Callable | None, store_dtype: torch.dtype,
                 solver: SolverOptions, dist: Dist = LOCAL) -> dict[str, _Solved]:
    """Solve layers ``names`` (one column layout ``col_layout``, or the natural order) as one stacked
    matrix W [R, C]; under torchrun each rank solves its rows of it (:class:`misq.distributed.RowShare`)."""
    W = torch.cat([weights[name] for name in names])
    rows = [weights[name].shape[0] for name in names]
    share = dist.row_share(rows)  # under torchrun: this rank's rows of W; None: all of them
    # Grids found as the solver reaches each group (GPTQ's groupsize), unless --static-groups fixed
    # them up front on the original columns (then the solve order is not stored: grid.order stays None).
    dynamic = col_layout is not None and cfg.groupsize > 0 and not cfg.static_groups
    # Each layer's own sparsity (--sparsity-allocation); one value when they agree, as before.
    spars = [cfg.sparsity if step_plans[n].sparsity is None else step_plans[n].sparsity for n in names]
    grids = {} if dynamic else {name: bitplan.grid_for(weights[name], step_plans[name], cfg, H) for name in names}
    # Grids come from the whole layers (an MSE grid search counts a layer-wide mask), then are sliced.
    qparams = None if dynamic else column_params([grids[n] for n in names] if share is None
                                                 else share.grid_rows([grids[n] for n in names]))
    if share is None:
        mine, seg_rows, seg_spars, keep_fn = W, rows, spars, None
    else:  # this rank's pieces of the layers; the masks' thresholds over all ranks' rows
        mine, keep_fn = W[share.rows], share.keep_fn(spars)
        seg_rows = [sl.stop - sl.start for _, sl in share.pieces]
        seg_spars = [spars[k] for k, _ in share.pieces]
    try:
        res = solve(mine, H, qparams,
                    sparsity=seg_spars[0] if len(set(seg_spars)) == 1 else seg_spars,
                    prunen=cfg.prunen, prunem=cfg.prunem, blocksize=cfg.blocksize, percdamp=cfg.percdamp,
                    row_segments=seg_rows, block_fn=block_fn, options=solver,
                    order=None if col_layout is None else col_layout.perm,
                    grid_groups=col_layout.scale_groups() if dynamic else None, grid_mse=cfg.mse,
                    keep_fn=keep_fn, refit=cfg.refit_scales, refine_passes=cfg.refine_passes)  # refit: writes the new scales into the grids
    except NumericalError as err:  # the solver does not know which layers it solved
        raise NumericalError(f"{'+'.join(full[n] for n in names)}: {err}") from None
    if res.damp != cfg.percdamp:
        log.warning("%s: Hessian needed damping %.3g (asked %.3g)", "+".join(full[n] for n in names), res.damp, cfg.percdamp)
    weight, group_scale, group_zero = res.weight, res.group_scale, res.group_zero
    rel, sparsity, seconds = res.rel_error, res.sparsity, res.seconds
    if share is not None:  # every rank's rows to every rank: weights (in the model's dtype), group grids, records
        weight = share.gather(res.weight.to(store_dtype))
        if dynamic:
            both = share.gather(torch.cat([res.group_scale, res.group_zero], dim=1))
            group_scale, group_zero = both.tensor_split(2, dim=1)
        rel, sparsity, seconds = share.totals(res.error_terms, res.keep, res.seconds)
    solved = {}
    start = 0
    for k, name in enumerate(names):
        lin = linears[name]
        # Round through the model's own dtype so the next layer sees what a reload gives.
        new = weight[start : start + rows[k]].to(store_dtype)
        if not torch.isfinite(new).all():  # never write a broken layer into the model (or a checkpoint)
            raise NumericalError(f"{full[name]}: the solved weights hold NaN/Inf in {str(store_dtype).replace('torch.', '')}: "
                                 "check the checkpoint's weights, or load it with --dtype bfloat16 or float32")
        lin.weight.data.copy_(new)
        sl = slice(start, start + rows[k])
        start += rows[k]
        if dynamic:
            grid = QuantGrid(scale=group_scale[sl], zero=group_zero[sl], groups=col_layout.group_of_column(),
                             bits=col_layout.group_bits(), order=col_layout.perm)
        else:
            # Grids fixed before the solve (static groups, one grid per row, channel groups) do not
            # depend on the solve order, so the file stores none: codes are laid out by group.
            grid = grids[name] if share is None else share.gather_grid(k, grids[name])  # the rows' solvers' grids
        plan = step_plans[name]
        record = {
            "name": full[name], "rows": rows[k], "cols": W.shape[1],
            "rel_error": rel[k], "sparsity": sparsity[k], "avg_bits": plan.avg_bits(),
            "group_bits": plan.bits.tolist(), "solve_s": seconds, "damp": res.damp,
            "stacked_with": [full[n] for n in names if n != name],
        }
        solved[name] = (_cpu_grid(grid), plan, record)
    return solved


def _cpu_grid(grid: QuantGrid) -> QuantGrid:
    return QuantGrid(scale=grid.scale.cpu(), zero=grid.zero.cpu(), groups=grid.groups.cpu(), bits=grid.bits.cpu(),
                     order=None if grid.order is None else grid.order.cpu())
