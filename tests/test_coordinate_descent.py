"""Coordinate descent after the sweep (misq.algorithms.coordinate_descent) on synthetic layers."""

from __future__ import annotations

import pytest
import torch

from misq.algorithms import fused
from misq.algorithms.coordinate_descent import coordinate_descent
from misq.algorithms.output_error import relative_output_error
from misq.algorithms.quantizer import find_grid, to_codes
from misq.algorithms.sparsegpt import column_params, solve
from tests.test_sparsegpt import _layer


def _error(W0, W, H):
    d = (W0 - W).double()
    return torch.sum((d @ H.double()) * d, dim=1)


def _per_row_grid(W, bits):
    return find_grid(W, torch.zeros(W.shape[1], dtype=torch.long, device=W.device), torch.tensor([bits], device=W.device))


@pytest.mark.parametrize("sparsity,bits", [(0.5, 3), (0.5, 4), (0.0, 3)])
def test_each_pass_lowers_every_row_and_stays_on_the_grid(sparsity, bits):
    W, H = _layer(rows=24, cols=80)
    grid = _per_row_grid(W, bits)
    res = solve(W, H, column_params([grid]), sparsity=sparsity, blocksize=32, refit=False)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * H.diagonal().mean())
    Wq, last = res.weight.clone(), _error(W, res.weight, Hd)
    for _ in range(3):
        change = coordinate_descent(Wq, W, Hd, res.keep, lambda i1, i2: grid_cols(grid, i1, i2), blocksize=32)
        now = _error(W, Wq, Hd)
        assert torch.all(now <= last + 1e-6 * last)
        torch.testing.assert_close(change.double(), now - last, rtol=1e-4, atol=1e-4 * float(last.max()))
        last = now
    assert torch.equal(Wq[~res.keep], torch.zeros_like(Wq[~res.keep]))  # the mask is kept
    codes = to_codes(Wq, grid)
    assert torch.equal(grid.scale * (codes.float() - grid.zero), Wq * res.keep)  # every weight on its grid
    assert float(_error(W, Wq, Hd).sum()) < 0.98 * float(_error(W, res.weight, Hd).sum())


def grid_cols(grid, i1, i2):
    scale, zero, maxq = grid.column_grid(i1, i2)
    return scale, zero, maxq.unsqueeze(0).expand(scale.shape[0], -1)


def test_unquantized_converges_to_least_squares_for_the_mask():
    """Without a grid, coordinate descent is Gauss-Seidel on each row's normal equations over its
    kept columns: it converges to w_S = w0 H[:, S] H_SS⁻¹, the best weights for that mask."""
    W, H = _layer(rows=6, cols=40)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    res = solve(W, H, None, sparsity=0.5, blocksize=8, percdamp=0.0)
    H, W, Wq = H.double(), W.double(), res.weight.double()
    one, zero = torch.ones(6, 40, dtype=torch.float64), torch.zeros(6, 40, dtype=torch.float64)
    inf = torch.full((6, 40), float("inf"), dtype=torch.float64)
    coordinate_descent(Wq, W, H, res.keep, lambda i1, i2: (one[:, i1:i2], zero[:, i1:i2], inf[:, i1:i2]),
                       passes=300, blocksize=8)
    for r in range(6):
        S = res.keep[r]
        best = torch.linalg.solve(H[S][:, S], (W[r] @ H[:, S]))
        torch.testing.assert_close(Wq[r, S], best, rtol=1e-6, atol=1e-6)


def test_converged_weights_admit_no_better_single_move():
    """After enough passes no single weight can move to another grid point and lower the error."""
    W, H = _layer(rows=3, cols=12, tokens=512)
    grid = _per_row_grid(W, 2)
    res = solve(W, H, column_params([grid]), sparsity=0.25, blocksize=4, refit=False)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * H.diagonal().mean())
    Wq = res.weight.clone()
    coordinate_descent(Wq, W, Hd, res.keep, lambda i1, i2: grid_cols(grid, i1, i2), passes=50, blocksize=4)
    base = _error(W, Wq, Hd)
    for r in range(3):
        for j in range(12):
            if not res.keep[r, j]:
                continue
            for code in range(4):
                moved = Wq.clone()
                moved[r, j] = grid.scale[r, 0] * (code - grid.zero[r, 0])
                assert float(_error(W, moved, Hd)[r]) >= float(base[r]) * (1 - 1e-6)


@pytest.mark.parametrize("case", ["50% 3-bit", "act-order", "2:4", "prune only", "scale groups", "dead columns"])
def test_solve_reports_the_refined_error(case):
    """The solver's reported error after refining is still tr(ΔW H ΔWᵀ) of the undamped H, and lower."""
    W, H = _layer(rows=40, cols=96)
    if case == "dead columns":
        H[[3, 50], :] = 0
        H[:, [3, 50]] = 0
    kw = {"sparsity": 0.5, "blocksize": 32, "row_segments": [16, 24]}
    qparams = lambda: column_params([_per_row_grid(W, 3)])  # noqa: E731  (fresh grids: the refit writes into them)
    if case == "act-order":
        kw["order"] = torch.argsort(torch.diag(H), descending=True)
    if case == "2:4":
        kw.update(sparsity=0.0, prunen=2, prunem=4)
    if case == "prune only":
        qparams = lambda: None  # noqa: E731
    if case == "scale groups":
        qparams, kw["grid_groups"] = (lambda: None), [(0, 48, 3), (48, 96, 4)]
    plain = solve(W.clone(), H.clone(), qparams(), **kw)
    refined = solve(W.clone(), H.clone(), qparams(), refine_passes=2, **kw)
    assert torch.equal(refined.keep, plain.keep)
    if case == "dead columns":  # the sweep zeroes them, and so does the descent
        assert torch.equal(refined.weight[:, [3, 50]], torch.zeros(40, 2))
    for k, sl in enumerate((slice(0, 16), slice(16, 40))):
        direct = relative_output_error(W[sl].double(), refined.weight[sl].double(), H.double())
        assert refined.rel_error[k] == pytest.approx(direct, rel=1e-5)
        assert refined.rel_error[k] < plain.rel_error[k]


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fused.HAVE_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("B,bits", [(128, 3), (96, 4), (40, 16)])
def test_fused_block_matches_the_eager_loop_on_cuda(B, bits):
    """The Triton block (one launch per block) takes the same steps as the eager loop: the same
    grid points up to a few fp32 ties, the same error change, every pass lowering it."""
    torch.manual_seed(0)
    R, C = 300, 2 * B + 17  # a partial last block
    X = torch.randn(4 * C, C, device="cuda")
    H = X.T @ X / X.shape[0]
    H.diagonal().add_(0.01 * H.diagonal().mean())
    W = torch.randn(R, C, device="cuda")
    grid = _per_row_grid(W, bits) if bits < 16 else None
    res = solve(W, H, column_params([grid]) if grid else None, sparsity=0.5, blocksize=B, refit=False)
    if grid is None:
        fn = lambda i1, i2: (torch.ones(R, i2 - i1, device="cuda"), torch.zeros(R, i2 - i1, device="cuda"),  # noqa: E731
                             torch.full((R, i2 - i1), float("inf"), device="cuda"))
    else:
        fn = lambda i1, i2: grid_cols(grid, i1, i2)  # noqa: E731
    eager, fast = res.weight.clone(), res.weight.clone()
    ce = coordinate_descent(eager, W, H, res.keep, fn, passes=2, blocksize=B, fused=False)
    cf = coordinate_descent(fast, W, H, res.keep, fn, passes=2, blocksize=B, fused=True)
    assert float(cf.sum()) < 0
    assert float(cf.sum()) == pytest.approx(float(ce.sum()), rel=1e-3)
    if grid is not None:
        assert float((eager != fast).float().mean()) < 1e-3
        codes = to_codes(fast, grid)  # the kernel's weights are on the grid exactly: the packed file stores them
        assert torch.equal(grid.scale * (codes.float() - grid.zero) * res.keep, fast)
    else:
        torch.testing.assert_close(fast, eager, rtol=1e-3, atol=1e-4)
    assert torch.equal(fast[~res.keep], torch.zeros_like(fast[~res.keep]))
    torch.testing.assert_close(_error(W, fast, H) - _error(W, res.weight, H), cf.double(), rtol=1e-3,
                               atol=1e-3 * float(_error(W, res.weight, H).max()))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fused.HAVE_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("passes", [3, 4])
def test_recorded_passes_match_relaunched_ones_on_cuda(passes):
    """From the third pass on the descent replays a CUDA graph of its second: the same launches on the
    same buffers, so the weights and the error change are the relaunched passes' bit for bit."""
    torch.manual_seed(0)
    R, C, B = 300, 3 * 128 + 17, 128
    X = torch.randn(4 * C, C, device="cuda")
    H = X.T @ X / X.shape[0]
    W = torch.randn(R, C, device="cuda")
    grid = _per_row_grid(W, 3)
    res = solve(W, H, column_params([grid]), sparsity=0.5, blocksize=B, refit=False)
    fn = lambda i1, i2: grid_cols(grid, i1, i2)  # noqa: E731
    runs = []
    for record in (False, True):
        Wr = res.weight.clone()
        change = coordinate_descent(Wr, W, H, res.keep, fn, damp=0.01, passes=passes, blocksize=B, record=record)
        runs.append((Wr, change))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert float(runs[1][1].sum()) < 0
    assert not torch.equal(runs[1][0], res.weight)  # it moved
    # recording again keeps nothing: a stream (and its cuBLAS workspace) a recording once held 64 MiB each
    held = []
    for _ in range(3):
        coordinate_descent(res.weight.clone(), W, H, res.keep, fn, damp=0.01, passes=passes, blocksize=B, record=True)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated())
    assert held[2] == held[1] == held[0]


def test_row_chunks_and_damping_restore():
    """Rows are independent: taking them a few at a time gives the same weights; H's diagonal,
    damped for the descent, comes back bit for bit."""
    W, H = _layer(rows=30, cols=64)
    grid = _per_row_grid(W, 3)
    res = solve(W, H, column_params([grid]), sparsity=0.5, blocksize=16, refit=False)
    H0 = H.clone()
    whole, chunked = res.weight.clone(), res.weight.clone()
    ca = coordinate_descent(whole, W, H, res.keep, lambda i1, i2: grid_cols(grid, i1, i2), damp=0.5, passes=2,
                            blocksize=16)
    assert torch.equal(H, H0)
    cb = coordinate_descent(chunked, W, H, res.keep, lambda i1, i2: grid_cols(grid, i1, i2), damp=0.5, passes=2,
                            blocksize=16, chunk_elems=7 * 64)  # 7 rows at a time
    assert torch.equal(H, H0)
    assert float((whole != chunked).float().mean()) < 1e-3
    torch.testing.assert_close(cb, ca, rtol=1e-4, atol=1e-3)


def test_split_tf32_keeps_fp32_accuracy_under_tf32_rounding():
    """The descent's update outside the block as one 3xTF32 GEMM: with both operands cut to TF32
    (10 mantissa bits, as the tensor cores read them) the product stays near fp32 accuracy, where
    plain TF32 is about 2^-11 off."""
    from misq.algorithms.coordinate_descent import _tf32_head, split_tf32

    torch.manual_seed(0)
    A, B = torch.randn(300, 128), torch.randn(128, 517)
    A3, B3 = split_tf32(A, B)
    assert A3.shape == (300, 384) and B3.shape == (384, 517)
    assert torch.equal(_tf32_head(A3[:, :128]), A3[:, :128])  # the heads pass through TF32 unchanged
    ref = A.double() @ B.double()
    scale = A.abs().double() @ B.abs().double()
    split = (_tf32_head(A3).double() @ _tf32_head(B3).double() - ref).abs() / scale
    plain = (_tf32_head(A).double() @ _tf32_head(B).double() - ref).abs() / scale
    assert split.max() < 2.0 ** -20 and plain.max() > 2.0 ** -13


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_outside_on_cuda_is_fp32_accurate():
    """On CUDA the update runs on TF32 tensor cores through split_tf32: within 2^-19 of |D||H|."""
    from misq.algorithms import coordinate_descent as cd

    torch.manual_seed(0)
    R, C, i1, i2 = 512, 1000, 384, 512
    D, H = torch.randn(R, i2 - i1, device="cuda"), torch.randn(C, C, device="cuda")
    P = torch.randn(R, C, device="cuda")
    ref = P.double().clone()
    ref[:, :i1] += D.double() @ H[i1:i2, :i1].double()
    ref[:, i2:] += D.double() @ H[i1:i2, i2:].double()
    cd._update_outside(P, D, H, i1, i2)
    scale = D.abs().double() @ H[i1:i2].abs().double() + 1
    err = (P.double() - ref).abs() / scale
    assert err.max().item() < 2.0 ** -19
