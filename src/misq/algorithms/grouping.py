"""Channel grouping for mixed-precision quantization.

A linear layer ``y = W x`` with ``W [R, C]`` has ``C`` input channels (columns of ``W``).
:func:`group_channels` partitions them into ``K`` groups; every group later gets one
bit-width and one quantization grid per output row (see :mod:`misq.algorithms.allocation`).

Mutual-information estimators
-----------------------------
``gaussian`` (:func:`gaussian_mi`, the default): under a Gaussian model the MI of two channels
is ``I = -1/2 log(1 - rho^2)`` with ``rho`` their correlation. SparseGPT already accumulates
the second-moment matrix ``H = 2/n sum x x^T``, so the correlation matrix -- and with it all
``C^2`` MI values -- costs one elementwise pass over ``H``: almost free.

``binned`` (:func:`binned_mi`): quantile-bin every channel and take the plug-in MI of the joint
histograms (with the Miller-Madow bias correction). It makes no Gaussian assumption but costs
``C^2 * bins^2 * tokens`` multiply-adds and needs the activations themselves, so it is only for
small layers or a channel subsample (guarded by ``max_channels``).

Why the "mi" grouping is not plain MI clustering
------------------------------------------------
Channels in a group share one bit-width and one grid, so a useful group holds channels that
are (a) redundant with each other -- high MI, so the OBS update can compensate one channel's
rounding error through the others -- and (b) of similar sensitivity, otherwise the allocator
cannot give the sensitive ones more bits. Raw MI clustering (e.g. average linkage) also tends
to return one giant cluster plus singletons, which leaves the whole layer at one width.
So "mi" grouping:

1. embeds the MI affinity spectrally (Ng-Jordan-Weiss: top-``K`` eigenvectors of the normalized
   affinity ``D^-1/2 I D^-1/2``, rows scaled to unit length; for large ``C`` by randomized
   block subspace iteration: five ``[C, C] @ [C, K+10]`` products instead of a hierarchical
   linkage, which needs the ``C^2/2`` condensed distances -- 760 MB of float64 at C = 13824 --
   and ``O(C^2)`` work with a large constant, and still returns one giant cluster),
2. appends one log-sensitivity coordinate ``sqrt(2) * log(s) / log(4)``: two channels whose
   sensitivity differs by 4x -- worth about one bit, since the quantization error falls 4x per
   bit -- are as far apart as two unrelated MI clusters (``sqrt(2)`` in the embedding),
3. runs k-means (scikit-learn, fixed ``n_init`` and ``random_state``) on these features, and
4. balances: no group is smaller than ``max(1, C // (4K))`` -- a quarter of the even share --
   by moving the channels that are cheapest to move (smallest increase of squared distance to
   the centroid). A tiny group would buy a separate width for a negligible share of weights.

Groups are relabelled by ascending mean log-sensitivity, so id 0 is the least sensitive group.
Everything is deterministic for fixed inputs and ``seed``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import Tensor

from misq.errors import MisqError, NumericalError

log = logging.getLogger(__name__)

METHODS = ("mi", "hessian")
RHO2_CLIP = 1.0 - 1e-6  # caps the MI of (near-)identical channels at -1/2 log(1e-6) = 6.9 nats
DEAD_REL = 1e-12  # a channel whose variance is below this fraction of the largest is "dead"
EXACT_EIG_MAX_C = 1536  # below this a dense eigensolver is fast and exact
_BLOCK_ELEMS = 2**19  # elements per row block of gaussian_mi (2 MB of float32)
SENS_BIT_RATIO = 4.0  # a sensitivity ratio worth about one bit (error falls 4x per bit)


def gaussian_mi(H: Tensor, mean: Tensor | None = None, *, h_scale: float = 2.0) -> Tensor:
    """Pairwise Gaussian mutual information between input channels, in nats.

    Args:
        H: ``[C, C]`` second-moment matrix of the layer inputs, ``H = 2/n sum x x^T`` as
            SparseGPT accumulates it.
        mean: optional ``[C]`` mean activation. Without it the correlation is the uncentred one
            (the cosine similarity of channel activations), which is scale-invariant: any
            positive multiple of ``H`` gives the same MI. With it the covariance
            ``E[x x^T] - mean mean^T`` is used, where ``E[x x^T] = H / h_scale``.
        h_scale: how ``H`` relates to ``E[x x^T]`` (2 for SparseGPT's ``2/n`` convention); only
            used together with ``mean``.

    Returns:
        ``[C, C]`` float tensor ``I_ij = -1/2 log(1 - rho_ij^2)`` with ``rho^2`` clipped at
        ``1 - 1e-6``. The diagonal is 0 (a channel's information with itself is infinite for a
        continuous variable; 0 keeps the matrix usable as an affinity without self-loops), and
        dead channels (zero variance) have MI 0 with everyone.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square [C, C], got {tuple(H.shape)}")
    C = H.shape[0]
    dtype = H.dtype if H.dtype in (torch.float32, torch.float64) else torch.float32
    energy = torch.diagonal(H).to(dtype).clamp(min=0)
    var = energy
    if mean is not None:
        mu = mean.to(device=H.device, dtype=dtype)
        energy = energy / h_scale
        var = (energy - mu * mu).clamp(min=0)
    if not torch.isfinite(var).all():
        raise NumericalError("the input second-moment matrix H has NaN/Inf: check the calibration activations")
    # Dead: no energy compared with the layer, or (centred) a variance lost in the rounding
    # noise of E[x^2] - mean^2, i.e. a constant channel.
    dead = (var <= DEAD_REL * energy.max().clamp(min=torch.finfo(dtype).tiny)) | (
        var <= 100 * torch.finfo(dtype).eps * energy
    )
    inv_std = torch.where(dead, torch.zeros_like(var), var.rsqrt())
    out = torch.empty(C, C, dtype=dtype, device=H.device)
    # Row blocks of ~2 MB, every op in place on the output: the elementwise chain stays in
    # cache, and no other [C, C] temporary is allocated (760 MB each at C = 13824).
    block = max(1, _BLOCK_ELEMS // max(C, 1))
    for i0 in range(0, C, block):
        o = out[i0 : i0 + block]
        if mean is None:
            torch.mul(H[i0 : i0 + block], inv_std[i0 : i0 + block, None], out=o)
        else:
            torch.mul(H[i0 : i0 + block], 1.0 / h_scale, out=o)
            o.sub_(mu[i0 : i0 + block, None] * mu[None, :]).mul_(inv_std[i0 : i0 + block, None])
        o.mul_(inv_std[None, :]).pow_(2).clamp_(max=RHO2_CLIP).neg_().log1p_().mul_(-0.5)
    # Dead channels have inv_std 0, hence rho 0 and MI 0 already.
    out.fill_diagonal_(0.0)
    return out


def binned_mi(
    X: Tensor, bins: int = 16, max_tokens: int = 4096, seed: int = 0, *, max_channels: int = 4096
) -> Tensor:
    """Pairwise mutual information from quantile-binned joint histograms, in nats.

    Every channel is cut into ``bins`` equal-frequency bins on a token subsample; the MI of a
    pair is ``H(X) + H(Y) - H(X, Y)`` of the plug-in histograms plus the Miller-Madow bias
    correction, clipped at 0. Joint histograms are one-hot matmuls, computed block by block so
    memory stays bounded, but the work is ``C^2 * bins^2 * tokens``: only for small layers
    (CPU) or on a GPU.

    Args:
        X: ``[n_tokens, C]`` activations.
        bins: bins per channel.
        max_tokens: tokens used at most (a seeded random subsample beyond that).
        seed: seed of the token subsample.
        max_channels: refuse layers wider than this.

    Returns:
        ``[C, C]`` float32 MI matrix, zero diagonal, symmetric.
    """
    if X.dim() != 2:
        raise ValueError(f"X must be [n_tokens, C], got {tuple(X.shape)}")
    n, C = X.shape
    if max_channels < C:
        raise MisqError(
            f"binned MI on {C} channels needs {C}^2 x {bins}^2 histogram cells (limit {max_channels} channels): "
            "use --mi-estimator gaussian for layers this wide"
        )
    if bins < 2 or n < 2 * bins:
        raise MisqError(f"binned MI needs at least 2 bins and {2 * bins} tokens, got {bins} bins and {n} tokens: use more calibration data or fewer bins")
    if n > max_tokens:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[:max_tokens].sort().values
        X = X[idx.to(X.device)]
        n = max_tokens
    X = X.float()
    if not torch.isfinite(X).all():
        raise NumericalError("activations contain NaN/Inf: check the model and calibration data")
    # Equal-frequency bin edges from the sorted columns; ties (e.g. a constant channel) fall
    # into one bin, so a dead channel has zero entropy and zero MI.
    srt = X.sort(dim=0).values
    edges = srt[(torch.arange(1, bins, device=X.device) * n) // bins]  # [bins-1, C]
    codes = torch.searchsorted(edges.T.contiguous(), X.T.contiguous(), right=True).T  # [n, C] in [0, bins)

    def one_hot(cols: slice) -> Tensor:  # [n, c * bins]
        return torch.nn.functional.one_hot(codes[:, cols], bins).reshape(n, -1).float()

    counts = torch.zeros(C, bins, device=X.device).scatter_add_(1, codes.T, torch.ones(C, n, device=X.device))
    # Entropies in float64: MI = H(X) + H(Y) - H(X,Y) cancels ~5 nats down to ~1e-3.
    p = counts.double() / n
    h = -torch.special.xlogy(p, p).sum(1)  # [C] marginal entropies
    m = (counts > 0).sum(1).double()  # non-empty bins, for Miller-Madow
    mi = torch.zeros(C, C, dtype=torch.float64, device=X.device)
    # Blocks bound memory: one-hot [n, block*bins] float32 <= 64 MB, joint block <= 128 MB.
    block = max(1, min(C, 2**24 // (n * bins), 4096 // bins))
    for i0 in range(0, C, block):
        oi = one_hot(slice(i0, i0 + block))
        ci = oi.shape[1] // bins
        for j0 in range(i0, C, block):
            oj = one_hot(slice(j0, j0 + block))
            cj = oj.shape[1] // bins
            joint = (oi.T @ oj).reshape(ci, bins, cj, bins)
            pj = joint.double() / n
            hxy = -torch.special.xlogy(pj, pj).sum((1, 3))
            mxy = (joint > 0).sum((1, 3)).double()
            hi, hj = h[i0 : i0 + ci, None], h[None, j0 : j0 + cj]
            mij = hi + hj - hxy + (m[i0 : i0 + ci, None] + m[None, j0 : j0 + cj] - mxy - 1) / (2 * n)
            mi[i0 : i0 + ci, j0 : j0 + cj] = mij
            mi[j0 : j0 + cj, i0 : i0 + ci] = mij.T
    mi = (0.5 * (mi + mi.T)).clamp_(min=0).float()  # diagonal blocks: both triangles, once
    mi.fill_diagonal_(0.0)
    return mi


def sensitivity(H: Tensor, W: Tensor | None = None) -> Tensor:
    """Diagonal OBS/GPTQ saliency of each input channel: ``H_jj * ||W[:, j]||^2`` (``[C]``).

    With ``W=None`` it is ``H_jj`` alone (the activation energy of the channel).
    """
    s = torch.diagonal(H).float().clamp(min=0)
    if W is not None:
        s = s * W.float().pow(2).sum(0)
    return s


def group_channels(
    method: str,
    n_groups: int,
    *,
    H: Tensor,
    W: Tensor | None = None,
    mi: Tensor | None = None,
    seed: int = 0,
    sensitivity_weight: float = 1.0,
) -> Tensor:
    """Partition the ``C`` input channels into ``n_groups`` groups.

    Args:
        method: ``"mi"`` (MI structure + sensitivity, see the module docstring) or
            ``"hessian"`` (sensitivity quantiles: channels sorted by ``H_jj ||W_j||^2`` and cut
            into ``K`` contiguous groups of near-equal size).
        n_groups: ``K``, between 1 and ``C``.
        H: ``[C, C]`` second-moment matrix of the layer inputs.
        W: ``[R, C]`` weights; sensitivity uses ``H_jj`` alone when ``None``.
        mi: ``[C, C]`` precomputed MI (e.g. from :func:`binned_mi`); ``gaussian_mi(H)`` if ``None``.
        seed: seed of the randomized eigensolver and k-means.
        sensitivity_weight: scales the log-sensitivity coordinate of ``"mi"`` (0 = MI only).

    Returns:
        CPU ``LongTensor [C]`` of group ids in ``[0, K)``; every group is non-empty and ids
        are ordered by ascending mean log-sensitivity.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square [C, C], got {tuple(H.shape)}")
    C = H.shape[0]
    if W is not None and (W.dim() != 2 or W.shape[1] != C):
        raise ValueError(f"W must be [R, {C}], got {tuple(W.shape)}")
    if n_groups < 1:
        raise MisqError(f"--n_groups {n_groups} must be at least 1")
    if n_groups > C:
        raise MisqError(f"--n_groups {n_groups} is larger than the layer's {C} input channels: use at most {C}")
    if method not in METHODS:
        raise MisqError(f"grouping method {method!r} is unknown: use mi or hessian (uniform quantization needs no grouping)")
    s = sensitivity(H, W)
    if not torch.isfinite(s).all():
        raise NumericalError("channel sensitivities are NaN/Inf: the layer's weights or Hessian are not finite")
    if n_groups == 1:
        return torch.zeros(C, dtype=torch.long)
    log_s = _log_sensitivity(s)
    if method == "hessian":
        order = torch.from_numpy(np.argsort(log_s, kind="stable"))
        groups = torch.empty(C, dtype=torch.long)
        groups[order] = (torch.arange(C) * n_groups) // C
        return groups
    if mi is None:
        mi = gaussian_mi(H)
    elif mi.shape != (C, C):
        raise ValueError(f"mi must be [{C}, {C}], got {tuple(mi.shape)}")
    emb = _spectral_embedding(mi, dim=min(n_groups, C - 1), seed=seed)
    sens = (math.sqrt(2.0) * sensitivity_weight / math.log(SENS_BIT_RATIO)) * log_s
    feats = np.concatenate([emb, sens[:, None]], axis=1)
    labels = _balanced_kmeans(feats, n_groups, min_size=max(1, C // (4 * n_groups)), seed=seed)
    return _relabel_by_sensitivity(labels, log_s, n_groups)


def _log_sensitivity(s: Tensor) -> np.ndarray:
    """``log s`` as float64 numpy, dead channels floored 1e-12 below the largest."""
    s = s.double().cpu().numpy()
    floor = max(float(s.max()), 1e-300) * 1e-12
    return np.log(np.maximum(s, floor))


def _spectral_embedding(mi: Tensor, dim: int, seed: int, n_iter: int = 4) -> np.ndarray:
    """Ng-Jordan-Weiss embedding ``[C, dim]`` of the affinity ``mi`` (rows of unit length).

    The top eigenvectors of the normalized affinity ``M = D^-1/2 A D^-1/2``. For large ``C``,
    ``M`` is never formed: ``M Q = D^-1/2 (A (D^-1/2 Q))`` reads ``A`` once per pass, and a
    randomized block subspace iteration (Halko et al. 2011, alg. 4.4, plus Rayleigh-Ritz)
    needs ``n_iter + 1`` such passes. k-means only needs the dominant subspace, not converged
    individual eigenvectors, so a few passes suffice -- against a dense eigensolver (minutes
    at C = 13824) or Lanczos (hundreds of memory-bound matrix-vector products).
    """
    C = mi.shape[0]
    A = mi.detach().float()  # no copy when already float32; stays on its device (GPU: fast)
    deg = A.sum(1).clamp(min=0)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))[:, None]
    if C <= EXACT_EIG_MAX_C:
        import scipy.linalg

        M = (A.double() * inv) * inv.T
        _, vec = scipy.linalg.eigh(M.cpu().numpy(), subset_by_index=[C - dim, C - 1])
    else:
        gen = torch.Generator().manual_seed(seed)
        Q = torch.linalg.qr(torch.randn(C, dim + 10, generator=gen).to(A.device)).Q
        for _ in range(n_iter):
            Q = torch.linalg.qr(inv * (A @ (inv * Q))).Q
        MQ = inv * (A @ (inv * Q))
        _, ritz = torch.linalg.eigh((Q.T @ MQ).double())  # ascending eigenvalues
        vec = (Q.double() @ ritz[:, -dim:]).cpu().numpy()
    norms = np.linalg.norm(vec, axis=1, keepdims=True)
    return np.divide(vec, norms, out=np.zeros_like(vec), where=norms > 1e-12)


def _balanced_kmeans(feats: np.ndarray, k: int, min_size: int, seed: int) -> np.ndarray:
    """k-means labels ``[C]`` with every cluster holding at least ``min_size`` points.

    Deficient clusters (smallest first) take the points whose move costs the least extra
    squared distance, only from clusters that stay at or above ``min_size``.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    # Single-threaded: on small [C, K+1] inputs OpenMP/BLAS threads oversubscribe (10x slower
    # on 2 cores, measured), and one thread gives the same labels on every machine.
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(feats)
    labels = km.labels_.astype(np.int64).copy()
    d2 = ((feats[:, None, :] - km.cluster_centers_[None, :, :]) ** 2).sum(-1)  # [C, K]
    sizes = np.bincount(labels, minlength=k)
    moved = 0
    for c in np.argsort(sizes, kind="stable"):
        need = min_size - sizes[c]
        if need <= 0:
            continue
        delta = d2[:, c] - d2[np.arange(len(labels)), labels]
        for i in np.argsort(delta, kind="stable"):
            if labels[i] != c and sizes[labels[i]] > min_size:
                sizes[labels[i]] -= 1
                labels[i] = c
                sizes[c] += 1
                moved += 1
                need -= 1
                if need == 0:
                    break
    if moved:
        log.debug("balanced %d k-means clusters: moved %d channels (min size %d)", k, moved, min_size)
    return labels


def _relabel_by_sensitivity(labels: np.ndarray, log_s: np.ndarray, k: int) -> Tensor:
    """Renumber clusters by ascending mean log-sensitivity (ties: lowest first channel)."""
    means = np.bincount(labels, weights=log_s, minlength=k) / np.maximum(np.bincount(labels, minlength=k), 1)
    first = np.full(k, len(labels))
    np.minimum.at(first, labels, np.arange(len(labels)))
    order = np.lexsort((first, means))  # last key is primary
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return torch.from_numpy(rank[labels])


__all__ = ["METHODS", "binned_mi", "gaussian_mi", "group_channels", "sensitivity"]
