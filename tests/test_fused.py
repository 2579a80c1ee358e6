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


def gemm_tolerance(k: int) -> float:
    """Relative error (Frobenius) allowed for an fp32-accumulated tensor-core product over k
    terms: tensor cores add with truncation, so the diagonal's sums of squares drift by up to
    about one fp32 unit per MMA step; measured on an H200, cuBLAS and the Triton kernel alike,
    about k·2^-28 (5e-6 at k = 2048), a quarter of this bound."""
    return max(1e-6, k * 2.0**-26)


@gpu
@pytest.mark.parametrize("batch_rows", [0, 256, 64 * 4, 1000])
def test_hessian_accumulator_fp16_on_cuda(batch_rows):
    """One product per add, or inputs gathered into batches of rows (an add that does not fit
    flushes first; one as large as the buffer goes straight through): the same H and count."""
    g = torch.Generator(device=DEV).manual_seed(3)
    C = 320
    acc = HessianAccumulator(C, DEV, batch_rows=batch_rows)
    xs = [torch.randn(b, 64, C, device=DEV, generator=g).half() for b in (3, 5, 1, 2, 4)]
    for x in xs:
        acc.add(x)
    H = acc.free()
    X = torch.cat([x.reshape(-1, C) for x in xs]).double()
    ref = 2.0 / 15 * X.T @ X
    err = ((H.double() - ref).norm() / ref.norm()).item()
    assert err < gemm_tolerance(max(batch_rows, 64 * 5)), err
    assert acc.nsamples == 15


@gpu
@pytest.mark.parametrize("N,C", [(2048, 256), (100, 389), (1, 130), (4096, 1000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lower_triangle_kernel_and_mirror(N, C, dtype):
    """syrk_lower_ updates the tiles on and below the diagonal (β·H + α·xᵀx, products exact in
    fp32) and leaves the tiles above it; mirror_lower_ then makes H symmetric; β = 0 never
    reads the old H."""
    from misq.algorithms.fused_hessian import SYRK_CONFIG, mirror_lower_, syrk_lower_, syrk_runs

    g = torch.Generator(device=DEV).manual_seed(N + C)
    x = torch.randn(N, C, device=DEV, generator=g).to(dtype)
    H0 = torch.randn(C, C, device=DEV, generator=g)
    assert syrk_runs(x, H0)
    ref = 0.25 * H0.double() + 0.5 * (x.double().T @ x.double())
    low = torch.tril(torch.ones(C, C, dtype=torch.bool, device=DEV))
    tile = torch.arange(C, device=DEV) // SYRK_CONFIG[0]
    above = tile[:, None] < tile[None, :]  # in a tile above the diagonal
    H = H0.clone()
    syrk_lower_(H, x, 0.5, 0.25)
    assert torch.equal(H[above], H0[above])
    err = ((H.double() - ref)[low].norm() / ref[low].norm()).item()
    assert err < gemm_tolerance(N), err
    mirror_lower_(H)
    assert torch.equal(H, H.T)
    H = torch.full((C, C), float("nan"), device=DEV)
    syrk_lower_(H, x, 1.0, 0.0)
    mirror_lower_(H)
    ref = x.double().T @ x.double()
    assert ((H.double() - ref).norm() / ref.norm()).item() < gemm_tolerance(N)


@gpu
def test_hessian_lower_triangle_equals_the_full_gemm():
    g = torch.Generator(device=DEV).manual_seed(5)
    xs = [torch.randn(2, 512, 300, device=DEV, generator=g).half() for _ in range(5)]
    X = torch.cat([x.reshape(-1, 300) for x in xs]).double()
    ref = 2.0 / 10 * X.T @ X
    for lower in (True, False):
        acc = HessianAccumulator(300, DEV, lower_only=lower, batch_rows=2048)
        for x in xs:
            acc.add(x)
        H = acc.free()
        assert torch.equal(H, H.T) or not lower
        assert ((H.double() - ref).norm() / ref.norm()).item() < gemm_tolerance(2048)


def test_hessian_batches_change_nothing_off_the_tensor_cores():
    """On the CPU (or fp32 inputs) the batch buffer is not used: bit for bit the unbatched H."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(b, 16, 24, generator=g) for b in (2, 1, 3)]
    H = []
    for rows in (0, 64):
        acc = HessianAccumulator(24, "cpu", batch_rows=rows)
        for x in xs:
            acc.add(x)
        H.append(acc.free())
    assert torch.equal(H[0], H[1])


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


@gpu
@pytest.mark.parametrize("segments", [[64, 64, 64], [96, 96], [40]])
def test_mask_threshold_on_cuda_equals_the_sorted_rule(segments):
    """On CUDA several equal segments take their thresholds from a top-k select: the same mask
    as the reference's sort (ties included)."""
    g = torch.Generator().manual_seed(1)
    W1 = torch.round(torch.randn(sum(segments), 128, generator=g) * 4) / 4  # many ties
    hdiag = torch.rand(128, generator=g) + 0.1
    for frac in (0.5, 0.3, 0.9):
        assert torch.equal(unstructured_keep(W1.cuda(), hdiag.cuda(), frac, segments).cpu(),
                           unstructured_keep(W1, hdiag, frac, segments))
