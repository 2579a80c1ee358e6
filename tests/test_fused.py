"""The fused Triton block sweep (misq.algorithms.fused) against the eager block_loop.

The GPU tests need CUDA and Triton and skip elsewhere; run them on the device machine with
``PYTHONPATH=src python3 -m pytest tests/test_fused.py -q``. The kernel repeats block_loop's
fp32 arithmetic operation by operation, so results are normally bit-identical; the checks still
allow a quantization code to flip where w/scale sits on a .5 boundary (and the row's later
columns to differ after it), and count such rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from misq.algorithms import fused
from misq.algorithms.hessian import HessianAccumulator
from misq.algorithms.pruning_mask import unstructured_keep
from misq.algorithms.quantizer import find_grid
from misq.algorithms.sparsegpt import (
    block_loop,
    column_params,
    damped_inverse_cholesky,
    solve,
)

HAVE_GPU = torch.cuda.is_available() and fused.HAVE_TRITON
_SKIP = "needs a CUDA GPU and Triton (the fused kernel runs only there); run on the device machine"


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason=_SKIP)(test))

BIT_CHOICES = (2, 3, 4, 8, 16)
DEV = "cuda"


def test_get_block_fn_is_none_off_cuda():
    assert fused.get_block_fn("cpu") is None
    assert fused.get_block_fn("cuda", enabled=False) is None


def _hessian(C: int, g: torch.Generator, n: int | None = None) -> torch.Tensor:
    """A realistic H = XᵀX/n: correlated channels of uneven scale, on CUDA."""
    n = n or 4 * C
    mix = torch.randn(C, C, device=DEV, generator=g) / C**0.5 + torch.eye(C, device=DEV)
    X = torch.randn(n, C, device=DEV, generator=g) @ mix
    X *= torch.rand(C, device=DEV, generator=g) * 2 + 0.05
    return X.T @ X / n


def _grids(W: torch.Tensor, segments: list[int], g: torch.Generator, sixteen: bool = True):
    """Per-segment grids with a width per column group (mixed per column and per row segment)."""
    _, C = W.shape
    choices = BIT_CHOICES if sixteen else BIT_CHOICES[:-1]
    grids, start = [], 0
    for rows in segments:
        K = 5
        groups = torch.randint(0, K, (C,), device=DEV, generator=g)
        idx = torch.randint(0, len(choices), (K,), device=DEV, generator=g)
        bits = torch.tensor(choices, device=DEV)[idx]
        bits[0], bits[1] = choices[-1], 4  # at least one 4-bit and (with sixteen) one 16-bit column
        groups[0], groups[-1] = 1, 0
        grids.append(find_grid(W[start : start + rows], groups, bits))
        start += rows
    return grids


def _block_problem(R: int, B: int, seed: int, *, sixteen: bool = True, nm: bool = False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    pad = 32
    H = _hessian(B + 2 * pad, g)
    U, _ = damped_inverse_cholesky(H, 0.01)
    Hinv1 = U[pad : pad + B, pad : pad + B]  # a strided view, as solve passes it
    W1 = torch.randn(R, B, device=DEV, generator=g) * 0.02
    W1[:, 0] *= 10  # an outlier column
    segments = [R // 2, R - R // 2] if R > 1 else [R]
    scale, zero, maxq = column_params(_grids(W1, segments, g, sixteen)).columns(slice(None), DEV)
    if nm:
        keep1 = torch.ones_like(W1, dtype=torch.bool)
    else:
        keep1 = unstructured_keep(W1, torch.diag(Hinv1), 0.5, segments)
    return W1, Hinv1, keep1, scale, zero, maxq


def _compare(ref, out, W1, Hinv1, keep1, scale, maxq):
    """Rows whose quantization codes flip, after checking that every flip starts at a .5 tie and
    that all other rows agree to fp32 rounding. Returns the number of flipped rows."""
    (Qr, Er, Wr, Kr), (Qf, Ef, Wf, Kf) = ref, out
    assert torch.isfinite(Qf).all() and torch.isfinite(Ef).all()
    q_tol = 1e-5 * float(Qr.abs().max()) + 1e-12
    e_tol = 1e-5 * float(Er.abs().max()) + 1e-12
    w_tol = 1e-5 * float(Wr.abs().max()) + 1e-12
    q_bad = (Qr - Qf).abs() > q_tol
    bad_rows = q_bad.any(dim=1) | (Kr != Kf).any(dim=1)
    ok = ~bad_rows
    assert torch.equal(Kr[ok], Kf[ok])
    assert ((Er - Ef).abs()[ok] <= e_tol).all(), "errors differ beyond rounding in rows without a code flip"
    assert ((Wr - Wf).abs()[ok] <= w_tol).all(), "final block state differs beyond rounding"
    for r in torch.nonzero(bad_rows).flatten().tolist():
        cols = torch.nonzero(q_bad[r]).flatten()
        assert cols.numel(), f"row {r}: keep mask differs with no code flip"
        j = int(cols[0])
        assert not torch.isinf(maxq[r, j]), f"row {r}: an unquantized column differs ({Qr[r, j]} vs {Qf[r, j]})"
        w = Qr[r, j] + Er[r, j] * Hinv1[j, j]  # the weight the sweep quantized at column j
        x = float(w * Kr[r, j] / scale[r, j])
        assert abs(x - math.floor(x) - 0.5) < 1e-3, f"row {r}, column {j}: code flipped away from a .5 tie (w/scale = {x})"
    return int(bad_rows.sum())


def _run_both(W1, Hinv1, keep1, scale, zero, maxq, n=0, m=0):
    Wr, Kr = W1.clone(), keep1.clone()
    Qr, Er = block_loop(Wr, Hinv1, Kr, scale, zero, maxq, n, m)
    Wf, Kf = W1.clone(), keep1.clone()
    Qf, Ef = fused.fused_block_loop(Wf, Hinv1, Kf, scale, zero, maxq, n, m)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return (Qr, Er, Wr, Kr), (Qf, Ef, Wf, Kf)


SHAPES = [(1000, 128), (777, 128), (300, 64), (129, 100), (64, 17), (5, 3), (1, 128), (2049, 256)]


@gpu
@pytest.mark.parametrize("R,B", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_matches_block_loop(R, B, seed):
    W1, Hinv1, keep1, scale, zero, maxq = _block_problem(R, B, seed)
    assert B < 2 or (torch.isinf(maxq).any() and (~torch.isinf(maxq)).any())
    ref, out = _run_both(W1, Hinv1, keep1, scale, zero, maxq)
    flipped = _compare(ref, out, W1, Hinv1, keep1, scale, maxq)
    assert flipped <= max(1, R // 100), f"{flipped} of {R} rows had a code flip"


@gpu
@pytest.mark.parametrize("R,B,n,m", [(500, 128, 2, 4), (333, 64, 4, 8), (130, 30, 2, 4), (1025, 128, 1, 2), (96, 256, 2, 4)])
def test_fused_nm_matches_block_loop(R, B, n, m):
    W1, Hinv1, keep1, scale, zero, maxq = _block_problem(R, B, seed=R + B, nm=True)
    ref, out = _run_both(W1, Hinv1, keep1, scale, zero, maxq, n, m)
    flipped = _compare(ref, out, W1, Hinv1, keep1, scale, maxq)
    assert flipped <= max(1, R // 100), f"{flipped} of {R} rows had a code flip"
    kept = out[3].view(R, -1)
    if B % m == 0:
        per_group = kept.reshape(R, B // m, m).sum(dim=2)
        assert (per_group == m - n).all()


@gpu
def test_fused_unquantized_pruning_only():
    W1, Hinv1, keep1, _, _, _ = _block_problem(640, 128, seed=7)
    ones = torch.ones_like(W1)
    scale, zero, maxq = ones, torch.zeros_like(W1), torch.full_like(W1, float("inf"))
    (Qr, Er, _, _), (Qf, Ef, _, _) = _run_both(W1, Hinv1, keep1, scale, zero, maxq)
    torch.testing.assert_close(Qf, Qr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(Ef, Er, rtol=1e-5, atol=1e-6)
    assert torch.equal(Qf == 0, ~keep1)


@gpu
@pytest.mark.parametrize("blocksize,nm", [(128, None), (100, None), (128, (2, 4))])
def test_solve_with_and_without_fused(blocksize, nm):
    g = torch.Generator(device=DEV).manual_seed(11)
    C, segments = 384, [200, 120, 200]
    H = _hessian(C, g, n=3000)
    W = torch.randn(sum(segments), C, device=DEV, generator=g) * 0.02
    qparams = column_params(_grids(W, segments, g))
    kw = {"sparsity": 0.5, "blocksize": blocksize, "row_segments": segments}
    if nm:
        kw.update(prunen=nm[0], prunem=nm[1])
    ref = solve(W.clone(), H.clone(), qparams, **kw)
    out = solve(W.clone(), H.clone(), qparams, block_fn=fused.fused_block_loop, **kw)
    tol = 1e-5 * float(ref.weight.abs().max())
    differ = ((ref.weight - out.weight).abs() > tol).float().mean().item()
    assert differ <= 1e-3, f"{differ:.2%} of weights differ"
    assert (ref.keep != out.keep).float().mean().item() <= 1e-3
    assert out.damp == ref.damp
    for a, b in zip(out.rel_error, ref.rel_error):
        assert a == pytest.approx(b, rel=1e-3)
    for a, b in zip(out.sparsity, ref.sparsity):
        assert a == pytest.approx(b, abs=1e-3)


@gpu
def test_hessian_accumulator_fp16_on_cuda():
    g = torch.Generator(device=DEV).manual_seed(3)
    C = 320
    acc = HessianAccumulator(C, DEV)
    xs = [torch.randn(b, 64, C, device=DEV, generator=g).half() for b in (3, 5, 1)]
    for x in xs:
        acc.add(x)
    H = acc.free()
    X = torch.cat([x.reshape(-1, C) for x in xs]).double()
    ref = 2.0 / 9 * X.T @ X
    err = ((H.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-6, err


@gpu
def test_reported_error_on_cuda_matches_fp64_and_restores_flags():
    """On CUDA the reported error's normaliser is one TF32 product (output_error.solver_rel_errors,
    ``fast``); the numerators are the sweep's own, moved by the scale refit's exact change where
    a row's grid was refit. Against the direct fp64 formula it is within 1e-3 relative, and the
    TF32 setting is the caller's again afterwards."""
    from misq.algorithms import output_error

    g = torch.Generator(device=DEV).manual_seed(5)
    C, segments = 768, [200, 400]
    H = _hessian(C, g)
    W = torch.randn(sum(segments), C, device=DEV, generator=g) * 0.02
    # one segment of mixed channel groups, one with a grid per row (refit after the sweep, TF32 v·H)
    row_grid = find_grid(W[200:], torch.zeros(C, dtype=torch.long, device=DEV), torch.tensor([3], device=DEV))
    qparams = column_params([_grids(W[:200], [200], g, sixteen=False)[0], row_grid])
    before = str(getattr(torch.backends.cuda.matmul, "fp32_precision", torch.backends.cuda.matmul.allow_tf32))
    res = solve(W.clone(), H.clone(), qparams, sparsity=0.5, row_segments=segments)
    after = str(getattr(torch.backends.cuda.matmul, "fp32_precision", torch.backends.cuda.matmul.allow_tf32))
    assert before == after
    for sl, value in zip((slice(0, 200), slice(200, 600)), res.rel_error):
        ref = output_error.relative_output_error(W[sl].double(), res.weight[sl].double(), H.double())
        assert value == pytest.approx(ref, rel=1e-3)


@gpu
def test_inverse_cholesky_methods_agree():
    g = torch.Generator(device=DEV).manual_seed(9)
    C = 1300  # above the 1024-column leaf of the blocked triangular inverse
    H = _hessian(C, g)
    out = {}
    for method in ("inverse", "reverse"):
        out[method], damp = damped_inverse_cholesky(H.clone(), 0.01, method=method)
        assert damp == 0.01
        assert torch.equal(out[method], torch.triu(out[method]))
    ref = torch.linalg.cholesky(torch.linalg.inv((H + 0.01 * H.diagonal().mean() * torch.eye(C, device=DEV)).double()), upper=True)
    for method, U in out.items():
        assert ((U.double() - ref).norm() / ref.norm()).item() < 1e-4, method
