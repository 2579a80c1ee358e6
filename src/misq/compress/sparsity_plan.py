"""Sparsity per layer (``--sparsity-allocation``): candidates measured in the first pass, one choice.

With ``--budget model`` the first pass (:func:`misq.compress.driver.measure_model_plan`) sees
every linear layer's dense W [R, C] and its H [C, C]. For each candidate sparsity ``s``
(:func:`candidate_sparsities`) :func:`add_options` records, under the mask SparseGPT is
expected to choose at ``s`` (:func:`misq.compress.bitplan.estimate_keep`, block by block):

- the pruning loss ``Σ_pruned w²·H_jj / tr(W H Wᵀ)``: the same diagonal saliency that chooses
  the estimated mask and that prices quantization (:func:`misq.algorithms.allocation.group_costs`),
  relative to the layer's output energy as the width costs are, so the two losses add up in
  one unit and trade against each other in one program;
- the width cost table [K, B] of its groups with that mask, and their honest sizes [K, B]
  (fewer survivors, fewer code bits; the mask bit is paid by every layer of a sparse model,
  since the packed format stores one per layer).

Then :func:`choose` picks one sparsity per layer before the widths are allocated:

- ``loss``: :func:`misq.algorithms.sparsity_allocation.allocate_sparsity`, one program over
  sparsities and widths, the average sparsity held at ``--sparsity`` and the size at
  ``--target-size``;
- ``auto``: the same with the average free (candidates 0 .. 0.8);
- ``owl``: OWL's outlier-weighted rule per decoder layer (all its linears share it), its cost
  and size tables interpolated between the two nearest candidates (both are smooth in ``s``; the
  size budget re-plans from measured sizes anyway, :class:`misq.compress.bitplan.SizeBudget`).

The width allocation that follows (:func:`misq.compress.bitplan.allocate_model`) and the size
budget's re-plans then work on the chosen sparsity's tables, and the solver prunes each layer
at its ``plan.sparsity``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from misq.algorithms.sparsity_allocation import OWL_M, LayerOptions, allocate_sparsity, owl_sparsities
from misq.compress import bitplan
from misq.config import CompressConfig

log = logging.getLogger(__name__)

LOSS_OFFSETS = (0.0, 0.05, 0.1, 0.15, 0.2)  # loss: S ± these
OWL_OFFSETS = (0.0, 0.05, 0.1)  # owl: S ± λ (0.08) lies inside, for interpolation
AUTO_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_SPARSITY = 0.9
SKETCH = 2048  # quantiles of each layer's Wanda scores kept for OWL's outlier count


@dataclass
class SparsityOptions:
    """One layer's candidates: sparsity [S], prune_cost [S] (relative loss), costs and sizes
    [S, K, B] (width tables under each sparsity's mask), and for OWL a sketch of its Wanda
    scores: ``score_sum``, ``score_count`` and ``score_quantiles`` [SKETCH] (sorted)."""

    sparsity: list[float]
    prune_cost: Tensor
    costs: Tensor
    sizes: Tensor
    score_sum: float
    score_count: int
    score_quantiles: Tensor


def candidate_sparsities(cfg: CompressConfig) -> list[float]:
    """The sparsities each layer may take (sorted, in [0, MAX_SPARSITY])."""
    if cfg.sparsity_allocation == "auto":
        return list(AUTO_SPARSITIES)
    offsets = OWL_OFFSETS if cfg.sparsity_allocation == "owl" else LOSS_OFFSETS
    cands = {round(min(max(cfg.sparsity + sign * d, 0.0), MAX_SPARSITY), 6) for d in offsets for sign in (-1, 1)}
    return sorted(cands)


def add_options(plan: bitplan.ModulePlan, W: Tensor, H: Tensor, cfg: CompressConfig) -> None:
    """Measure layer ``plan.name``'s candidates (W [R, C], H [C, C]) into ``plan.options``."""
    Wf = W.float()
    hdiag = torch.diag(H).float().clamp_min(0)
    sal = Wf**2 * hdiag.unsqueeze(0)
    energy = torch.sum((Wf @ H.float()) * Wf).clamp_min(1e-30)
    K = plan.bits.numel()
    cands = candidate_sparsities(cfg)
    prune, costs, sizes = [], [], []
    for s in cands:
        keep = bitplan.estimate_keep(W, H, cfg, sparsity=s)
        prune.append(float(sal[~keep].sum() / energy))
        costs.append(bitplan.module_costs(W, H, plan.groups.to(W.device), cfg, relative=True, keep=keep))
        sizes.append(bitplan.option_sizes(keep, plan.groups, K, cfg))
    scores = (Wf.abs() * hdiag.sqrt().unsqueeze(0)).flatten()  # Wanda: |W_ij|·‖X_j‖, ‖X_j‖² ∝ H_jj
    q = torch.linspace(0, 1, SKETCH, device=scores.device, dtype=torch.float32)
    quantiles = torch.sort(scores).values[(q * (scores.numel() - 1)).round().long()]
    plan.options = SparsityOptions(cands, torch.tensor(prune, dtype=torch.float64), torch.stack(costs),
                                   torch.stack(sizes), float(scores.double().sum()), scores.numel(), quantiles.cpu())


def choose(plans: dict[str, bitplan.ModulePlan], cfg: CompressConfig) -> None:
    """Set every plan's ``sparsity``, ``costs`` and ``sizes`` to its chosen candidate (see the
    module docstring), then drop the candidates."""
    if cfg.sparsity_allocation == "owl":
        _choose_owl(plans, cfg)
    else:
        _choose_by_loss(plans, cfg)
    for plan in plans.values():
        plan.options = None
    _log_by_layer(plans)


def _choose_by_loss(plans: dict[str, bitplan.ModulePlan], cfg: CompressConfig) -> None:
    names = list(plans)
    layers = [LayerOptions.from_tensors(plans[n].options.sparsity, plans[n].options.prune_cost, plans[n].options.costs,
                                        plans[n].options.sizes, plans[n].group_weights()) for n in names]
    target = None if cfg.sparsity_allocation == "auto" else cfg.sparsity
    res = allocate_sparsity(layers, float(cfg.target_size), target)
    (log.info if res.exact else log.warning)("sparsity allocation (%s): %s", res.solver, res.message)
    for name, i in zip(names, res.index):
        _take(plans[name], i)


def _choose_owl(plans: dict[str, bitplan.ModulePlan], cfg: CompressConfig) -> None:
    by_layer: dict[int, list[str]] = {}
    for name in plans:
        by_layer.setdefault(_layer_index(name), []).append(name)
    order = sorted(by_layer)
    ratios = [_sketch_outlier_ratio([plans[n].options for n in by_layer[i]]) for i in order]
    spars = owl_sparsities(ratios, cfg.sparsity)
    log.info("OWL outlier ratios %s -> sparsities %s", np.round(ratios, 4).tolist(), np.round(spars, 3).tolist())
    for i, s in zip(order, spars):
        for name in by_layer[i]:
            _interpolate(plans[name], float(s))


def _sketch_outlier_ratio(options: list[SparsityOptions]) -> float:
    """OWL's outlier ratio of one decoder layer from its linears' score sketches: the mean over
    all their scores, then each linear's share above M × that mean read off its quantiles."""
    n = sum(o.score_count for o in options)
    thresh = OWL_M * sum(o.score_sum for o in options) / max(n, 1)
    above = 0.0
    for o in options:
        frac_below = torch.searchsorted(o.score_quantiles, torch.tensor([thresh], dtype=o.score_quantiles.dtype)).item()
        above += o.score_count * (1.0 - frac_below / o.score_quantiles.numel())
    return above / max(n, 1)


def _take(plan: bitplan.ModulePlan, i: int) -> None:
    o = plan.options
    plan.sparsity = float(o.sparsity[i])
    plan.costs, plan.sizes = o.costs[i].clone(), o.sizes[i].clone()


def _interpolate(plan: bitplan.ModulePlan, s: float) -> None:
    """Tables at sparsity ``s`` by linear interpolation between the nearest two candidates."""
    o = plan.options
    grid = np.asarray(o.sparsity)
    j = int(np.clip(np.searchsorted(grid, s), 1, len(grid) - 1))
    t = float(np.clip((s - grid[j - 1]) / max(grid[j] - grid[j - 1], 1e-12), 0.0, 1.0))
    plan.sparsity = s
    plan.costs = (1 - t) * o.costs[j - 1] + t * o.costs[j]
    plan.sizes = (1 - t) * o.sizes[j - 1] + t * o.sizes[j]


def _layer_index(name: str) -> int:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def _log_by_layer(plans: dict[str, bitplan.ModulePlan]) -> None:
    """One line: each decoder layer's parameter-weighted sparsity, and the model's."""
    acc: dict[int, list[float]] = {}
    for name, p in plans.items():
        n = p.rows * p.groups.numel()
        e = acc.setdefault(_layer_index(name), [0.0, 0.0])
        e[0] += n * float(p.sparsity or 0.0)
        e[1] += n
    total = sum(e[0] for e in acc.values()) / max(sum(e[1] for e in acc.values()), 1)
    log.info("sparsity by layer: %s (average %.4f)", " ".join(f"{e[0] / e[1]:.3f}" for _, e in sorted(acc.items())), total)

