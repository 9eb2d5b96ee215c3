"""LP x FU (Juodelyte et al.): label-propagation score and its zoo combination with FU.

Paper: Juodelyte et al., "On dataset transferability in medical image classification", code
https://github.com/DovileDo/transferability-in-medical-imaging (S_FU itself needs gradients and
lives in :mod:`nnunet_te.classification.feature_update`). Formulas, shapes and direction: in each
function.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier, NeighborhoodComponentsAnalysis

from ._linalg import capped_rows, minmax
from ._validation import check_features_labels, check_zoo_scores


# NCA evaluates an (n, n) softmax over pairwise distances at every L-BFGS step.
LP_MAX_SAMPLES = 2048


def lp_score(features, labels, *, n_components: int = 50, n_neighbors: int = 5,
             random_state: int = 42, max_samples: int | None = LP_MAX_SAMPLES,
             subsample_seed: int = 0) -> float:
    r"""S_LP, the label-propagation term of LP x FU (Juodelyte et al., "On dataset
    transferability in medical image classification"; reference
    DovileDo/transferability-in-medical-imaging ``LP_Score``).

    Neighbourhood Components Analysis (scikit-learn, ``min(n_components, D)`` components,
    seeded, its default 50 L-BFGS iterations) learns a metric; a k-NN classifier fitted on the
    projected samples predicts them back (resubstitution, each sample is its own neighbour):

    .. math:: S_{LP} = \frac1n \sum_i \hat p_{kNN}(y_i \mid A x_i)

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar in [1/k, 1], a multiple of 1/(k n); higher is better.

    Bounded: inputs with more than ``max_samples`` rows (default 2048; None disables the cap)
    are scored on a class-stratified subsample of that size drawn with
    ``numpy.random.default_rng(subsample_seed)`` (default 0); the reference cases (n <= 900)
    are below the cap.

    Degenerate input: fewer samples than ``n_neighbors``, NaN/inf, a single class, a class
    with one sample or mismatched lengths raise ValueError. D > n is allowed (NCA learns at
    most ``n_components`` directions).
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    rows = capped_rows(y, max_samples, subsample_seed)
    if rows is not None:
        X, y = X[rows], y[rows]
    if not 1 <= n_neighbors <= X.shape[0]:
        raise ValueError(f"n_neighbors={n_neighbors} needs 1 <= n_neighbors <= n={X.shape[0]}")
    nca = NeighborhoodComponentsAnalysis(n_components=min(n_components, X.shape[1]),
                                         random_state=random_state)
    Z = nca.fit_transform(X, y)
    knn = KNeighborsClassifier(n_neighbors=n_neighbors).fit(Z, y)
    return float(np.mean(knn.predict_proba(Z)[np.arange(y.shape[0]), y]))


def lp_fu(lp_scores, fu_scores, *, cross_domain: bool = False) -> np.ndarray:
    r"""Zoo-level LP x FU score (Juodelyte et al., "On dataset transferability in medical image
    classification"):

    .. math:: S_m = \mathrm{mm}(S_{LP})_m \cdot \mathrm{mm}(S_{FU})_m

    with ``mm`` the min-max normalisation over the K models of the zoo; in the cross-domain
    setting (natural-image sources) both factors are ``1 - mm``. Zoo-relative: compare
    scores only within one zoo and one target.

    Shape:
        - lp_scores: (K,) from :func:`lp_score`.
        - fu_scores: (K,) S_FU from
          :func:`nnunet_te.classification.feature_update.feature_update_score`, same model order.
        - output: (K,) in [0, 1]; higher is better.

    Degenerate input: a factor equal for every model (including K = 1) normalises to 0.5, so
    the ranking follows the other factor. Different lengths, an empty zoo or non-finite
    scores raise ValueError.
    """
    lp = check_zoo_scores(lp_scores, name="lp_scores")
    fu = check_zoo_scores(fu_scores, name="fu_scores")
    if lp.shape != fu.shape:
        raise ValueError(f"lp_scores has {lp.size} models but fu_scores has {fu.size}")
    lp_n, fu_n = minmax(lp), minmax(fu)
    if cross_domain:
        lp_n, fu_n = 1.0 - lp_n, 1.0 - fu_n
    return lp_n * fu_n
