"""Which width every input channel gets: grouping + cost tables + budgeted allocation.

For each linear layer the input channels are partitioned into K groups (by mutual information,
by Hessian sensitivity, or a single group for uniform quantization); for each group and each
candidate width the loss it would add is estimated (the Hessian-weighted quantization error of
its surviving weights); then a multiple-choice knapsack picks one width per group so that the
weight-weighted average meets ``--target_avg_bits``.

``--budget layer`` solves one knapsack per linear layer. ``--budget model`` measures every layer
first (on the dense model) and solves one knapsack over all of them, so sensitive layers can
take more bits; costs are then made comparable across layers by dividing by the layer's output
energy tr(W H Wᵀ), i.e. they are *relative* output errors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from misq.algorithms import allocation, grouping
from misq.algorithms.column_layout import ColumnLayout, layout_for, nm_metadata_bits, segment_bits
from misq.algorithms.quantizer import QuantGrid, find_grid
from misq.checkpoint.layer_format import describe_layer, layer_nbytes
from misq.compress import sparsity_plan
from misq.config import CompressConfig

log = logging.getLogger(__name__)


@dataclass
class ModulePlan:
    """Grouping and widths for one linear layer with C input channels and K groups.

    groups: [C] int64 group of each channel; bits: [K] int64 width of each group;
    costs: [K, B] estimated loss per (group, candidate width), or None for uniform.
    """

    name: str
    rows: int
    groups: Tensor
    bits: Tensor
    costs: Tensor | None = None
    sizes: Tensor | None = None  # [K, B] honest bits per weight of each option (--target-size)
    sparsity: float | None = None  # this layer's unstructured sparsity; None: --sparsity (uniform)
    options: Any = None  # candidate sparsities (misq.compress.sparsity_plan.SparsityOptions), first pass only

    def group_weights(self) -> Tensor:
        """[K] number of weights (rows × channels) in each group."""
        return torch.bincount(self.groups, minlength=self.bits.numel()) * self.rows

    def column_bits(self) -> Tensor:
        return self.bits[self.groups]

    def avg_bits(self) -> float:
        return float(self.column_bits().float().mean())


def estimate_keep(W: Tensor, H: Tensor, cfg: CompressConfig, sparsity: float | None = None) -> Tensor:
    """[R, C] guess of SparseGPT's mask before solving: keep the largest w²·H_jj (its saliency
    with H⁻¹ replaced by the diagonal), per layer for unstructured sparsity, per M for N:M.
    ``sparsity``: this layer's (sparsity allocation), default ``cfg.sparsity``."""
    sparsity = cfg.sparsity if sparsity is None else sparsity
    sal = W.float() ** 2 * torch.diag(H).clamp_min(0).unsqueeze(0)
    if cfg.structured:
        R, C = W.shape
        blocks = sal[:, : C - C % cfg.prunem].reshape(R, -1, cfg.prunem)
        order = blocks.argsort(dim=2)
        keep = torch.ones_like(blocks, dtype=torch.bool)
        keep.scatter_(2, order[:, :, : cfg.prunen], False)
        out = torch.ones_like(W, dtype=torch.bool)
        out[:, : keep.shape[1] * cfg.prunem] = keep.reshape(R, -1)
        return out
    if sparsity <= 0:
        return torch.ones_like(W, dtype=torch.bool)
    if cfg.target_size is not None:
        # Sizes are priced from this mask, so it should prune like the solver: the same share of
        # every block of columns (SparseGPT's mask is chosen block by block), not one global cut.
        return _blockwise_keep(sal, sparsity, cfg.blocksize)
    k = int(sal.numel() * sparsity)
    flat = sal.flatten()
    if flat.is_cuda:
        # A radix sort on the GPU: sending every saliency (70M for a 13B gate_proj) to the host
        # for kthvalue took seconds per layer. The k-th smallest value is the same either way.
        thresh = torch.sort(flat).values[max(k, 1) - 1]
    else:
        thresh = torch.kthvalue(flat, max(k, 1)).values
    return sal > thresh


def _blockwise_keep(sal: Tensor, sparsity: float, blocksize: int) -> Tensor:
    """[R, C] keep-mask pruning the ``sparsity`` share of lowest ``sal`` in each block of columns."""
    keep = torch.empty_like(sal, dtype=torch.bool)
    for c in range(0, sal.shape[1], blocksize):
        block = sal[:, c : c + blocksize]
        thresh = torch.sort(block.flatten()).values[int(block.numel() * sparsity)]
        keep[:, c : c + blocksize] = block > thresh
    return keep


def step_groups(weights: dict[str, Tensor], H: Tensor, cfg: CompressConfig) -> dict[str, Tensor]:
    """Channel groups [C] for each layer of one step (layers that share the input and H)."""
    C = H.shape[0]
    if not cfg.mixed_precision:
        return {name: torch.zeros(C, dtype=torch.long, device=H.device) for name in weights}
    mi = None
    if cfg.grouping == "mi":
        # MI depends on the activations only, so layers sharing an input share it.
        mi = grouping.gaussian_mi(H)
    return {
        name: grouping.group_channels(cfg.grouping, channel_groups(C, cfg), H=H, W=W, mi=mi, seed=cfg.seed).to(H.device)
        for name, W in weights.items()
    }


def channel_groups(C: int, cfg: CompressConfig) -> int:
    """How many channel groups a layer with C input channels gets.

    With ``--groupsize G`` every group of channels is one scale group of about G channels
    (``ceil(C / G)`` of them): each width then covers whole scale groups, so mixing widths costs
    no scale or zero beyond what uniform G-column grids pay, and the allocator chooses widths at
    the grain of GPTQ's own groups. Measured on llama-9m (BENCHMARKS.md): 10 channel groups of
    ~25 channels, each with its own grid, spent 0.7 bit per weight on scales. Without
    ``--groupsize``, ``--n_groups``.
    """
    if cfg.groupsize:
        return max(1, math.ceil(C / cfg.groupsize))
    return cfg.n_groups


def option_sizes(keep: Tensor, groups: Tensor, n_groups: int, cfg: CompressConfig) -> Tensor:
    """[K, B] honest bits per weight of each group at each candidate width, as the packed file
    will store it: codes of the (estimated) survivors, mask or N:M metadata, per scale group an
    fp16 scale and a zero at the width, and the column order when the layer is permuted.

    keep: [R, C] estimated mask (:func:`estimate_keep`); groups: [C] in [0, n_groups).
    """
    R = keep.shape[0]
    counts = torch.bincount(groups.cpu(), minlength=n_groups).tolist()
    kept = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups.cpu(), keep.sum(0).double().cpu())
    if cfg.structured:
        mask = nm_metadata_bits(cfg.prunen, cfg.prunem) / cfg.prunem
    else:
        mask = 1.0 if cfg.sparsity > 0 else 0.0
    permuted = n_groups > 1 or cfg.act_order
    out = torch.empty(n_groups, len(cfg.bits), dtype=torch.float64)
    for k, n in enumerate(counts):
        density = float(kept[k]) / (R * n) if n else 1.0
        for j, b in enumerate(cfg.bits):
            if not n:
                out[k, j] = float(b)
                continue
            bits = segment_bits(R, n, b, groupsize=cfg.groupsize, density=density, mask_bits_per_weight=mask, permuted=permuted)
            if not cfg.structured and mask:  # few zeros: stored as codes, no mask (layer_format._stored_keep)
                bits = min(bits, segment_bits(R, n, b, groupsize=cfg.groupsize, density=1.0, mask_bits_per_weight=0.0,
                                              permuted=permuted))
            out[k, j] = bits / (R * n)
    return out


def module_costs(W: Tensor, H: Tensor, groups: Tensor, cfg: CompressConfig, *, relative: bool,
                 keep: Tensor | None = None) -> Tensor:
    """[K, B] estimated loss of each group at each candidate width."""
    keep = estimate_keep(W, H, cfg) if keep is None else keep
    costs = allocation.group_costs(W.float(), H, groups, cfg.bits, keep)
    if relative:
        energy = torch.sum((W.float() @ H) * W.float()).clamp_min(1e-30)
        costs = costs / energy.to(costs.device, costs.dtype)
    return costs.cpu()


def plan_step(weights: dict[str, Tensor], H: Tensor, cfg: CompressConfig, *, with_costs: bool = False) -> dict[str, ModulePlan]:
    """Plans for the layers of one step. Layer-scope budgets are allocated here; for a model-scope
    budget (``with_costs``) the cost tables are kept and widths are set later by :func:`allocate_model`."""
    groups = step_groups(weights, H, cfg)
    plans = {}
    for name, W in weights.items():
        g = groups[name]
        if not cfg.mixed_precision:
            plans[name] = ModulePlan(name, W.shape[0], g.cpu(), torch.tensor([cfg.wbits]))
            continue
        keep = estimate_keep(W, H, cfg)
        costs = module_costs(W, H, g, cfg, relative=with_costs, keep=keep)
        K = int(g.max()) + 1
        sizes = option_sizes(keep, g, K, cfg) if cfg.target_size is not None else None
        plan = ModulePlan(name, W.shape[0], g.cpu(), torch.zeros(K, dtype=torch.long), costs, sizes)
        if with_costs and cfg.sparsity_allocation != "uniform":
            sparsity_plan.add_options(plan, W, H, cfg)  # the candidates, chosen in allocate_model
        if not with_costs:
            res = allocation.allocate([costs], [plan.group_weights()], cfg.bits, budget_target(cfg),
                                      option_bits=None if sizes is None else [sizes])
            plan.bits = res.widths[0].cpu().long()
            if not res.exact:
                log.warning("%s: %s", name, res.message)
        plans[name] = plan
    return plans


def budget_target(cfg: CompressConfig) -> float:
    """What the allocator meets: the honest size (``--target-size``) or the channel bits."""
    return cfg.target_size if cfg.target_size is not None else cfg.target_avg_bits


def allocate_model(plans: dict[str, ModulePlan], cfg: CompressConfig) -> allocation.AllocationResult:
    """One knapsack over every layer's groups (``--budget model``); sets ``plan.bits`` in place.

    With ``--sparsity-allocation`` other than uniform each layer's sparsity is chosen first
    (:func:`misq.compress.sparsity_plan.choose`, which sets ``plan.sparsity`` and the cost and
    size tables of its mask); the widths are then allocated exactly on those tables."""
    if cfg.sparsity_allocation != "uniform":
        sparsity_plan.choose(plans, cfg)
    names = list(plans)
    sized = cfg.target_size is not None
    res = allocation.allocate([plans[n].costs for n in names], [plans[n].group_weights() for n in names],
                              cfg.bits, budget_target(cfg), option_bits=[plans[n].sizes for n in names] if sized else None)
    for name, bits in zip(names, res.widths):
        plans[name].bits = bits.cpu().long()
    if not res.exact:
        log.warning("model budget: %s", res.message)
    return res


def solve_batches(plans: dict[str, ModulePlan], H: Tensor, cfg: CompressConfig,
                  names: tuple[str, ...]) -> list[tuple[tuple[str, ...], ColumnLayout | None]]:
    """How the layers ``names`` of one step are solved: batches of layers stacked into one
    matrix, each with its column layout (None: the natural order, one batch for all).

    With ``--act-order`` or ``--groupsize`` every layer gets a layout (its channel groups as
    segments in descending width, act-order inside them, scale groups of ``groupsize``);
    layers whose layouts are equal (always, for uniform widths) share a batch.
    """
    if not (cfg.act_order or cfg.groupsize):
        return [(names, None)]
    hdiag = torch.diag(H).clone()
    hdiag[hdiag == 0] = 1  # dead channels, as the solver treats them
    batches: list[tuple[list[str], ColumnLayout]] = []
    for name in names:
        plan = plans[name]
        lay = layout_for(plan.groups, plan.bits, hessian_diag=hdiag, act_order=cfg.act_order, groupsize=cfg.groupsize)
        for members, other in batches:
            if (torch.equal(other.perm, lay.perm) and torch.equal(other.seg_bits, lay.seg_bits)
                    and torch.equal(other.seg_len, lay.seg_len)):
                members.append(name)
                break
        else:
            batches.append(([name], lay))
    return [(tuple(members), lay) for members, lay in batches]


class SizeBudget:
    """Keeps ``--target-size`` on target over the whole model (``--budget model``) as it is solved.

    The widths were allocated on *estimated* masks (:func:`estimate_keep`); SparseGPT's real
    mask keeps more or fewer weights of each group than estimated, so a sparse model would miss
    its size by a few hundredths of a bit. After each decoder layer its real size is measured,
    as the packed file will store it, and the layers still to come are re-allocated to the bits
    that are left: the error of one layer is absorbed by the next ones, and the model lands on
    its budget. Dense models are priced exactly but for one thing: a layer whose groups all got
    one width stores no group table, which the allocation cannot know in advance.
    """

    def __init__(self, plans: dict[str, ModulePlan], cfg: CompressConfig):
        self.plans, self.cfg = plans, cfg
        self.params = {n: p.rows * p.groups.numel() for n, p in plans.items()}
        self.spent = 0.0
        self.done: set[str] = set()

    @staticmethod
    def applies(plans: dict[str, ModulePlan] | None, cfg: CompressConfig) -> bool:
        return plans is not None and cfg.target_size is not None and cfg.mixed_precision

    def measured(self, name: str, weight: Tensor, grid: QuantGrid) -> None:
        """Record the real size of solved layer ``name`` (weight [R, C] as stored, its grid)."""
        meta = describe_layer(weight, grid, self.cfg.pattern)
        self.spent += 8 * sum(layer_nbytes(meta, self.cfg.pattern, weight.element_size()).values())
        self.done.add(name)

    def replan(self) -> dict[str, Tensor]:
        """New widths for the layers not yet solved (name -> [K] widths), set in place too."""
        rest = [n for n in self.plans if n not in self.done]
        if not rest:
            return {}
        left = self.cfg.target_size * sum(self.params.values()) - self.spent
        # Overspent (estimates below the truth on a tiny model): the cheapest plan is the nearest.
        target = max(left / sum(self.params[n] for n in rest), 1e-3)
        res = allocation.allocate([self.plans[n].costs for n in rest], [self.plans[n].group_weights() for n in rest],
                                  self.cfg.bits, target, option_bits=[self.plans[n].sizes for n in rest])
        log.debug("size budget: %.4f bits/param left for %d layers: %s", target, len(rest), res.message)
        for name, bits in zip(rest, res.widths):
            self.plans[name].bits = bits.cpu().long()
        return {n: self.plans[n].bits for n in rest}


def grid_for(W: Tensor, plan: ModulePlan, cfg: CompressConfig, H: Tensor | None = None) -> QuantGrid:
    """The quantization grid of one layer under its plan (on W's device). With ``--static-groups``
    (one width): a grid per ``groupsize`` consecutive original columns, from W as it is.

    With ``--mse`` and pruning, H [C, C] lets the grid search count only the weights expected to
    survive (:func:`estimate_keep`): fitting the grid to weights that become zeros costs the
    survivors accuracy (stories260K, 50% + 3-bit: wikitext2 PPL 214 against 197 without MSE)."""
    keep = None
    sparsity = cfg.sparsity if plan.sparsity is None else plan.sparsity
    if cfg.mse and H is not None and (cfg.structured or sparsity > 0):
        keep = estimate_keep(W, H, cfg, plan.sparsity)
    if cfg.static_groups:
        C = W.shape[1]
        groups = torch.arange(C, device=W.device) // cfg.groupsize
        bits = plan.bits[:1].to(W.device).repeat(math.ceil(C / cfg.groupsize))
        return find_grid(W, groups, bits, mse=cfg.mse, keep=keep)
    return find_grid(W, plan.groups.to(W.device), plan.bits.to(W.device), mse=cfg.mse, keep=keep)


def bit_statistics(plans: dict[str, ModulePlan], target: float) -> dict:
    """The results file's ``bits`` section: histogram by width, actual vs target, per layer.

    The counting is :func:`misq.algorithms.allocation.bit_histogram`'s; this only lays it out
    (width keys as strings, for JSON).
    """
    column_bits = [plan.column_bits() for plan in plans.values()]
    hist = allocation.bit_histogram(column_bits, [plan.rows for plan in plans.values()])
    actual = hist["average_bits"]
    per_layer = [{"name": name, "avg_bits": float(cb.float().mean()), "rows": plan.rows, "cols": cb.numel(),
                  "groups": int(plan.bits.numel()), "group_bits": plan.bits.tolist(),
                  **({} if plan.sparsity is None else {"planned_sparsity": round(float(plan.sparsity), 4)})}
                 for (name, plan), cb in zip(plans.items(), column_bits)]
    return {
        "target_avg_bits": target,
        "actual_avg_bits": actual,
        "within_tolerance": abs(actual - target) <= 0.01 + 1e-9,
        "histogram": {str(b): h for b, h in hist["widths"].items()},
        "per_layer": per_layer,
    }
