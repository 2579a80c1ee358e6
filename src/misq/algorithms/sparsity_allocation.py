"""Sparsity per layer: one allocation of sparsity *and* widths, and OWL's outlier-weighted rule.

:func:`allocate_sparsity` extends the width knapsack of :mod:`misq.algorithms.allocation` by one
level. Every layer ``l`` offers candidate sparsities ``s``; under the mask of ``s`` it has an
estimated pruning loss ``P[l, s]`` and, per channel group ``g`` and width ``b``, a quantization
loss ``c[l, s, g, b]`` and an honest size ``a[l, s, g, b]`` (bits per weight of the group, mask
and grid included). The program picks one sparsity per layer and one width per group of it::

    minimise   Σ_l P[l, s_l] + Σ_{l, g} c[l, s_l, g, b_lg]
    subject to Σ_{l, g} w_lg · a[l, s_l, g, b_lg] / N  in  [size - tol, size]     (the budget)
               Σ_l n_l · s_l / N                         in  [S - tol_s, S + tol_s] (unless auto)

(``w_lg`` weights of group g, ``n_l`` weights of layer l, ``N`` all of them). It is solved
exactly as a binary program with HiGHS (``y[l, s]`` picks the sparsity, ``x[l, s, g, b]`` the
widths, ``Σ_b x[l, s, g, b] = y[l, s]``); llama-9m (42 layers, 9 sparsities, 2-6 groups, 6
widths) is ~6k binaries and solves in about a second. Past ``max_milp_vars`` (a 7B model has
~400k) a Lagrangian over both constraints is used: for prices (λ on size, μ on sparsity) every
layer picks independently, and nested bisections find the prices that meet both; with hundreds
of layers its duality gap is small, and the widths are re-allocated exactly afterwards anyway.

:func:`owl_sparsities` is OWL (Yin et al. 2023, "Outlier Weighed Layerwise sparsity"): a decoder
layer's outlier ratio ``D_l`` is the share of its Wanda scores ``|W_ij|·‖X_j‖`` above ``M`` times
the layer's mean score; ratios are scaled to ``[0, 2λ]``, centred, and layer ``l`` gets sparsity
``S - (D̂_l - mean D̂)``: more outliers, less pruning, average ``S``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

log = logging.getLogger(__name__)

EPS = 1e-9
OWL_LAMBDA = 0.08  # OWL's λ for LLaMA: sparsities spread over S ± λ
OWL_M = 5.0  # OWL's M: a score is an outlier above M × the layer's mean score


@dataclass
class LayerOptions:
    """One layer's candidates (S sparsities, K channel groups, B widths).

    sparsity: [S] fractions; prune_cost: [S] estimated pruning loss at each; costs: [S, K, B]
    quantization loss of each group and width under that sparsity's mask; sizes: [S, K, B]
    honest bits per weight of each (group, width) under that mask; weights: [K] weights per group.
    """

    sparsity: np.ndarray
    prune_cost: np.ndarray
    costs: np.ndarray
    sizes: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_tensors(cls, sparsity: Sequence[float], prune_cost: Tensor, costs: Tensor, sizes: Tensor,
                     weights: Tensor) -> LayerOptions:
        return cls(np.asarray(sparsity, dtype=np.float64), prune_cost.double().cpu().numpy(),
                   costs.double().cpu().numpy(), sizes.double().cpu().numpy(), weights.double().cpu().numpy())

    @property
    def params(self) -> float:
        return float(self.weights.sum())


@dataclass
class SparsityChoice:
    """What :func:`allocate_sparsity` chose: ``index[l]`` into layer l's sparsities, the widths
    (indices into the B widths, [K_l] per layer), the achieved averages and the total cost."""

    index: list[int]
    widths: list[np.ndarray]
    size: float
    sparsity: float
    cost: float
    exact: bool
    solver: str
    message: str


def allocate_sparsity(layers: Sequence[LayerOptions], target_size: float, target_sparsity: float | None, *,
                      size_tol: float = 0.01, sparsity_tol: float = 0.0025, solver: str = "auto",
                      max_milp_vars: int = 100_000, time_limit: float = 60.0) -> SparsityChoice:
    """Choose a sparsity per layer and a width per group (see the module docstring).

    ``target_sparsity`` None frees the average (``--sparsity auto``). When the size band is out
    of reach the cheapest plan within the size is taken, else the smallest plan; ``exact`` is
    False then and ``message`` says so.
    """
    if not layers:
        raise ValueError("no layers to allocate sparsity to")
    if solver not in ("auto", "milp", "lagrangian"):
        raise ValueError(f"solver must be auto, milp or lagrangian, got {solver!r}")
    for lay in layers:
        S, K, B = lay.costs.shape
        if lay.sizes.shape != (S, K, B) or lay.sparsity.shape != (S,) or lay.prune_cost.shape != (S,) or lay.weights.shape != (K,):
            raise ValueError("each layer needs sparsity [S], prune_cost [S], costs and sizes [S, K, B], weights [K]")
        if not (np.isfinite(lay.costs).all() and np.isfinite(lay.sizes).all() and np.isfinite(lay.prune_cost).all()):
            raise ValueError("sparsity-allocation costs or sizes are NaN/Inf")
    total = sum(lay.params for lay in layers)
    scale = max(max(float(np.abs(lay.costs).max()), float(np.abs(lay.prune_cost).max())) for lay in layers) or 1.0
    n_vars = sum(lay.costs.size + lay.sparsity.size for lay in layers)
    use_milp = solver == "milp" or (solver == "auto" and n_vars <= max_milp_vars)
    bands = [(target_size - size_tol, target_size), (-math.inf, target_size), None]
    for band in bands:
        if use_milp:
            got = _milp(layers, total, scale, band, target_sparsity, sparsity_tol, time_limit)
        else:
            got = _lagrangian(layers, total, scale, band, target_sparsity, sparsity_tol)
        if got is not None:
            break
    if got is None:
        raise ValueError(f"no sparsity plan meets the average sparsity {target_sparsity} with these candidates")
    index, widths = got
    size = sum(float((lay.weights * lay.sizes[i, np.arange(len(w)), w]).sum()) for lay, i, w in zip(layers, index, widths)) / total
    spars = sum(lay.params * float(lay.sparsity[i]) for lay, i in zip(layers, index)) / total
    cost = sum(float(lay.prune_cost[i] + lay.costs[i, np.arange(len(w)), w].sum()) for lay, i, w in zip(layers, index, widths))
    exact = band is bands[0] and abs(size - target_size) <= size_tol + 1e-6
    what = "" if target_sparsity is None else f" (target {target_sparsity}), "
    message = (f"sparsity {spars:.4f}{what} size {size:.4f} bits/param (target {target_size}) over {len(layers)} layers"
               + ("" if exact else ": the size band is out of reach, nearest taken"))
    return SparsityChoice(index, widths, size, spars, cost, exact, "milp" if use_milp else "lagrangian", message)


def _milp(layers: Sequence[LayerOptions], total: float, scale: float, band: tuple[float, float] | None,
          target_sparsity: float | None, sparsity_tol: float, time_limit: float):
    """Exact binary program (HiGHS); ``band`` None: minimise the size instead of the cost.
    Returns (sparsity index per layer, width index [K_l] per layer) or None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    obj, size_row, spars_row = [], [], []
    eq_rows, eq_cols, eq_vals, rhs = [], [], [], []
    offsets = []
    col = 0
    for lay in layers:
        S, K, B = lay.costs.shape
        y0, x0 = col, col + S
        offsets.append((y0, x0))
        obj += list(lay.prune_cost / scale) + list((lay.costs / scale).reshape(-1))
        size_row += [0.0] * S + list((lay.weights[None, :, None] * lay.sizes / total).reshape(-1))
        spars_row += list(lay.params * lay.sparsity / total) + [0.0] * (S * K * B)
        # one sparsity per layer: Σ_s y[s] = 1
        eq_rows += [len(rhs)] * S
        eq_cols += list(range(y0, y0 + S))
        eq_vals += [1.0] * S
        rhs.append(1.0)
        # each group of the chosen sparsity takes one width, the others none: Σ_b x[s, g, b] - y[s] = 0
        for s in range(S):
            for g in range(K):
                eq_rows += [len(rhs)] * (B + 1)
                eq_cols += [x0 + (s * K + g) * B + b for b in range(B)] + [y0 + s]
                eq_vals += [1.0] * B + [-1.0]
                rhs.append(0.0)
        col = x0 + S * K * B
    n_eq = len(rhs)
    rhs = np.asarray(rhs)
    A_eq = coo_array((eq_vals, (eq_rows, eq_cols)), shape=(n_eq, col)).tocsr()
    cons = [LinearConstraint(A_eq, rhs, rhs)]
    size_arr = np.asarray(size_row)
    if band is not None:
        cons.append(LinearConstraint(size_arr[None, :], band[0] - EPS, band[1] + EPS))
    if target_sparsity is not None:
        cons.append(LinearConstraint(np.asarray(spars_row)[None, :], target_sparsity - sparsity_tol - EPS,
                                     target_sparsity + sparsity_tol + EPS))
    c = np.asarray(obj) if band is not None else size_arr
    res = milp(c, constraints=cons, integrality=np.ones(col), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-7})
    if res.x is None:
        return None
    if res.status != 0:
        log.warning("sparsity MILP stopped early (%s): using its best solution", res.message)
    index, widths = [], []
    for lay, (y0, x0) in zip(layers, offsets):
        S, K, B = lay.costs.shape
        s = int(np.argmax(res.x[y0 : y0 + S]))
        index.append(s)
        widths.append(res.x[x0 + s * K * B : x0 + (s + 1) * K * B].reshape(K, B).argmax(axis=1))
    return index, widths


def _lagrangian(layers: Sequence[LayerOptions], total: float, scale: float, band: tuple[float, float] | None,
                target_sparsity: float | None, sparsity_tol: float):
    """Nested bisection on the size price λ (outer) and the sparsity price μ (inner); every layer
    then picks its sparsity and widths independently. Returns the choice or None when it misses."""

    def pick(lam: float, mu: float):
        index, widths, size, spars = [], [], 0.0, 0.0
        for lay in layers:
            a = lay.weights[None, :, None] * lay.sizes / total  # [S, K, B]
            obj = lay.costs / scale + lam * a
            w = obj.argmin(axis=2)  # [S, K]
            per_s = lay.prune_cost / scale + np.take_along_axis(obj, w[..., None], 2)[..., 0].sum(1)
            per_s = per_s + mu * lay.params * lay.sparsity / total
            s = int(per_s.argmin())
            index.append(s)
            widths.append(w[s])
            size += float(np.take_along_axis(a[s], w[s][:, None], 1).sum())
            spars += lay.params * float(lay.sparsity[s]) / total
        return index, widths, size, spars

    def at_price(lam: float):
        if target_sparsity is None:
            return pick(lam, 0.0)
        lo, hi = -1e6, 1e6  # a higher μ prunes less
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if pick(lam, mid)[3] > target_sparsity + sparsity_tol:
                lo = mid
            else:
                hi = mid
        return pick(lam, hi)

    if band is None:
        got = at_price(1e9)
    else:
        lo, hi = 0.0, 1.0
        while at_price(hi)[2] > band[1] + EPS and hi < 1e12:
            hi *= 4
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if at_price(mid)[2] > band[1] + EPS:
                lo = mid
            else:
                hi = mid
        got = at_price(hi)
        if not band[0] - EPS <= got[2] <= band[1] + EPS:
            return None
    if target_sparsity is not None and abs(got[3] - target_sparsity) > sparsity_tol:
        # Prices cannot split a layer: with few layers the average lands a step away; logged.
        log.warning("sparsity allocation (lagrangian): average sparsity %.4f, target %.4f", got[3], target_sparsity)
    return got[0], got[1]


def outlier_ratio(scores: Sequence[Tensor], m: float = OWL_M) -> float:
    """OWL's outlier ratio of one decoder layer: the share of its Wanda scores (every linear's
    ``|W|·‖X_j‖``, concatenated) above ``m`` × their mean."""
    n = sum(int(t.numel()) for t in scores)
    mean = sum(float(t.double().sum()) for t in scores) / max(n, 1)
    return sum(int((t > m * mean).sum()) for t in scores) / max(n, 1)


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> np.ndarray:
    """[L] sparsity per decoder layer from its outlier ratio (OWL): the ratios are scaled to
    [0, 2λ] and centred, and subtracted from ``sparsity`` (more outliers, less pruning). Layers
    are taken as equal in size (LLaMA's are), so the mean is ``sparsity``; clipped to [0, 0.99]."""
    r = np.asarray(ratios, dtype=np.float64)
    spread = float(r.max() - r.min()) if r.size else 0.0
    if spread <= 0:
        return np.full(r.shape, float(sparsity))
    density = (r - r.min()) / spread * lam * 2
    density = density - density.mean() + (1.0 - sparsity)
    return np.clip(1.0 - density, 0.0, 0.99)


__all__ = ["OWL_LAMBDA", "OWL_M", "LayerOptions", "SparsityChoice", "allocate_sparsity", "outlier_ratio", "owl_sparsities"]
