"""The SparseGPT solver and the per-group quantizer on synthetic layers."""

from __future__ import annotations

import logging

import pytest
import torch

from misq.algorithms.hessian import HessianAccumulator
from misq.algorithms.output_error import relative_output_error
from misq.algorithms.quantizer import (
    find_grid,
    quantize_with_grid,
    to_codes,
    uniform_grid,
)
from misq.algorithms.sparsegpt import (
    SolverOptions,
    column_params,
    solve,
)
from misq.errors import NumericalError


def _layer(rows=48, cols=96, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)
    X[:, :4] *= 8.0  # a few outlier channels, as in real LLMs
    W = torch.randn(rows, cols, generator=g)
    acc = HessianAccumulator(cols, "cpu")
    for chunk in X.reshape(8, -1, cols):
        acc.add(chunk.unsqueeze(0))
    return W, acc.free()


def test_hessian_is_two_over_n_sum_xxT():
    X = torch.randn(4, 10, 6, dtype=torch.float64)
    acc = HessianAccumulator(6, "cpu", dtype=torch.float64)
    acc.add(X[:3])
    acc.add(X[3:])
    flat = X.reshape(-1, 6)
    torch.testing.assert_close(acc.free(), 2 / 4 * flat.T @ flat)


def test_obs_beats_rtn_plus_magnitude():
    W, H = _layer()
    grid = uniform_grid(W, 3)
    res = solve(W, H.clone(), column_params([grid]), sparsity=0.5, blocksize=32)
    Wm = W.clone()
    Wm[Wm.abs() <= Wm.abs().flatten().kthvalue(W.numel() // 2).values] = 0
    rtn = quantize_with_grid(Wm, grid) * (Wm != 0)
    assert res.rel_error[0] < 0.7 * relative_output_error(W, rtn, H)


def test_unstructured_mask_exact_and_pruned_stay_zero():
    W, H = _layer()
    res = solve(W, H.clone(), column_params([uniform_grid(W, 4)]), sparsity=0.5, blocksize=32)
    assert torch.all(res.weight[~res.keep] == 0)
    # the reference prunes the floor(n*s)+1 lowest of each block: exactly that many per block
    for start in range(0, W.shape[1], 32):
        pruned = (~res.keep[:, start : start + 32]).sum().item()
        assert pruned == int(W.shape[0] * 32 * 0.5) + 1
    assert abs(res.sparsity[0] - 0.5) < 0.01


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_exact(n, m):
    W, H = _layer()
    res = solve(W, H.clone(), column_params([uniform_grid(W, 4)]), prunen=n, prunem=m, blocksize=32)
    kept = res.keep.reshape(W.shape[0], -1, m).sum(dim=2)
    assert torch.all(kept == m - n)
    assert torch.all(res.weight[~res.keep] == 0)


def test_bits_respected_per_channel_group():
    W, H = _layer(cols=90)
    groups = torch.arange(90) % 3
    bits = torch.tensor([2, 3, 16])
    grid = find_grid(W, groups, bits)
    res = solve(W, H.clone(), column_params([grid]), sparsity=0.0, blocksize=32)
    codes = to_codes(res.weight, grid)
    for g, b in enumerate(bits.tolist()):
        cols = groups == g
        if b == 16:
            continue  # kept in full precision
        assert codes[:, cols].max() <= 2**b - 1
        for r in range(W.shape[0]):  # at most 2**b levels per (row, group), all on the grid
            assert torch.unique(res.weight[r, cols]).numel() <= 2**b
        torch.testing.assert_close(quantize_with_grid(res.weight, grid)[:, cols], res.weight[:, cols], rtol=0, atol=1e-6)


def test_mse_grid_counts_only_the_kept_weights():
    """With ``keep``, the weights that will be pruned do not steer the MSE range search: changing
    them (inside the min-max range, which still spans all of W) leaves the grid as it is."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g)
    keep = torch.rand(16, 64, generator=g) > 0.5
    keep[:, :2] = True  # the range's ends stay kept, so the min-max start is the same
    W[:, 0], W[:, 1] = 4.0, -4.0
    groups, bits = torch.zeros(64, dtype=torch.long), torch.tensor([3])
    W = torch.where(keep, W, 0.5 * torch.randn(16, 64, generator=g))  # what pruning removes is smaller
    other = torch.where(keep, W, torch.randn(16, 64, generator=g).clamp(-3, 3))
    a = find_grid(W, groups, bits, mse=True, keep=keep)
    b = find_grid(other, groups, bits, mse=True, keep=keep)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    full = find_grid(W, groups, bits, mse=True, keep=torch.ones_like(keep))
    plain = find_grid(W, groups, bits, mse=True)
    assert torch.equal(full.scale, plain.scale) and torch.equal(full.zero, plain.zero)
    # Counted, the small weights pull the range in (finer steps, survivors clipped).
    assert (find_grid(W, groups, bits, mse=True).scale <= a.scale).all()
    assert not torch.equal(find_grid(W, groups, bits, mse=True).scale, a.scale)
    # Rows are searched a chunk at a time (bounded memory): any chunking gives the same grid.
    small = find_grid(W, groups, bits, mse=True, keep=keep, chunk_elements=3 * 64)
    assert torch.equal(small.scale, a.scale) and torch.equal(small.zero, a.zero)


def test_stacked_solve_equals_separate_solves():
    Wa, H = _layer(rows=32, seed=1)
    Wb = torch.randn(16, Wa.shape[1])
    def grids():  # fresh each time: a solve refits one-group grids' scales in place
        return uniform_grid(Wa, 4), find_grid(Wb, torch.arange(Wa.shape[1]) % 2, torch.tensor([3, 4]))

    ga, gb = grids()
    stacked = solve(torch.cat([Wa, Wb]), H.clone(), column_params([ga, gb]), sparsity=0.5, row_segments=[32, 16], blocksize=32)
    ga, gb = grids()
    a = solve(Wa, H.clone(), column_params([ga]), sparsity=0.5, blocksize=32)
    b = solve(Wb, H.clone(), column_params([gb]), sparsity=0.5, blocksize=32)
    torch.testing.assert_close(stacked.weight, torch.cat([a.weight, b.weight]), rtol=0, atol=1e-5)
    assert torch.equal(stacked.keep, torch.cat([a.keep, b.keep]))
    assert stacked.rel_error == pytest.approx([a.rel_error[0], b.rel_error[0]], rel=1e-4)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_refit_lowers_error_and_updates_the_grid(sparsity):
    """One-group grids get least-squares scales for the sweep's codes: lower error, same codes
    and zeros, and the caller's grid (updated in place) reproduces the returned weights."""
    W, H = _layer(seed=3)
    g0 = uniform_grid(W, 3)
    plain = solve(W, H.clone(), column_params([g0]), sparsity=sparsity, blocksize=32, refit=False)
    assert torch.equal(g0.scale, uniform_grid(W, 3).scale)  # refit=False leaves the grid alone
    g1 = uniform_grid(W, 3)
    fit = solve(W, H.clone(), column_params([g1]), sparsity=sparsity, blocksize=32)
    assert fit.rel_error[0] < plain.rel_error[0]
    assert not torch.equal(g1.scale, g0.scale) and torch.equal(g1.zero, g0.zero)
    assert torch.equal(g1.scale, g1.scale.half().float())  # storable in fp16
    torch.testing.assert_close(quantize_with_grid(fit.weight, g1) * fit.keep, fit.weight, rtol=0, atol=1e-6)
    assert torch.equal(to_codes(fit.weight, g1), to_codes(plain.weight, g0))  # same codes, new scales
    # Grids of several groups are left as they are.
    gm = find_grid(W, torch.arange(W.shape[1]) % 2, torch.tensor([3, 4]))
    before = gm.scale.clone()
    solve(W, H.clone(), column_params([gm]), sparsity=sparsity, blocksize=32)
    assert torch.equal(gm.scale, before)


def test_dead_channels_zeroed_and_damping_retried(caplog):
    W, H = _layer()
    H[:, 5] = 0
    H[5, :] = 0  # a channel that never fires
    res = solve(W, H.clone(), None, sparsity=0.0)
    assert torch.all(res.weight[:, 5] == 0)
    bad = -torch.eye(W.shape[1])  # negative definite: needs damping retries, then fails
    with caplog.at_level(logging.WARNING), pytest.raises(NumericalError, match="positive definite"):
        solve(W, bad, None)
    assert "retrying" in caplog.text


def test_nan_weight_is_reported():
    W, H = _layer()
    W[3, 7] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        solve(W, H, None)


def test_solver_options_change_how_not_what():
    """Both inverse-Cholesky methods and both error paths give the same solve (up to fp32 rounding)."""
    W, H = _layer()
    kw = {"sparsity": 0.5, "blocksize": 32}
    ref = solve(W, H.clone(), column_params([uniform_grid(W, 4)]), **kw)
    alt = solve(W, H.clone(), column_params([uniform_grid(W, 4)]), options=SolverOptions("inverse", fast_rel_error=False), **kw)
    torch.testing.assert_close(alt.weight, ref.weight, rtol=0, atol=1e-4)
    assert alt.rel_error == pytest.approx(ref.rel_error, rel=1e-3)
    with pytest.raises(ValueError, match="method"):
        solve(W, H.clone(), None, options=SolverOptions("cholesky"))  # type: ignore[arg-type]


def test_import_probes_nothing():
    """The out_dtype probes run at first use, not at import (importing must not touch CUDA)."""
    import subprocess
    import sys

    code = ("import misq.algorithms.sparsegpt, misq.algorithms.hessian as s; "
            "assert s.mm_out_dtype_supported.cache_info().currsize == 0; "
            "assert s.addmm_out_dtype_supported.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("case", ["50%", "dead columns", "act-order", "2:4", "prune only", "scale groups"])
def test_reported_error_is_the_output_error(case):
    """The solver reads the numerators off its own scaled errors (‖E‖² − λ‖ΔW‖², no [R, C] x [C, C]
    product): they must be tr(ΔW H ΔWᵀ) of the undamped H, as a direct fp64 product gives."""
    W, H = _layer(rows=40, cols=96)
    if case == "dead columns":
        H[[3, 50], :] = 0
        H[:, [3, 50]] = 0
    C = W.shape[1]
    kw = {"sparsity": 0.5, "blocksize": 32, "row_segments": [16, 24], "percdamp": 0.05}
    qparams = column_params([find_grid(W, torch.zeros(C, dtype=torch.long), torch.tensor([3]))])
    if case == "act-order":
        kw["order"] = torch.argsort(torch.diag(H), descending=True)
    if case == "2:4":
        kw.update(sparsity=0.0, prunen=2, prunem=4)
    if case == "prune only":
        qparams = None
    if case == "scale groups":
        qparams, kw["grid_groups"] = None, [(0, 48, 3), (48, 96, 4)]
    res = solve(W.clone(), H.clone(), qparams, **kw)
    for sl, got in zip((slice(0, 16), slice(16, 40)), res.rel_error):
        assert got == pytest.approx(relative_output_error(W[sl].double(), res.weight[sl].double(), H.double()), rel=1e-5)
