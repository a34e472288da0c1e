"""Fréchet distance between Gaussians fitted to feature sets (shared by FVD and FID).

Pure numpy in float64:  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)),
with the sample covariance using n - 1 (``np.cov`` default).

tr(sqrtm(S1 S2)) is computed as in tf-gan (`_trace_sqrt_product`, which the FVD reference uses):
tr(sqrtm(A S2 A)) with A = S1^(1/2), all through symmetric eigendecompositions. For well-conditioned
covariances it equals the pytorch-fid / StyleGAN `scipy.linalg.sqrtm` route to round-off; for the
singular covariances of small clip sets (N <= D) it stays exact (FD(X, X) ~ 1e-12), where the
Schur-based `sqrtm` of the singular product is off by ~1e-4 and may turn complex.
"""

from __future__ import annotations

import numpy as np


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and n-1 covariance (D, D) in float64 of features (N, D); needs N >= 2."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or Inf")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_eigh(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs (w, V) of a symmetric PSD matrix, keeping eigenvalues above round-off."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
    tol = max(w.max(initial=0.0), 0.0) * sigma.shape[0] * np.finfo(np.float64).eps
    keep = w > tol
    return w[keep], v[:, keep]


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for symmetric PSD matrices (D, D), in float64."""
    w1, v1 = _psd_eigh(np.asarray(sigma1, np.float64))
    if w1.size == 0:
        return 0.0
    root = np.sqrt(w1)
    # Nonzero spectrum of S1^(1/2) S2 S1^(1/2) in S1's eigenbasis: (r, r) with r = rank(S1).
    inner = root[:, None] * (v1.T @ np.asarray(sigma2, np.float64) @ v1) * root[None, :]
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be equal (D,) vectors: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means ({d},)")
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or Inf")
    diff = mu1 - mu2
    trace_sqrt = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
