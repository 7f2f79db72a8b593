"""CCA Merge (Horoi et al., ICML 2024): every model's features mapped into
model A's by canonical correlation analysis, then averaged.

Permutations assume one-to-one correspondences between features; CCA Merge
allows any linear map. For each root and each model ``m`` it takes the
covariances of A's and m's features (``S_aa``, ``S_mm``, ridge-regularised,
and ``S_am``), the singular vectors of ``S_aa^-1/2 S_am S_mm^-1/2 = U S V^T``
and maps m's features into A's space with

    T_m = S_mm^-1/2 V U^T S_aa^1/2          (features of m -> A's)
    R_m = S_aa^-1/2 U V^T S_mm^1/2          (A's space -> features of m)

The merged layer is the average of the models' layers in A's space: output
axes read ``T_m^T``, input axes ``R_m^T`` (the merge and unmerge matrices of
ZipIt!'s framework, which ``ZipProjector(linear_maps=True)`` applies).
Heads and convolution groups are aligned as units first, as for ZipIt!.
"""
from __future__ import annotations

import numpy as np

from .zipit import zippable

CCA_RIDGE = 0.1  # the paper's gamma, relative here to the mean variance of the features


def _power(s: np.ndarray, p: float) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    w = np.clip(w, 1e-12, None)
    return (v * w ** p) @ v.T


def cca_maps(cov: np.ndarray, n_models: int, ridge: float = CCA_RIDGE) -> tuple:
    """Merge and unmerge matrices (``d x N d`` and ``N d x d``, ZipIt!'s
    layout) mapping every model's features into model A's by CCA; A's own
    blocks are the identity."""
    d = cov.shape[0] // n_models
    M = np.zeros((d, n_models * d))
    U = np.zeros((n_models * d, d))
    M[:, :d] = U[:d] = np.eye(d)
    s_aa = cov[:d, :d]
    scale = max(float(np.mean(np.diag(s_aa))), 1e-12)
    s_aa = s_aa + ridge * scale * np.eye(d)
    aa_half, aa_inv_half = _power(s_aa, 0.5), _power(s_aa, -0.5)
    for m in range(1, n_models):
        block = slice(m * d, (m + 1) * d)
        s_mm = cov[block, block] + ridge * max(float(np.mean(np.diag(cov[block, block]))), 1e-12) * np.eye(d)
        mm_half, mm_inv_half = _power(s_mm, 0.5), _power(s_mm, -0.5)
        u, _, vt = np.linalg.svd(aa_inv_half @ cov[:d, block] @ mm_inv_half)
        to_a = mm_inv_half @ vt.T @ u.T @ aa_half  # T_m
        from_a = aa_inv_half @ u @ vt @ mm_half  # R_m
        M[:, block] = to_a.T
        U[block] = from_a.T
    return M, U


def cca_atoms(covs: dict, keys: dict, exclude: set, n_models: int) -> dict:
    """CCA maps for every root ZipIt! would zip (atoms, depthwise blocks), from
    the pooled covariances: ``{root uid: (M, U)}``."""
    return {uid: cca_maps(cov, n_models) for uid, _, cov in zippable(covs, keys, exclude, n_models)}
