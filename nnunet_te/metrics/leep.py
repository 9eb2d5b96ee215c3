"""LEEP family: LEEP, its per-sample term, NCE and NLEEP (source-class based metrics).

Papers: Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
Representations", ICML 2020, https://arxiv.org/abs/2002.12462; Tran et al., "Transferability and
Hardness of Supervised Classification Tasks", ICCV 2019, https://arxiv.org/abs/1908.08142 (NCE);
Li et al., "Ranking Neural Checkpoints", CVPR 2021, https://arxiv.org/abs/2011.11200 (NLEEP).
Formulas, shapes and direction: in each function.
"""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture

from ._linalg import pca_transform
from ._validation import (check_features_labels, check_labels, check_probabilities,
                          check_source_labels)


def leep_conditional(joint: np.ndarray) -> np.ndarray:
    r"""Empirical conditional :math:`\hat P(y \mid z) = \hat P(y, z) / \sum_{y'} \hat P(y', z)`.

    ``joint`` may be unnormalised (for example ``sum_{i: y_i = y} theta_iz`` accumulated over
    several cases): the conditional does not depend on the scale.

    Shape:
        - joint: (C, C_s) non-negative, target classes by source classes.
        - output: (C, C_s), columns sum to 1, or are all 0 for a source class with no mass.
    """
    marginal = joint.sum(axis=0)
    # A source class that receives no mass on the target set has P(y|z) = 0/0; its theta
    # column is all zero, so any finite value leaves the sum unchanged - use 0.
    return np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)


def _expected_empirical_prediction(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return ``sum_z P(y_i|z) theta_iz`` for every sample (the argument of LEEP's log)."""
    n = theta.shape[0]
    joint = np.zeros((int(y.max()) + 1, theta.shape[1]), dtype=np.float64)
    np.add.at(joint, y, theta)
    joint /= n
    return np.einsum("iz,iz->i", theta, leep_conditional(joint)[y])


def leep_per_sample(source_probabilities, labels) -> np.ndarray:
    r"""Per-sample LEEP term (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability
    of Learned Representations", ICML 2020, Eq. 2).

    .. math::
        T_i = \log \sum_z \hat P(y_i \mid z)\, \theta(x_i)_z, \qquad
        \hat P(y, z) = \frac{1}{n} \sum_{i: y_i = y} \theta(x_i)_z, \quad
        \hat P(y \mid z) = \hat P(y, z) / \sum_{y'} \hat P(y', z).

    Its mean is :func:`leep`. Used as the pixel transferability map of the transfer-risk
    weighting (the Transfer Risk Map paper, Zhang et al. 2025, https://arxiv.org/abs/2502.02340;
    docs/nnunet.md section 3).

    Shape:
        - source_probabilities: (n, C_s), rows on the probability simplex (softmax outputs of
          the source head, not logits).
        - labels: (n,) target labels in [0, C), every class present, C >= 2.
        - output: (n,), each <= 0; higher (closer to 0) is better.

    Degenerate input: a source class with zero total mass is ignored (its conditional is set
    to 0 instead of 0/0). Rows that are not probability vectors, NaN/inf, a single target
    class or mismatched lengths raise ValueError.
    """
    y = check_labels(labels)
    theta = check_probabilities(source_probabilities, y.shape[0])
    return np.log(_expected_empirical_prediction(theta, y))


def leep(source_probabilities, labels) -> float:
    r"""Log Expected Empirical Prediction (Nguyen et al., ICML 2020).

    .. math:: \mathrm{LEEP} = \frac{1}{n} \sum_i \log \sum_z \hat P(y_i \mid z)\, \theta(x_i)_z

    (see :func:`leep_per_sample` for the empirical joint and conditional). Arguments are
    (source probabilities, target labels) in that order, as in thuml/LogME ``LEEP.py``.

    Shape:
        - source_probabilities: (n, C_s) probabilities of the source head on target samples.
        - labels: (n,) in [0, C), C >= 2.
        - score: scalar in (-inf, 0]; higher is better; 0 means the source head determines the
          target label exactly.

    Degenerate input: zero-mass source classes are ignored; invalid probabilities, a single
    target class, or mismatched lengths raise ValueError.
    """
    return float(np.mean(leep_per_sample(source_probabilities, labels)))


def nce(source_labels, labels) -> float:
    r"""Negative Conditional Entropy (Tran et al., "Transferability and Hardness of Supervised
    Classification Tasks", ICCV 2019).

    .. math:: \mathrm{NCE} = -H(Y \mid Z) = \sum_{y, z} \hat P(y, z) \log \hat P(y \mid z)

    with the empirical joint of target labels ``y`` and hard source predictions
    ``z = argmax theta(x)``; ``0 log 0 = 0``.

    Shape:
        - source_labels: (n,) non-negative integer source-class predictions (need not cover
          every source class).
        - labels: (n,) target labels in [0, C), C >= 2.
        - score: scalar in [-log C, 0]; higher is better; 0 when z determines y.

    Degenerate input: negative or non-integer source labels, a single target class or
    mismatched lengths raise ValueError.
    """
    y = check_labels(labels)
    z = check_source_labels(source_labels, y.shape[0])
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1), dtype=np.float64)
    np.add.at(joint, (y, z), 1.0 / y.shape[0])
    marginal = np.broadcast_to(joint.sum(axis=0), joint.shape)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log(joint[nonzero] / marginal[nonzero])))


def nleep(features, labels, *, variance_kept: float = 0.8, components_per_class: int = 5,
          random_state: int = 0, log: bool = True) -> float:
    r"""Gaussian (N-)LEEP (Li et al., "Ranking Neural Checkpoints", CVPR 2021).

    Encoders without a source head get pseudo source classes: PCA keeping ``variance_kept`` of
    the variance, then a full-covariance Gaussian mixture with ``components_per_class * C``
    components (seeded by ``random_state``); its posteriors play the role of ``theta`` in
    :func:`leep`.

    .. math::
        \mathrm{NLEEP} = \frac{1}{n}\sum_i \log \sum_z \hat P(y_i \mid z)\, \pi_z(x_i)
        \qquad (\texttt{log=False}: \frac{1}{n}\sum_i \sum_z \hat P(y_i \mid z)\, \pi_z(x_i))

    Reference modes: ``random_state=42, log=True`` reproduces Josh-Talks
    ``gaussian_log_expected_empirical_prediction``; ``random_state=0, log=False`` reproduces the
    SFDA-lineage ``NLEEP`` (TencentARC/SFDA, DovileDo) called after ``np.random.seed(0)`` (their
    mixture is unseeded, so their value is random: spread ~0.02 across seeds).

    Shape:
        - features: (n, D) float features.
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar; higher is better. ``log=True``: in (-inf, 0]; ``log=False``: in (0, 1].

    Degenerate input: fewer samples than mixture components raises ValueError. D > n is
    handled by the PCA step. NaN/inf, a single class or mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if not 0.0 < variance_kept <= 1.0:
        raise ValueError(f"variance_kept must be in (0, 1], got {variance_kept}")
    n_mix = int(components_per_class) * (int(y.max()) + 1)
    if n_mix < 1 or n_mix > X.shape[0]:
        raise ValueError(f"the Gaussian mixture needs {n_mix} components but there are only "
                         f"{X.shape[0]} samples")
    # A float of exactly 1.0 would mean "one component" to scikit-learn: keep every dimension.
    Z = pca_transform(X, X.shape[1] if variance_kept == 1.0 else variance_kept)
    gmm = GaussianMixture(n_components=n_mix, random_state=random_state).fit(Z)
    expected = _expected_empirical_prediction(gmm.predict_proba(Z), y)
    return float(np.mean(np.log(expected)) if log else np.mean(expected))
