"""Group costs, the bit-width knapsack and the width histogram (pure tensors, CPU, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from misq.algorithms.allocation import _rtn, allocate, bit_histogram, group_costs
from misq.algorithms.grouping import group_channels
from misq.errors import MisqError

BITS = (2, 3, 4, 6, 8)


def _convex_costs(K: int, seed: int, bits=BITS) -> torch.Tensor:
    """Random costs, decreasing and convex in the width index, spread over decades."""
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.uniform(0.05, 1.0, size=(K, len(bits) - 1)), axis=1)[:, ::-1]  # shrinking drops
    tail = rng.uniform(0.0, 0.05, size=(K, 1))
    cost = tail + np.concatenate([np.cumsum(steps[:, ::-1], axis=1)[:, ::-1], np.zeros((K, 1))], axis=1)
    return torch.from_numpy(cost * 10 ** rng.uniform(-2, 2, size=(K, 1)))


def _brute_force(cost: np.ndarray, w: np.ndarray, bits, target: float, tol: float):
    """Reference rule by enumeration: cheapest with average in [target - tol, target]; else
    the reachable average nearest to target (ties: lower), cheapest at that average."""
    eps = 1e-9
    choices = np.array(list(itertools.product(range(len(bits)), repeat=len(w))))  # [B^G, G]
    avgs = (w * np.asarray(bits, dtype=float)[choices]).sum(1) / w.sum()
    costs = cost[np.arange(len(w)), choices].sum(1)
    band = (avgs >= target - tol - eps) & (avgs <= target + eps)
    if band.any():
        i = np.flatnonzero(band)[np.argmin(costs[band])]
        return float(avgs[i]), float(costs[i]), True
    lo, hi = avgs[avgs <= target].max(), avgs[avgs >= target].min()
    pick = lo if target - lo <= hi - target else hi
    at = np.abs(avgs - pick) <= eps
    return float(pick), float(costs[at].min()), abs(pick - target) <= tol


# --- quantizer and costs ---------------------------------------------------------------------


def test_rtn_grid_semantics():
    W = torch.tensor([[0.5, 1.0, 2.0], [-3.0, -1.0, -2.0], [0.0, 0.0, 0.0], [-1.0, 0.25, 1.0]])
    Q = _rtn(W, 2)
    # row 0: range [0, 2] (0 included), scale 2/3: 0.5 -> 2/3, 1 -> 4/3, 2 -> 2
    assert torch.allclose(Q[0], torch.tensor([2 / 3, 4 / 3, 2.0]))
    assert torch.allclose(Q[1], torch.tensor([-3.0, -1.0, -2.0]))  # range [-3, 0], scale 1
    assert torch.equal(Q[2], torch.zeros(3))  # all-zero row: exact zeros
    assert torch.all(_rtn(W, 8).sub(W).abs() <= (W.amax(1, keepdim=True).clamp(min=0) - W.amin(1, keepdim=True).clamp(max=0)) / 255 / 2 + 1e-6)
    # zero is always exactly representable (pruned weights stay zero)
    assert float(_rtn(torch.tensor([[0.0, 0.37, -0.91]]), 3)[0, 0]) == 0.0


def test_group_costs_formula_keep_mask_and_monotone():
    gen = torch.Generator().manual_seed(0)
    R, C = 16, 12
    W = torch.randn(R, C, generator=gen)
    H = torch.diag(torch.rand(C, generator=gen) + 0.1) + 0.01
    groups = torch.tensor([0, 1, 2] * 4)
    keep = torch.rand(R, C, generator=gen) > 0.5
    cost = group_costs(W, H, groups, BITS, keep=keep)
    assert cost.shape == (3, len(BITS))
    # by hand for group 1, 3 bits: pruned weights are zero in the grid and add no error
    idx = (groups == 1).nonzero().squeeze(1)
    Wg = (W * keep)[:, idx]
    err = ((Wg - _rtn(Wg, 3)) ** 2 * keep[:, idx]).sum(0)
    assert float(cost[1, 1]) == pytest.approx(float((err * H.diagonal()[idx]).sum()), rel=1e-5)
    assert (cost[:, 1:] <= cost[:, :-1]).all()
    # changing a pruned weight changes nothing
    W2 = W.clone()
    W2[~keep] = 100.0
    assert torch.allclose(group_costs(W2, H, groups, BITS, keep=keep), cost)
    # injectable quantizer: identity gives zero cost
    assert group_costs(W, H, groups, BITS, quantize_fn=lambda x, b: x).abs().max() == 0


def test_group_costs_cummin_enforced():
    noisy = iter([0.5, 0.1, 0.3])  # a "quantizer" whose error rises from 3 to 4 bits

    def fake(x, b):
        return x + next(noisy)

    cost = group_costs(torch.ones(1, 2), torch.eye(2), torch.zeros(2, dtype=torch.long), (2, 3, 4), quantize_fn=fake)
    assert cost[0].tolist() == pytest.approx([0.5, 0.02, 0.02])


# --- allocation ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 3.37, 4.0, 5.5, 7.9, 8.0])
def test_allocate_meets_budget(target):
    K = 60
    cost = _convex_costs(K, seed=int(target * 100))
    w = torch.randint(100, 10_000, (K,), generator=torch.Generator().manual_seed(1)).double()
    res = allocate(cost, w, BITS, target)
    assert res.exact and abs(res.average - target) <= 0.01
    assert res.average <= target + 1e-6  # a budget is a cap
    widths = res.widths[0]
    assert widths.shape == (K,) and set(widths.tolist()) <= set(BITS)
    assert res.average == pytest.approx(float((w * widths).sum() / w.sum()), abs=1e-9)
    assert res.cost == pytest.approx(float(cost[torch.arange(K), [BITS.index(b) for b in widths.tolist()]].sum()))


@pytest.mark.parametrize("seed", range(8))
def test_allocate_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    cost = _convex_costs(5, seed=100 + seed)
    w = torch.from_numpy(rng.integers(1, 50, size=5).astype(np.float64))
    for target in (rng.uniform(2, 8), 3.0, 4.0, 4.55):
        avg, best, exact = _brute_force(cost.numpy(), w.numpy(), BITS, target, 0.01)
        res = allocate(cost, w, BITS, target)
        assert res.exact == exact, (target, res.message)
        assert res.average == pytest.approx(avg, abs=1e-7), target
        assert res.cost == pytest.approx(best, rel=1e-7, abs=1e-12), target


@pytest.mark.parametrize("target,expected", [(3.5, 3), (3.6, 4), (5.0, 4), (5.2, 6), (2.0, 2), (8.0, 8)])
def test_one_group_gives_nearest_width(target, expected):
    res = allocate(torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.5]]), torch.tensor([1000.0]), BITS, target)
    assert res.widths[0].tolist() == [expected]
    assert res.exact == (abs(expected - target) <= 0.01)
    if not res.exact:
        assert "not reachable" in res.message and "--n_groups" in res.message


def test_infeasible_band_picks_nearest_cheapest():
    # Two groups of very different size: averages 2, 2.1, 2.2, ... no, only coarse ones.
    cost = _convex_costs(2, seed=9)
    w = torch.tensor([90.0, 10.0])
    for target in (2.35, 4.93, 7.05):
        avg, best, exact = _brute_force(cost.numpy(), w.numpy(), BITS, target, 0.01)
        res = allocate(cost, w, BITS, target)
        assert not res.exact and not exact
        assert res.average == pytest.approx(avg) and res.cost == pytest.approx(best)


def test_model_scope_meets_global_average():
    gen = torch.Generator().manual_seed(3)
    sizes = [10, 4, 10, 7]
    costs = [_convex_costs(k, seed=20 + i) for i, k in enumerate(sizes)]
    weights = [torch.randint(1000, 50_000, (k,), generator=gen).double() for k in sizes]
    res = allocate(costs, weights, BITS, 4.0)
    assert res.exact and 3.99 <= res.average <= 4.0 + 1e-6
    assert [len(x) for x in res.widths] == sizes
    w_all, b_all = torch.cat(weights), torch.cat(res.widths).double()
    assert float((w_all * b_all).sum() / w_all.sum()) == pytest.approx(res.average, abs=1e-9)
    assert len(res.layer_averages) == len(sizes)
    # per-layer budgets are free to differ; the model-scope optimum is never worse than
    # meeting the target in every layer separately
    per_layer = sum(allocate(c, w, BITS, 4.0).cost for c, w in zip(costs, weights))
    assert res.cost <= per_layer + 1e-9


def test_lagrangian_fallback_close_to_milp():
    K = 400
    cost = _convex_costs(K, seed=5)
    w = torch.randint(1000, 5000, (K,), generator=torch.Generator().manual_seed(5)).double()
    exact = allocate(cost, w, BITS, 3.3, solver="milp")
    approx = allocate(cost, w, BITS, 3.3, solver="lagrangian")
    assert exact.solver == "milp" and approx.solver == "lagrangian"
    assert approx.exact and 3.29 <= approx.average <= 3.3 + 1e-9
    assert exact.cost <= approx.cost + 1e-9
    assert approx.cost <= exact.cost * 1.01
    # auto switches to the Lagrangian solver on large instances
    assert allocate(cost, w, BITS, 3.3, max_milp_vars=10).solver == "lagrangian"


@pytest.mark.parametrize(
    "bits,target,tol,match",
    [
        ((), 4.0, 0.01, "--bits is empty"),
        (BITS, 1.5, 0.01, "outside the widths"),
        (BITS, 8.5, 0.01, "outside the widths"),
        (BITS, math.nan, 0.01, "outside the widths"),
        ((2, 2, 4), 3.0, 0.01, "repeats"),
        (BITS, 4.0, -0.1, "tolerance"),
    ],
)
def test_bad_budgets_raise(bits, target, tol, match):
    with pytest.raises(MisqError, match=match):
        allocate(torch.ones(3, max(len(bits), 1)), torch.ones(3), bits, target, tol)


@pytest.mark.parametrize("method", ["hessian", "mi"])
def test_sensitive_channels_get_more_bits(method):
    """End to end on synthetic data: 100x more sensitive channels get wider widths."""
    gen = torch.Generator().manual_seed(7)
    R, C, K = 64, 160, 8
    X = torch.randn(4096, C, generator=gen)
    hot = torch.zeros(C, dtype=torch.bool)
    hot[torch.randperm(C, generator=gen)[:20]] = True
    X[:, hot] *= 10.0  # H_jj x 100
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(R, C, generator=gen)
    groups = group_channels(method, K, H=H, W=W)
    cost = group_costs(W, H, groups, BITS)
    res = allocate(cost, R * torch.bincount(groups, minlength=K).double(), BITS, 4.0)
    assert res.exact
    per_channel = res.widths[0][groups].double()
    assert float(per_channel[hot].mean()) > float(per_channel[~hot].mean()) + 1.0
    avg = float(per_channel.mean())  # equal rows: per-channel mean == per-weight mean
    assert abs(avg - 4.0) <= 0.01


def test_bit_histogram():
    layers = [torch.tensor([2, 2, 4, 8]), torch.tensor([4, 4])]
    rows = [10, 100]
    h = bit_histogram(layers, rows)
    assert h["channels"] == 6 and h["weights"] == 4 * 10 + 2 * 100
    assert list(h["widths"]) == [2, 4, 8]
    assert h["widths"][4] == {"channels": 3, "weights": 210, "channel_share": 0.5, "weight_share": 210 / 240}
    assert h["average_bits"] == pytest.approx((2 * 20 + 4 * 210 + 8 * 10) / 240)
    assert h["channel_average_bits"] == pytest.approx(24 / 6)
    assert sum(e["weight_share"] for e in h["widths"].values()) == pytest.approx(1.0)
