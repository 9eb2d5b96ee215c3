"""SFDA: Self-challenging Fisher Discriminant Analysis.

Paper: Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a
Self-challenging Fisher Space", ECCV 2022, https://arxiv.org/abs/2207.03036. Formula, shapes and
direction: :func:`sfda`.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from ._linalg import class_means
from ._validation import check_features_labels, warn_degenerate

_SATURATION_TOL = 1e-9


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(1 - s) cov + s * (tr(cov) / D) I``: shrink towards the scaled identity."""
    out = (1.0 - shrinkage) * cov
    out[np.diag_indices_from(out)] += shrinkage * np.trace(cov) / cov.shape[0]
    return out


def _largest_eigenvalue(A: np.ndarray) -> float:
    """Three rounds of two power steps from the row sums, as the reference's ``iterative_A``
    (a rough estimate is enough here; it only sets the shrinkage strength)."""
    x = A.sum(axis=1)
    for _ in range(3):
        v = A @ x
        v = v / np.linalg.norm(v)
        x = A @ v
        x = x / np.linalg.norm(x)
    return float(x @ A @ v)


def _within_scatter(X: np.ndarray, y: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Prior-weighted sum of the biased per-class covariances."""
    d = X.shape[1]
    sw = np.zeros((d, d))
    for c, prior in enumerate(priors):
        Xc = X[y == c]
        Xc = Xc - Xc.mean(axis=0)
        sw += prior * (Xc.T @ Xc) / Xc.shape[0]
    return sw


def _regularised_fda_proba(X: np.ndarray, y: np.ndarray, shrinkage: float | None):
    """Fit the regularised Fisher discriminant and return (posteriors on X, shrinkage used).

    The within scatter is shrunk towards its scaled identity; the discriminant uses the full
    Fisher eigenbasis, which equals a linear discriminant with the shrunk within scatter.
    """
    n, n_classes = X.shape[0], int(y.max()) + 1
    priors = np.bincount(y, minlength=n_classes) / n
    sw = _within_scatter(X, y, priors)
    if not np.any(sw):
        raise ValueError("sfda: every class is a single repeated point (zero within-class "
                         "scatter); the Fisher discriminant is undefined")
    if shrinkage is None:
        shrinkage = max(np.exp(-5.0 * _largest_eigenvalue(sw)), 1e-10)
    means = class_means(X, y, n_classes)
    coef = np.linalg.solve(_shrunk(sw, shrinkage), means.T).T
    intercept = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(priors)
    return softmax(X @ coef.T + intercept, axis=1), shrinkage


def sfda(features, labels) -> float:
    r"""SFDA (Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a
    Self-challenging Fisher Space", ECCV 2022), as TencentARC/SFDA ``SFDA_Score``.

    1. Regularised FDA: within scatter ``S_w`` (prior-weighted biased class covariances),
       shrinkage ``lambda = max(exp(-5 * lambda_max(S_w)), 1e-10)`` (``lambda_max`` by a few
       power steps), ``S_w^lambda = (1-lambda) S_w + lambda tr(S_w)/D I``; class posteriors
       ``p(y|x) = softmax_c(x^T W mu_c - mu_c^T W mu_c / 2 + log pi_c)``,
       ``W = (S_w^lambda)^-1``.
    2. ConfMix: ``q = softmax(p)`` (softened once more), and each sample of class c moves
       towards the mean of the other class means ``mu_{-c}``:
       ``x <- q_c(x) x + (1 - q_c(x)) mu_{-c}``.
    3. Refit with the same lambda on the mixed features;

    .. math:: \mathrm{SFDA} = \frac1n \sum_i p(y_i \mid \tilde x_i) \quad\text{(no log)}

    The caller's array is never modified (the reference overwrites it in place).

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar in (0, 1]; higher is better.

    Degenerate input: with few samples and many dimensions the classes become perfectly
    separable and the score saturates at 1.0 (TencentARC/SFDA issue #5); a score within 1e-9
    of 1 is returned with a DegenerateInputWarning and should be treated as a tie. Zero
    within-class scatter, NaN/inf, a single class, a class with one sample or mismatched
    lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    n_classes = int(y.max()) + 1
    proba, shrinkage = _regularised_fda_proba(X, y, None)
    confidence = softmax(proba, axis=1)[np.arange(y.shape[0]), y][:, None]
    means = class_means(X, y, n_classes)
    other_means = (means.sum(axis=0) - means) / (n_classes - 1)
    mixed = confidence * X + (1.0 - confidence) * other_means[y]
    proba, _ = _regularised_fda_proba(mixed, y, shrinkage)
    score = float(np.mean(proba[np.arange(y.shape[0]), y]))
    if score > 1.0 - _SATURATION_TOL:
        warn_degenerate(f"sfda: score {score!r} is saturated at 1 (classes perfectly separable "
                        "in the regularised Fisher space); treat it as a tie")
    return score
