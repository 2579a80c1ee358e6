"""Group-wise grids and act-order in the solver, against a plain column-by-column GPTQ."""

import pytest
import torch

from misq.algorithms.column_layout import identity_layout, layout_for
from misq.algorithms.quantizer import find_grid, quantize
from misq.algorithms.sparsegpt import damped_inverse_cholesky, solve


def _problem(R=48, C=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * C, C, generator=g) * torch.linspace(0.2, 3.0, C)  # uneven channel energy
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(R, C, generator=g) * 0.05
    return W, H


def _plain_gptq(W, H, bits, groupsize, act_order):
    """GPTQ as the paper's pseudo-code: one column at a time, the whole remaining W updated."""
    W, H = W.clone().double(), H.clone()
    C = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C)
    W, H = W[:, perm], H[perm][:, perm]
    U = damped_inverse_cholesky(H.float(), 0.01)[0].double()
    Q = torch.zeros_like(W)
    for j in range(C):
        if j % groupsize == 0:
            grid = find_grid(W[:, j : j + groupsize].float(), torch.zeros(min(groupsize, C - j), dtype=torch.long), torch.tensor([bits]))
            s, z = grid.scale[:, 0].double(), grid.zero[:, 0].double()
        q = quantize(W[:, j], s, z, torch.tensor(2.0**bits - 1, dtype=torch.float64))
        Q[:, j] = q
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("groupsize,blocksize", [(32, 32), (32, 64), (64, 32), (40, 32)])
def test_groupwise_solve_is_gptq(act_order, groupsize, blocksize):
    W, H = _problem()
    C = W.shape[1]
    lay = layout_for(torch.zeros(C, dtype=torch.long), torch.tensor([3]), hessian_diag=torch.diag(H),
                     act_order=act_order, groupsize=groupsize) if act_order else identity_layout(C, 3, groupsize)
    res = solve(W, H.clone(), None, blocksize=blocksize, order=lay.perm if act_order else None,
                grid_groups=lay.scale_groups())
    ref = _plain_gptq(W, H, 3, groupsize, act_order)
    # The same algorithm in another summation order: a weight on a rounding boundary may land one
    # step apart (and carry its error on), so compare the codes loosely and the loss tightly.
    differ = (res.weight != ref).float().mean().item()
    assert differ < 0.01, f"{differ:.4%} of weights differ from plain GPTQ"
    err = lambda Q: float(torch.sum(((W - Q) @ H) * (W - Q)))  # noqa: E731
    assert err(res.weight) == pytest.approx(err(ref), rel=0.01)
    # every weight is on its own group's grid, and the grids come back one per scale group
    assert res.group_scale.shape == (W.shape[0], len(lay.scale_groups()))
    groups = lay.group_of_column()
    back = quantize(res.weight, res.group_scale[:, groups], res.group_zero[:, groups], torch.tensor(7.0))
    assert torch.equal(back, res.weight)


def test_groupwise_grid_skips_pruned_weights():
    W, H = _problem(seed=1)
    C = W.shape[1]
    lay = identity_layout(C, 4, 32)
    res = solve(W, H.clone(), None, sparsity=0.5, blocksize=32, grid_groups=lay.scale_groups())
    assert abs(res.sparsity[0] - 0.5) < 0.01
    groups = lay.group_of_column()
    back = quantize(res.weight, res.group_scale[:, groups], res.group_zero[:, groups], torch.tensor(15.0))
    assert torch.equal(back * res.keep, res.weight)
    # each group's range is set by its kept weights: the largest kept |w| sits on the grid's edge
    span = res.group_scale * 15
    kept_max = torch.stack([(res.weight[:, s:e].abs()).amax(1) for s, e, _ in lay.scale_groups()], 1)
    assert (kept_max <= span + 1e-6).all()


def test_order_alone_returns_columns_in_place():
    W, H = _problem(seed=2)
    perm = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(0))
    res = solve(W, H.clone(), None, order=perm)  # no quantization, no pruning: W comes back
    assert torch.allclose(res.weight, W, atol=1e-6)


def _plain_gptq_static(W, H, bits, groupsize, act_order):
    """GPTQ with static_groups: every group of ``groupsize`` original columns gets its grid from
    the unquantized W up front; act-order then only changes the order the columns are solved in."""
    C = W.shape[1]
    grids = [find_grid(W[:, j : j + groupsize], torch.zeros(min(groupsize, C - j), dtype=torch.long), torch.tensor([bits]))
             for j in range(0, C, groupsize)]
    scale = torch.cat([g.scale[:, :1].expand(-1, min(groupsize, C - k * groupsize)) for k, g in enumerate(grids)], 1).double()
    zero = torch.cat([g.zero[:, :1].expand(-1, min(groupsize, C - k * groupsize)) for k, g in enumerate(grids)], 1).double()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C)
    Wp, Hp, sp, zp = W.clone().double()[:, perm], H[perm][:, perm], scale[:, perm], zero[:, perm]
    U = damped_inverse_cholesky(Hp.float(), 0.01)[0].double()
    Q = torch.zeros_like(Wp)
    for j in range(C):
        q = quantize(Wp[:, j], sp[:, j], zp[:, j], torch.tensor(2.0**bits - 1, dtype=torch.float64))
        Q[:, j] = q
        err = (Wp[:, j] - q) / U[j, j]
        Wp[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.float(), scale.float(), zero.float()


def test_static_groups_keep_natural_grids_under_act_order():
    """--static-groups through the driver's path: grids of consecutive original columns fixed from
    W, the columns solved in act-order; the result is plain static-group GPTQ's, and every weight
    sits on its own natural group's grid (so the file needs no column order)."""
    from misq.compress import bitplan
    from misq.config import CompressConfig

    W, H = _problem()
    C, G = W.shape[1], 32
    cfg = CompressConfig(grouping="uniform", wbits=3, groupsize=G, act_order=True, static_groups=True, mse=False)
    plan = bitplan.plan_step({"w": W}, H, cfg)["w"]
    grid = bitplan.grid_for(W, plan, cfg)
    assert grid.groups.tolist() == [c // G for c in range(C)] and grid.order is None
    (_, lay), = bitplan.solve_batches({"w": plan}, H, cfg, ("w",))
    from misq.algorithms.sparsegpt import column_params

    res = solve(W, H.clone(), column_params([grid]), order=lay.perm)
    ref, scale, zero = _plain_gptq_static(W, H, 3, G, act_order=True)
    differ = (res.weight != ref).float().mean().item()
    assert differ < 0.01, f"{differ:.4%} of weights differ from plain static-group GPTQ"
    back = quantize(res.weight, scale, zero, torch.tensor(7.0))
    assert torch.equal(back, res.weight)


def test_static_groups_need_groupsize_and_one_width():
    from misq.config import CompressConfig
    from misq.errors import MisqError

    with pytest.raises(MisqError, match="--static-groups"):
        CompressConfig(grouping="uniform", groupsize=0, static_groups=True)
    with pytest.raises(MisqError, match="--static-groups"):
        CompressConfig(grouping="hessian", groupsize=128, static_groups=True)
