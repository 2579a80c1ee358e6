"""Bit-width allocation: which width each channel group gets so the average meets the target.

:func:`group_costs` estimates, for every group and every candidate width, the loss that
quantizing the group's surviving weights would add (diagonal OBS approximation: Hessian-weighted
squared rounding error, ``sum_j H_jj sum_r keep_rj (W_rj - Q_b(W_rj))^2``).

:func:`allocate` then solves the multiple-choice knapsack: one width per group, minimum total
cost, weight-averaged width within ``[target - tol, target]`` (a budget is a cap: the average
never exceeds the target, up to HiGHS's ~1e-6 feasibility tolerance). Since cost falls with
width, the optimum spends nearly all the budget, so the average lands next to the target.

Solvers: an exact binary program with SciPy's HiGHS MILP (``x[g, b]`` binary, one width per
group, the budget as one two-sided row). Measured on 2 CPU cores: 560 groups x 5 widths in
under a second, 2240 (a 7B model, 7 linears x 32 blocks x 10 groups) in about 2 s, 5600 in
about 10 s. Beyond ``max_milp_vars`` binaries a Lagrangian sweep with greedy repair is used
instead: milliseconds, within ~1e-5 of the optimum on such instances (the LP relaxation of
this problem has at most one fractional group, so pricing the budget is nearly exact when
groups are many). The Lagrangian answer is always computed and kept if a time-limited MILP
returns something worse.

Rule when the band is empty (too few groups for the granularity, e.g. one group and a target
of 3.5 with widths {2,3,4,6,8}): take the reachable average nearest to the target (ties: the
lower one, which respects the budget), and the cheapest assignment at that average (the
Lagrangian fallback takes its best average below the target instead). The result then says
``exact=False`` when that average is more than ``tol`` away, and its ``message`` says why, for
the caller to log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from misq.errors import MisqError, NumericalError

log = logging.getLogger(__name__)

QuantizeFn = Callable[[Tensor, int], Tensor]
EPS = 1e-9  # slack on averages, in bits: far below any width step of a real group


def _rtn(W_cols: Tensor, bits: int) -> Tensor:
    """Round-to-nearest on one asymmetric min-max grid per row, dequantized (``[R, c]``).

    GPTQ's quantizer semantics: the range always contains 0 (``min <= 0 <= max``), an all-zero
    row gets the range [-1, 1], ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min/scale)``.
    """
    maxq = 2**bits - 1
    xmin = W_cols.amin(dim=1, keepdim=True).clamp(max=0)
    xmax = W_cols.amax(dim=1, keepdim=True).clamp(min=0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(W_cols / scale) + zero, 0, maxq)
    return scale * (q - zero)


def group_costs(
    W: Tensor,
    H: Tensor,
    groups: Tensor,
    bits: Sequence[int],
    keep: Tensor | None = None,
    quantize_fn: QuantizeFn | None = None,
) -> Tensor:
    """Loss each group would add at each width (``[K, len(bits)]``, float64).

    Args:
        W: ``[R, C]`` weights (pruned entries may hold anything: they are zeroed here).
        H: ``[C, C]`` input second moments; only the diagonal is used.
        groups: ``LongTensor [C]`` of group ids in ``[0, K)``.
        bits: candidate widths.
        keep: ``BoolTensor [R, C]``, True for surviving weights; all kept if ``None``. Pruned
            weights are exact zeros, which the min-max grid (always containing 0) represents
            exactly, so they set no range and add no error.
        quantize_fn: ``(W_cols [R, c], bits) -> dequantized [R, c]``, one grid per row of the
            group; defaults to :func:`_rtn`.

    Returns:
        ``cost[g, i] = sum_{j in g} H_jj sum_r keep_rj (W_rj - Q_bits[i](W_rj))^2``, made
        non-increasing along widths sorted ascending (a cumulative minimum: more bits never
        cost more; min-max rounding noise occasionally breaks that by a hair).
    """
    if W.dim() != 2 or groups.shape != (W.shape[1],):
        raise ValueError(f"W must be [R, C] and groups [C], got {tuple(W.shape)} and {tuple(groups.shape)}")
    quantize_fn = quantize_fn or _rtn
    bits = [int(b) for b in bits]
    Wf = W.float()
    if keep is not None:
        Wf = Wf * keep.to(Wf.device)
    hdiag = torch.diagonal(H).to(Wf.device).float().clamp(min=0)
    groups = groups.to(Wf.device)
    K = int(groups.max()) + 1 if groups.numel() else 0
    cost = torch.zeros(K, len(bits), dtype=torch.float64)
    for g in range(K):
        idx = (groups == g).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        Wg = Wf[:, idx]
        mask = None if keep is None else keep[:, idx].to(Wf.device)
        for i, b in enumerate(bits):
            err = (Wg - quantize_fn(Wg, b)).pow_(2)
            if mask is not None:
                err = err * mask
            cost[g, i] = float((err.sum(0) * hdiag[idx]).sum())
    if not torch.isfinite(cost).all():
        raise NumericalError("group costs are NaN/Inf: the layer's weights or Hessian are not finite")
    order = np.argsort(bits, kind="stable")
    cost[:, order] = torch.cummin(cost[:, order], dim=1).values
    return cost


@dataclass
class AllocationResult:
    """One width per group, for every layer passed to :func:`allocate`."""

    widths: list[Tensor]  # per layer, LongTensor [K_l] of widths (values from ``bits``)
    average: float  # achieved weight-averaged width over all groups passed in
    cost: float  # total cost of the chosen widths
    exact: bool  # average within target +- tol
    message: str  # one line for the log; says why when not exact
    solver: str = "milp"  # "milp" (optimal unless its time limit hit, logged) or "lagrangian"
    layer_averages: list[float] = field(default_factory=list)


def allocate(
    costs: Sequence[Tensor] | Tensor,
    weights: Sequence[Tensor] | Tensor,
    bits: Sequence[int],
    target: float,
    tol: float = 0.01,
    *,
    solver: str = "auto",
    time_limit: float = 30.0,
    max_milp_vars: int = 20_000,
    option_bits: Sequence[Tensor] | Tensor | None = None,
) -> AllocationResult:
    """Choose one width per group, minimising total cost with the average width on target.

    Args:
        costs: ``[K_l, B]`` cost table per layer (a bare tensor means one layer). One layer
            for ``--budget layer``, all layers for ``--budget model``.
        weights: ``[K_l]`` number of weights per group (``rows x channels``), per layer.
        bits: the ``B`` widths, matching the cost columns.
        target: target weight-averaged width.
        tol: allowed shortfall below ``target`` (the average never exceeds ``target`` when
            ``[target - tol, target]`` is reachable; see the module docstring otherwise).
        solver: ``"auto"``, ``"milp"`` or ``"lagrangian"``.
        time_limit: seconds for each HiGHS solve.
        max_milp_vars: above this many binaries ``"auto"`` uses the Lagrangian solver.
        option_bits: ``[K_l, B]`` per layer: what one weight of group k costs at width b, in
            honest bits (codes, mask, scales, zeros, order: :func:`misq.algorithms.column_layout.segment_bits`
            over the group's weights). The budget then caps the weight-averaged *cost*, not the
            width: ``target`` is the honest size. None: the width itself (``--target_avg_bits``).
    """
    cost_list = [costs] if isinstance(costs, Tensor) else list(costs)
    weight_list = [weights] if isinstance(weights, Tensor) else list(weights)
    bits_arr = _check_budget(bits, target, tol, sized=option_bits is not None)
    if solver not in ("auto", "milp", "lagrangian"):
        raise ValueError(f"solver must be auto, milp or lagrangian, got {solver!r}")
    if len(cost_list) != len(weight_list):
        raise ValueError(f"{len(cost_list)} cost tables but {len(weight_list)} weight vectors")
    sizes = [int(c.shape[0]) for c in cost_list]
    if sum(sizes) == 0:
        raise ValueError("no groups to allocate widths to")
    for c, w in zip(cost_list, weight_list):
        if c.dim() != 2 or c.shape[1] != len(bits_arr) or w.shape != (c.shape[0],):
            raise ValueError(f"costs must be [K, {len(bits_arr)}] with weights [K], got {tuple(c.shape)} and {tuple(w.shape)}")
    c_orig = torch.cat([x.detach().double().cpu() for x in cost_list]).numpy()
    w = torch.cat([x.detach().double().cpu() for x in weight_list]).numpy()
    if not (np.isfinite(c_orig).all() and np.isfinite(w).all()):
        raise NumericalError("group costs or weights are NaN/Inf: the layer's weights or Hessian are not finite")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("group weights must be non-negative with a positive total")
    G, B = c_orig.shape
    # Shift each group's costs to start at 0 (one choice per group: the optimum is unchanged)
    # and scale to 1, so HiGHS's absolute tolerances mean the same for every layer.
    c = c_orig - c_orig.min(axis=1, keepdims=True)
    c = c / max(float(c.max()), 1e-300)
    if option_bits is None:
        per_weight = np.broadcast_to(bits_arr[None, :], (G, B))
    else:
        opt_list = [option_bits] if isinstance(option_bits, Tensor) else list(option_bits)
        per_weight = torch.cat([x.detach().double().cpu() for x in opt_list]).numpy()
        if per_weight.shape != (G, B) or not np.isfinite(per_weight).all():
            raise ValueError(f"option_bits must be finite [K, {B}] per layer, like costs")
    a = (w / w.sum())[:, None] * per_weight  # [G, B]: contribution to the average

    rows = np.arange(G)
    use_milp = solver == "milp" or (solver == "auto" and max_milp_vars >= G * B)
    # The Lagrangian answer costs milliseconds: always computed, it is the fallback and it
    # guards against a MILP stopped by its time limit with a worse incumbent.
    choice = _lagrangian(c, a, target, tol)
    used = "lagrangian"
    if use_milp:
        exact_choice, status = _milp(c, a, target - tol - EPS, target + EPS, time_limit)
        if exact_choice is None and status != 2:  # 2: band proved empty; else out of time
            log.warning("MILP found no solution within %.0f s for %d groups: using the Lagrangian solver", time_limit, G)
            use_milp = False
        elif exact_choice is not None and (choice is None or c[rows, exact_choice].sum() <= c[rows, choice].sum()):
            choice, used = exact_choice, "milp"
    if choice is None:  # the band [target - tol, target] is empty: nearest reachable average
        choice = _nearest(c, a, target, time_limit) if use_milp else _lagrangian(c, a, target, math.inf)
        used = "milp" if use_milp else "lagrangian"

    widths_all = bits_arr[choice].astype(np.int64)
    avg = float(a[rows, choice].sum())
    exact = abs(avg - target) <= tol + EPS
    total = float(c_orig[rows, choice].sum())
    widths, layer_avg = [], []
    for lo, hi in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)):
        widths.append(torch.from_numpy(widths_all[lo:hi].copy()))
        layer_avg.append(float((w[lo:hi] * widths_all[lo:hi]).sum() / max(w[lo:hi].sum(), 1e-300)))
    if exact:
        message = f"average {avg:.4f} bits meets target {target} (tolerance {tol}) over {G} groups"
    else:
        message = (
            f"target {target} bits is not reachable within {tol} with {G} group(s) and widths {tuple(int(b) for b in bits_arr)}: "
            f"using the nearest reachable {'size' if option_bits is not None else 'average'} {avg:.4f}; "
            "use more groups (--n_groups), other --bits or --budget model for a finer budget"
        )
    log.debug("allocation (%s): %s; cost %.6g", used, message, total)
    return AllocationResult(widths, avg, total, exact, message, used, layer_avg)


def _check_budget(bits: Sequence[int], target: float, tol: float, *, sized: bool = False) -> np.ndarray:
    if len(bits) == 0:
        raise MisqError("--bits is empty: give a comma-separated list of widths, e.g. --bits 2,3,4,6,8")
    arr = np.asarray([int(b) for b in bits], dtype=np.float64)
    if len(set(arr.tolist())) != len(arr):
        raise MisqError(f"--bits {tuple(int(b) for b in bits)} repeats a width: list each width once")
    lo, hi = float(arr.min()), float(arr.max())
    # An honest-size budget may lie outside the widths (overhead); the nearest feasible size is
    # taken then, and the result says so.
    if sized and (math.isnan(float(target)) or not float(target) > 0):
        raise MisqError(f"--target-size {target} must be a positive number of bits per parameter")
    if not sized and (math.isnan(float(target)) or not lo <= float(target) <= hi):
        raise MisqError(f"--target_avg_bits {target} is outside the widths in --bits ({lo:g}..{hi:g}): choose a target between {lo:g} and {hi:g}, or widen --bits")
    if not tol >= 0:
        raise MisqError(f"budget tolerance {tol} must be non-negative, e.g. 0.01")
    return arr


def _milp(obj: np.ndarray, a: np.ndarray, lo: float, hi: float, time_limit: float):
    """HiGHS: binary x [G, B], one width per group, ``lo <= sum a x <= hi``; minimise ``obj . x``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, eye, kron

    G, B = a.shape
    one_each = kron(eye(G, format="csr"), np.ones((1, B)), format="csr")  # [G, G*B]
    budget = csr_array(a.reshape(1, -1))
    cons = [LinearConstraint(one_each, 1, 1), LinearConstraint(budget, lo, hi)]
    res = milp(
        obj.reshape(-1), constraints=cons, integrality=np.ones(G * B), bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
    )
    if res.x is None:
        return None, res.status
    if res.status != 0:
        log.warning("MILP stopped early (%s): using its best solution", res.message)
    return res.x.reshape(G, B).argmax(axis=1), res.status


def _nearest(c: np.ndarray, a: np.ndarray, target: float, time_limit: float) -> np.ndarray:
    """Cheapest choice at the reachable average nearest to ``target`` (ties: the lower)."""
    below, _ = _milp(-a, a, -math.inf, target + EPS, time_limit)  # largest average <= target
    above, _ = _milp(a, a, target - EPS, math.inf, time_limit)  # smallest average >= target
    rows = np.arange(a.shape[0])
    a_lo = a[rows, below].sum() if below is not None else -math.inf
    a_hi = a[rows, above].sum() if above is not None else math.inf
    # Every average in [a_lo, target] is a_lo (and in [target, a_hi] is a_hi), so these bands
    # hold exactly the assignments at that average; take the cheapest one.
    lo, hi = (a_lo - EPS, target + EPS) if target - a_lo <= a_hi - target else (target - EPS, a_hi + EPS)
    best, _ = _milp(c, a, lo, hi, time_limit)
    return best if best is not None else (below if target - a_lo <= a_hi - target else above)


def _lagrangian(c: np.ndarray, a: np.ndarray, target: float, tol: float) -> np.ndarray | None:
    """Heuristic for very large instances: price the budget, then spend what is left greedily.

    For a price ``lam`` every group independently picks ``argmin c + lam * a``; the average
    falls as ``lam`` rises, so bisection finds the cheapest choice with average <= target.
    Greedy repair then upgrades, one step at a time, the group with the largest cost saving per
    unit of budget that still fits. Returns None when the result misses ``[target - tol, target]``.
    """
    rows = np.arange(a.shape[0])

    def pick(lam: float) -> np.ndarray:
        return np.argmin(c + lam * a, axis=1)

    lo, hi = 0.0, 1.0
    while a[rows, pick(hi)].sum() > target + EPS and hi < 1e30:
        hi *= 4
    if a[rows, pick(lo)].sum() <= target + EPS:
        hi = lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if a[rows, pick(mid)].sum() > target + EPS:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    spent = a[rows, choice].sum()
    for _ in range(10 * len(rows)):
        extra = a - a[rows, choice][:, None]  # [G, B] budget each move needs
        saving = c[rows, choice][:, None] - c
        ok = (extra > 0) & (saving > 0) & (spent + extra <= target + EPS)
        if not ok.any():
            break
        ratio = np.where(ok, saving / np.where(ok, extra, 1.0), -np.inf)
        g, b = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += extra[g, b]
        choice[g] = b
    if target - spent > tol + EPS:
        return None
    return choice


def bit_histogram(bits_per_channel: Sequence[Tensor], rows: Sequence[int]) -> dict:
    """Width statistics over layers.

    Args:
        bits_per_channel: per layer, ``[C_l]`` width of every input channel (``widths[groups]``).
        rows: per layer, the number of output rows ``R_l`` (weights per channel).

    Returns:
        ``{"widths": {b: {"channels", "channel_share", "weights", "weight_share"}}, "channels",
        "weights", "average_bits" (per weight), "channel_average_bits"}``.
    """
    if len(bits_per_channel) != len(rows):
        raise ValueError(f"{len(bits_per_channel)} layers of widths but {len(rows)} row counts")
    per_ch = [t.detach().long().cpu() for t in bits_per_channel]
    n_ch = sum(int(t.numel()) for t in per_ch)
    n_w = sum(int(t.numel()) * int(r) for t, r in zip(per_ch, rows))
    widths: dict[int, dict] = {}
    for t, r in zip(per_ch, rows):
        vals, counts = torch.unique(t, return_counts=True)
        for v, k in zip(vals.tolist(), counts.tolist()):
            e = widths.setdefault(int(v), {"channels": 0, "weights": 0})
            e["channels"] += k
            e["weights"] += k * int(r)
    for e in widths.values():
        e["channel_share"] = e["channels"] / n_ch if n_ch else 0.0
        e["weight_share"] = e["weights"] / n_w if n_w else 0.0
    return {
        "widths": dict(sorted(widths.items())),
        "channels": n_ch,
        "weights": n_w,
        "average_bits": sum(b * e["weights"] for b, e in widths.items()) / n_w if n_w else 0.0,
        "channel_average_bits": sum(b * e["channels"] for b, e in widths.items()) / n_ch if n_ch else 0.0,
    }


__all__ = ["AllocationResult", "allocate", "bit_histogram", "group_costs"]
