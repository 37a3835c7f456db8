"""Measures the evaluations of several families share."""

from __future__ import annotations

import numpy as np


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F) (Heusel et al. 2017).

    tr((C_a C_b)^½) is computed as Σ √λ of the symmetric C_a^½ C_b C_a^½, by eigendecomposition: exact for
    the singular covariances that dead ReLU units give, where ``scipy.linalg.sqrtm`` warns and drifts.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
