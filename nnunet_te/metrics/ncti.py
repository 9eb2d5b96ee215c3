"""NCTI: Neural Collapse inspired Transferability Index.

Paper: Wang et al., "How Far Pre-trained Models Are from Neural Collapse on the Target Dataset
Informs their Transferability", ICCV 2023; reference code https://github.com/BUserName/NCTI.
Formula, shapes and direction: :func:`ncti_components` and :func:`ncti`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from ._linalg import minmax
from ._validation import check_features_labels, check_zoo_scores

_N_PCA = 64
_COMPONENT_KEYS = ("seli", "ncc", "vc")


def ncti_components(features, labels) -> dict:
    r"""Per-model components of NCTI (Wang et al., "How Far Pre-trained Models Are from Neural
    Collapse on the Target Dataset Informs their Transferability", ICCV 2023), as
    BUserName/NCTI ``NCTI_Score``.

    Features are reduced by PCA to ``k = min(64, n, D)`` components (scikit-learn 'auto'
    solver as the reference, exact on its inputs; seeded with 0 in case 'auto' picks the
    randomized solver on large inputs, where the unseeded reference is not reproducible); a
    linear discriminant is fitted with shrinkage ``s = exp(-sum of the first 32 PCA
    variances)``, or, when ``s`` underflows to <= 1e-10, the unshrunk SVD solver. Then

    - ``seli``: nuclear norm of the centred LDA projection (spread of the classes in the
      discriminant space; higher is better);
    - ``ncc``: mean LDA posterior of the true class (a soft nearest-class-centre accuracy);
    - ``vc``: ``log sum_c ||P_c||_*``, P_c the LDA posteriors of the samples of class c
      (variability collapse; it enters the zoo score with a minus sign, but on its own it
      has no direction: confident one-hot posteriors have a larger nuclear norm than uniform
      ones).

    Combine over a zoo with :func:`ncti`.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - output: dict with float entries ``seli``, ``ncc``, ``vc``.

    Degenerate input: D or n below 64 reduces to fewer PCA components (the reference raises
    there). NaN/inf, a single class, a class with one sample or mismatched lengths raise
    ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    # The PCA variances set the shrinkage, so the estimator itself is needed here.
    pca = PCA(n_components=min(_N_PCA, X.shape[0], X.shape[1]), random_state=0)
    Z = pca.fit_transform(X)
    shrinkage = max(np.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    if shrinkage == 1e-10:
        lda = LinearDiscriminantAnalysis(solver="svd")
    else:
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=float(shrinkage))
    projected = lda.fit_transform(Z, y)
    projected = projected - projected.mean(axis=0, keepdims=True)
    proba = lda.predict_proba(Z)
    class_nuclear = sum(np.linalg.norm(proba[y == c], ord="nuc") for c in range(int(y.max()) + 1))
    return {
        "seli": float(np.linalg.norm(projected, ord="nuc")),
        "ncc": float(np.mean(proba[np.arange(y.shape[0]), y])),
        "vc": float(np.log(class_nuclear)),
    }


def ncti(components_per_model: Sequence[dict]) -> np.ndarray:
    r"""Zoo-level NCTI score (Wang et al., ICCV 2023):

    .. math:: \mathrm{NCTI}_m = \mathrm{mm}(\mathit{seli})_m + \mathrm{mm}(\mathit{ncc})_m
              - \mathrm{mm}(\mathit{vc})_m

    with ``mm`` the min-max normalisation over the K models of the zoo. The score is
    zoo-relative: adding or removing a model changes every other model's score; compare
    scores only within one zoo and one target.

    Shape:
        - components_per_model: K dicts from :func:`ncti_components`.
        - output: (K,) scores in [-1, 2]; higher is better.

    Degenerate input: a component equal for every model (including K = 1) normalises to 0.5
    for all, so it adds the same constant to every score and does not change the ranking.
    An empty zoo, a missing key or a non-finite component raises ValueError.
    """
    if len(components_per_model) == 0:
        raise ValueError("ncti needs the components of at least one model")
    columns = {}
    for key in _COMPONENT_KEYS:
        missing = [i for i, comp in enumerate(components_per_model) if key not in comp]
        if missing:
            raise ValueError(f"ncti: model(s) {missing} lack the component {key!r}")
        columns[key] = check_zoo_scores([comp[key] for comp in components_per_model], name=key)
    return minmax(columns["seli"]) + minmax(columns["ncc"]) - minmax(columns["vc"])
