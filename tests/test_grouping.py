"""Channel grouping and the MI estimators (pure tensors, CPU, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from misq.algorithms.grouping import binned_mi, gaussian_mi, group_channels, sensitivity
from misq.errors import MisqError


def _sample(cov: np.ndarray, n: int, seed: int, mean: np.ndarray | None = None) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mu = np.zeros(len(cov)) if mean is None else mean
    return torch.from_numpy(rng.multivariate_normal(mu, cov, size=n))


def _closed_form(cov: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.diag(cov))
    rho = cov / np.outer(sd, sd)
    mi = -0.5 * np.log(1 - np.clip(rho**2, 0, 1 - 1e-12))
    np.fill_diagonal(mi, 0.0)
    return mi


def _random_cov(C: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = min(C, 64)
    A = rng.normal(size=(C, r)) * rng.uniform(0.2, 2.0, size=(C, 1))
    return A @ A.T / r + 0.1 * np.eye(C)


def _planted_blocks(C: int, n_blocks: int, seed: int, within: float = 0.9) -> tuple[torch.Tensor, np.ndarray]:
    """Exact covariance with ``n_blocks`` strongly correlated blocks, channels shuffled."""
    rng = np.random.default_rng(seed)
    block = rng.permutation(np.arange(C) % n_blocks)
    cov = np.where(block[:, None] == block[None, :], within, 0.02)
    np.fill_diagonal(cov, 1.0)
    return torch.from_numpy(cov).float(), block


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` split the channels identically, up to label names."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- Gaussian MI -----------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 0.9, 0.99])
def test_gaussian_mi_bivariate_closed_form(rho):
    n = 50_000
    X = _sample(np.array([[1.0, rho], [rho, 1.0]]), n, seed=1)
    H = 2.0 / n * X.T @ X
    mi = gaussian_mi(H)
    expected = -0.5 * math.log(1 - rho**2)
    # Sampling error of rho is about (1 - rho^2)/sqrt(n); through dI/drho = rho/(1 - rho^2)
    # that is about rho/sqrt(n) = 0.005 in I. Allow 4x.
    assert abs(float(mi[0, 1]) - expected) < 0.02
    assert float(mi[0, 0]) == 0.0 and float(mi[1, 1]) == 0.0


def test_gaussian_mi_multivariate_symmetric_and_scale_invariant():
    cov = _random_cov(8, seed=3)
    n = 100_000
    X = _sample(cov, n, seed=4)
    H = 2.0 / n * X.T @ X
    mi = gaussian_mi(H).double().numpy()
    np.testing.assert_allclose(mi, _closed_form(cov), atol=0.03)
    np.testing.assert_allclose(mi, mi.T, atol=1e-6)
    np.testing.assert_allclose(gaussian_mi(7.5 * H).double().numpy(), mi, atol=1e-5)
    assert (mi >= 0).all()


def test_gaussian_mi_centres_with_mean():
    cov = _random_cov(5, seed=5)
    offset = np.array([3.0, -2.0, 0.5, 4.0, 0.0])
    n = 100_000
    X = _sample(cov, n, seed=6, mean=offset)
    H = 2.0 / n * X.T @ X
    centred = gaussian_mi(H, mean=X.mean(0)).double().numpy()
    np.testing.assert_allclose(centred, _closed_form(cov), atol=0.03)
    # The uncentred estimate is a different (cosine-similarity) quantity: large offsets inflate it.
    assert np.abs(gaussian_mi(H).double().numpy() - _closed_form(cov)).max() > 0.1


def test_gaussian_mi_dead_and_identical_channels():
    X = torch.randn(1000, 4, dtype=torch.float64)
    X[:, 2] = 0.0  # dead
    X[:, 3] = X[:, 0]  # identical: MI clipped, finite
    mi = gaussian_mi(2 / 1000 * X.T @ X)
    assert torch.isfinite(mi).all()
    assert mi[2].abs().max() == 0 and mi[:, 2].abs().max() == 0
    assert float(mi[0, 3]) == pytest.approx(-0.5 * math.log(1e-6), rel=1e-3)


def test_gaussian_mi_half_precision_input():
    H = (torch.eye(3) + 0.5).half()
    mi = gaussian_mi(H)
    assert mi.dtype == torch.float32 and torch.isfinite(mi).all()


# --- binned MI -------------------------------------------------------------------------------


def test_binned_mi_roughly_agrees_with_gaussian_on_large_n():
    rhos = [0.0, 0.5, 0.8, 0.95]
    C = len(rhos) + 1
    cov = np.eye(C)
    for j, r in enumerate(rhos, start=1):
        cov[0, j] = cov[j, 0] = r
    # keep it positive definite: channels 1..C-1 only correlate through channel 0
    for i in range(1, C):
        for j in range(1, C):
            if i != j:
                cov[i, j] = rhos[i - 1] * rhos[j - 1]
    X = _sample(cov, 20_000, seed=7).float()
    mi = binned_mi(X, bins=16, max_tokens=20_000)
    for j, r in enumerate(rhos, start=1):
        expected = -0.5 * math.log(1 - r**2)
        # binning loses information at high correlation; 15% or 0.05 nats is "rough agreement"
        assert abs(float(mi[0, j]) - expected) < max(0.05, 0.15 * expected), (r, float(mi[0, j]))
    assert torch.allclose(mi, mi.T) and float(mi.diagonal().abs().max()) == 0.0


def test_binned_mi_subsample_deterministic_and_constant_channel():
    X = torch.randn(6000, 6)
    X[:, 5] = 1.0
    a = binned_mi(X, bins=8, max_tokens=1000, seed=3)
    b = binned_mi(X, bins=8, max_tokens=1000, seed=3)
    assert torch.equal(a, b)
    assert a[5].abs().max() == 0


def test_binned_mi_guards_wide_layers():
    with pytest.raises(MisqError, match="--mi-estimator gaussian"):
        binned_mi(torch.randn(64, 10), bins=4, max_channels=8)
    with pytest.raises(MisqError, match="tokens"):
        binned_mi(torch.randn(10, 3), bins=16)


# --- grouping --------------------------------------------------------------------------------


def _check_partition(groups: torch.Tensor, C: int, K: int) -> None:
    assert groups.dtype == torch.long and groups.shape == (C,)
    assert int(groups.min()) == 0 and int(groups.max()) == K - 1
    assert (torch.bincount(groups, minlength=K) > 0).all()


@pytest.mark.parametrize("method", ["mi", "hessian"])
@pytest.mark.parametrize("C,K", [(200, 7), (50, 50), (1700, 10)])  # 1700: randomized eigensolver
def test_grouping_is_a_deterministic_partition(method, C, K):
    cov = torch.from_numpy(_random_cov(C, seed=C)).float()
    W = torch.randn(32, C, generator=torch.Generator().manual_seed(0))
    g1 = group_channels(method, K, H=cov, W=W, seed=0)
    g2 = group_channels(method, K, H=cov.clone(), W=W.clone(), seed=0)
    _check_partition(g1, C, K)
    assert torch.equal(g1, g2)
    if method == "mi":  # the balance rule: no group below a quarter of the even share
        assert int(torch.bincount(g1, minlength=K).min()) >= max(1, C // (4 * K))


def test_hessian_groups_are_sensitivity_quantiles():
    C, K = 103, 6
    gen = torch.Generator().manual_seed(1)
    H = torch.diag(torch.rand(C, generator=gen) * 10) + 0.01
    W = torch.randn(16, C, generator=gen)
    groups = group_channels("hessian", K, H=H, W=W)
    s = sensitivity(H, W)
    sizes = torch.bincount(groups, minlength=K)
    assert int(sizes.max() - sizes.min()) <= 1
    for g in range(K - 1):
        assert float(s[groups == g].max()) <= float(s[groups == g + 1].min())
    # W=None: H_jj alone
    only_h = group_channels("hessian", K, H=H)
    hd = H.diagonal()
    assert float(hd[only_h == 0].max()) <= float(hd[only_h == 1].min())


@pytest.mark.parametrize("C,blocks", [(120, 4), (1700, 6)])  # dense eigh and randomized paths
def test_mi_grouping_recovers_planted_blocks(C, blocks):
    H, truth = _planted_blocks(C, blocks, seed=C)
    groups = group_channels("mi", blocks, H=H, seed=0)
    _check_partition(groups, C, blocks)
    assert _same_partition(groups.numpy(), truth)


def test_mi_grouping_accepts_precomputed_mi():
    H, truth = _planted_blocks(90, 3, seed=2)
    X = _sample(H.double().numpy(), 4000, seed=3).float()
    mi = binned_mi(X, bins=8)
    groups = group_channels("mi", 3, H=H, mi=mi)
    assert _same_partition(groups.numpy(), truth)


def test_mi_groups_ordered_by_sensitivity_and_separate_hot_channels():
    # Two MI blocks; within each, a few channels are 100x more sensitive. Sensitivity must
    # split them off, and ids must ascend with mean sensitivity.
    H, _ = _planted_blocks(80, 2, seed=4)
    scale = torch.ones(80)
    hot = torch.arange(80) % 10 == 0
    scale[hot] = 10.0  # H_jj x 100
    H = H * scale[:, None] * scale[None, :]
    groups = group_channels("mi", 4, H=H)
    _check_partition(groups, 80, 4)
    logs = sensitivity(H).log()
    means = [float(logs[groups == g].mean()) for g in range(4)]
    assert means == sorted(means)
    assert set(groups[hot].tolist()) & set(groups[~hot].tolist()) == set()


def test_group_counts_edge_cases():
    H = torch.eye(5)
    assert torch.equal(group_channels("mi", 1, H=H), torch.zeros(5, dtype=torch.long))
    assert torch.equal(torch.sort(group_channels("hessian", 5, H=H)).values, torch.arange(5))
    with pytest.raises(MisqError, match="larger than the layer's 5 input channels: use at most 5"):
        group_channels("mi", 6, H=H)
    with pytest.raises(MisqError, match="at least 1"):
        group_channels("hessian", 0, H=H)
    with pytest.raises(MisqError, match="unknown"):
        group_channels("random", 2, H=H)
