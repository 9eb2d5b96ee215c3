"""Properties of the classification-style metrics: invariances, analytic values, bad input."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from nnunet_te.metrics._validation import DegenerateInputWarning
from nnunet_te.metrics.logme import logme
from nnunet_te.metrics.gbc import gbc
from nnunet_te.metrics.hscore import h_score, regularized_h_score
from nnunet_te.metrics.leep import leep, leep_per_sample, nce, nleep
from nnunet_te.metrics.lpfu import lp_fu, lp_score
from nnunet_te.metrics.ncti import ncti, ncti_components
from nnunet_te.metrics.parc import parc
from nnunet_te.metrics.sfda import sfda
from nnunet_te.metrics.transrate import transrate

# derandomize: a fixed, reproducible set of examples (no flaky CI); small sizes keep it fast.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

FEATURE_METRICS = {
    "logme": logme,
    "logme_icml": lambda X, y: logme(X, y, algorithm="icml"),
    "h_score": h_score,
    "regularized_h_score": regularized_h_score,
    "transrate": transrate,
    "parc": lambda X, y: parc(X, y, exact_label_ties=True),
    "sfda": sfda,
    "ncti_seli": lambda X, y: ncti_components(X, y)["seli"],
    "ncti_ncc": lambda X, y: ncti_components(X, y)["ncc"],
    "ncti_vc": lambda X, y: ncti_components(X, y)["vc"],
    "gbc_spherical": lambda X, y: gbc(X, y, gaussian="spherical"),
    "gbc_diagonal": lambda X, y: gbc(X, y, gaussian="diagonal"),
    "lp": lambda X, y: lp_score(X, y, n_components=3),
}
# Public entry points taking (features, labels) directly, for the bad-input checks.
FEATURE_ENTRY_POINTS = [logme, h_score, regularized_h_score, transrate, parc, sfda,
                        ncti_components, gbc, lp_score, nleep]


@pytest.fixture(autouse=True)
def _single_blas_thread():
    with threadpool_limits(limits=1):
        yield


@st.composite
def labelled_features(draw, min_classes=2, max_classes=3):
    """Gaussian class clusters with random offsets: n in [12, 30], D in [3, 6]."""
    seed = draw(st.integers(0, 2**32 - 1))
    n_classes = draw(st.integers(min_classes, max_classes))
    per_class = draw(st.integers(4, 10))
    dim = draw(st.integers(3, 6))
    separation = draw(st.floats(0.0, 4.0))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    X = rng.normal(size=(y.size, dim)) + separation * rng.normal(size=(n_classes, dim))[y]
    return X, y, rng


def _permuted(X, y, rng):
    order = rng.permutation(y.size)
    return X[order], y[order]


@pytest.mark.filterwarnings("ignore::nnunet_te.metrics._validation.DegenerateInputWarning")
@pytest.mark.parametrize("name", sorted(FEATURE_METRICS))
@SETTINGS
@given(data=labelled_features())
def test_sample_order_does_not_matter(name, data):
    X, y, rng = data
    metric = FEATURE_METRICS[name]
    assert np.isclose(metric(*_permuted(X, y, rng)), metric(X, y), rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore::nnunet_te.metrics._validation.DegenerateInputWarning")
@pytest.mark.parametrize("name", sorted(FEATURE_METRICS))
@SETTINGS
@given(data=labelled_features())
def test_renaming_the_classes_does_not_matter(name, data):
    X, y, rng = data
    metric = FEATURE_METRICS[name]
    renamed = rng.permutation(int(y.max()) + 1)[y]
    assert np.isclose(metric(X, renamed), metric(X, y), rtol=1e-6, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_classes=st.integers(2, 3))
def test_nleep_is_order_and_name_invariant_when_the_mixture_is_identifiable(seed, n_classes):
    # The mixture's k-means initialisation depends on sample order, so NLEEP is only
    # order-invariant when the optimum is unique: far-apart, one-component-per-class blobs.
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), 15)
    X = rng.normal(size=(y.size, 4)) + 50.0 * np.eye(n_classes, 4)[y]
    reference = nleep(X, y, components_per_class=1)
    assert np.isclose(nleep(*_permuted(X, y, rng), components_per_class=1), reference, atol=1e-8)
    renamed = rng.permutation(n_classes)[y]
    assert np.isclose(nleep(X, renamed, components_per_class=1), reference, atol=1e-8)
    assert reference == pytest.approx(0.0, abs=1e-6)  # the mixture recovers the classes


@st.composite
def probabilities_and_labels(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    n, n_source = draw(st.integers(6, 40)), draw(st.integers(2, 8))
    rng = np.random.default_rng(seed)
    y = np.concatenate([[0, 1], rng.integers(0, 2, n - 2)])
    logits = rng.normal(scale=draw(st.floats(0.1, 5.0)), size=(n, n_source))
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), y, rng


@SETTINGS
@given(data=probabilities_and_labels())
def test_leep_and_nce_invariances(data):
    theta, y, rng = data
    order = rng.permutation(y.size)
    assert np.isclose(leep(theta[order], y[order]), leep(theta, y), rtol=1e-12)
    assert np.isclose(leep(theta, 1 - y), leep(theta, y), rtol=1e-12)
    # Relabelling the source classes permutes theta's columns.
    assert np.isclose(leep(theta[:, rng.permutation(theta.shape[1])], y), leep(theta, y),
                      rtol=1e-12)
    per_sample = leep_per_sample(theta, y)
    assert per_sample.shape == y.shape and np.all(per_sample <= 0)
    assert np.isclose(per_sample.mean(), leep(theta, y), rtol=1e-12)
    z = theta.argmax(axis=1)
    assert np.isclose(nce(z[order], y[order]), nce(z, y), rtol=1e-12, atol=1e-15)
    assert -np.log(2) - 1e-12 <= nce(z, y) <= 0


def test_leep_of_a_perfect_source_head_is_zero():
    y = np.array([0, 0, 1, 2, 2, 1, 0])
    theta = np.eye(3)[y]
    assert leep(theta, y) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(leep_per_sample(theta, y), 0.0, atol=1e-15)
    assert nce(y, y) == pytest.approx(0.0, abs=1e-15)


def test_leep_known_value_and_zero_mass_source_class():
    # Source class 2 never gets mass: it must be ignored, not turn the score into NaN.
    theta = np.array([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.3, 0.7, 0.0]])
    y = np.array([0, 0, 1, 1])
    joint = np.array([[1.4, 0.6], [0.4, 1.6]]) / 4
    cond = joint / joint.sum(axis=0)
    expected = np.mean(np.log([theta[i, :2] @ cond[y[i]] for i in range(4)]))
    assert leep(theta, y) == pytest.approx(expected, rel=1e-13)
    # NCE: z = (0, 0, 1, 1) = y, so H(Y|Z) = 0; swapping one prediction gives a known entropy.
    assert nce([0, 0, 1, 0], y) == pytest.approx(-0.75 * (np.log(3) - 2 / 3 * np.log(2)), rel=1e-13)


def test_nleep_without_log_is_the_mean_of_the_exponentiated_terms():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    X = rng.normal(size=(40, 5)) + 1.5 * y[:, None]
    with_log, without_log = nleep(X, y, log=True), nleep(X, y, log=False)
    assert with_log < 0 and 0 < without_log <= 1
    assert np.log(without_log) >= with_log  # Jensen


def _separable_and_shuffled(seed=0, n=60, dim=8):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], n // 3)
    X = rng.normal(size=(n, dim)) + 4.0 * np.eye(3, dim)[y]
    return X, y, rng.permutation(y)


# ncti_vc alone has no direction (confident one-hot posteriors have a larger nuclear norm
# than uniform ones); only the zoo combination is ordered, checked below.
@pytest.mark.parametrize("name", sorted(set(FEATURE_METRICS) - {"ncti_vc"}))
def test_separable_features_beat_shuffled_labels(name):
    X, y, shuffled = _separable_and_shuffled()
    metric = FEATURE_METRICS[name]
    assert metric(X, y) > metric(X, shuffled)


def test_ncti_zoo_prefers_separable_features():
    X, y, shuffled = _separable_and_shuffled()
    scores = ncti([ncti_components(X, y), ncti_components(X, shuffled)])
    assert scores[0] > scores[1]


def test_gbc_extremes():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    same = np.concatenate([X, X])
    y = np.repeat([0, 1], 40)
    for kind in ("spherical", "diagonal"):
        # Identical class distributions: D_B = 0 for both ordered pairs, the minimum -C(C-1).
        assert gbc(same, y, gaussian=kind) == pytest.approx(-2.0, abs=1e-12)
        far = np.concatenate([X, X + 1e3])
        assert -1e-12 < gbc(far, y, gaussian=kind) <= 0.0


def test_h_score_upper_bound_and_saturation_warning():
    X, y, _ = _separable_and_shuffled()
    assert 0 < h_score(X, y) <= 2 + 1e-9
    wide = np.random.default_rng(2).normal(size=(12, 30))
    labels = np.repeat([0, 1, 2], 4)
    with pytest.warns(DegenerateInputWarning, match="saturates at C-1"):
        assert h_score(wide, labels) == pytest.approx(2.0, rel=1e-6)
    with pytest.warns(DegenerateInputWarning, match="not comparable"):
        transrate(wide, labels)
    with pytest.warns(DegenerateInputWarning, match="not the maximum evidence"):
        logme(wide, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regularized_h_score(wide, labels)
        logme(wide, labels, algorithm="icml")


def test_h_scores_stable_mode_equals_reference_when_well_conditioned():
    X, y, _ = _separable_and_shuffled(n=300)
    assert h_score(X, y) == h_score(X, y, mode="reference")
    assert regularized_h_score(X, y) == regularized_h_score(X, y, mode="reference")
    with pytest.raises(ValueError, match="mode"):
        h_score(X, y, mode="tllib")


def test_h_scores_sample_side_matches_the_covariance_side_on_wide_features():
    rng = np.random.default_rng(5)
    wide, labels = rng.normal(size=(30, 200)), np.repeat([0, 1, 2], 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        assert h_score(wide, labels) == pytest.approx(h_score(wide, labels, mode="reference"),
                                                      rel=1e-9)
    assert regularized_h_score(wide, labels) == pytest.approx(
        regularized_h_score(wide, labels, mode="reference"), rel=1e-9)


def test_h_score_stable_mode_ignores_row_order_on_ill_conditioned_features():
    rng = np.random.default_rng(6)
    basis = rng.normal(size=(40, 8))
    X = rng.normal(size=(400, 8)) @ basis.T + 1e-9 * rng.normal(size=(400, 40))
    y = np.arange(400) % 3
    order = rng.permutation(400)
    assert h_score(X[order], y[order]) == pytest.approx(h_score(X, y), rel=1e-6)


@pytest.mark.parametrize("metric, cap", [("parc", "max_samples"), ("lp", "max_samples")])
def test_pairwise_metrics_subsample_to_their_cap(metric, cap):
    from nnunet_te.metrics._linalg import capped_rows

    X, y, _ = _separable_and_shuffled(n=120)
    function = {"parc": lambda *a, **k: parc(*a, exact_label_ties=True, **k),
                "lp": lambda *a, **k: lp_score(*a, n_components=3, **k)}[metric]
    rows = capped_rows(y, 60, 0)
    assert rows.size <= 60 and np.array_equal(np.bincount(y[rows]), np.bincount(y) // 2)
    with threadpool_limits(1):
        assert function(X, y, **{cap: 60}) == function(X[rows], y[rows], **{cap: None})
        assert function(X, y, **{cap: 500}) == function(X, y, **{cap: None})


def test_logme_algorithms_agree_when_well_posed():
    X, y, _ = _separable_and_shuffled(n=300)
    assert logme(X, y) == pytest.approx(logme(X, y, algorithm="icml"), rel=1e-4)


def test_sfda_does_not_mutate_and_flags_saturation():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 5)
    X = rng.normal(size=(10, 200)) + 10.0 * y[:, None]
    before = X.copy()
    with pytest.warns(DegenerateInputWarning, match="saturated"):
        score = sfda(X, y)
    assert score > 1 - 1e-9
    np.testing.assert_array_equal(X, before)
    X2, y2, _ = _separable_and_shuffled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 < sfda(X2, y2) < 1


def test_parc_tie_modes_agree_for_two_classes():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 30)
    X = rng.normal(size=(60, 6)) + y[:, None]
    assert parc(X, y) == parc(X, y, exact_label_ties=True)
    assert -100 <= parc(X, y) <= 100


def test_zoo_combinations():
    comps = [{"seli": 1.0, "ncc": 0.5, "vc": 2.0}, {"seli": 3.0, "ncc": 0.9, "vc": 1.0},
             {"seli": 2.0, "ncc": 0.7, "vc": 1.5}]
    np.testing.assert_allclose(ncti(comps), [-1.0, 2.0, 0.5])
    np.testing.assert_allclose(ncti(comps[:1]), [0.5])  # all-equal components -> 0.5 each
    np.testing.assert_allclose(lp_fu([0.5, 0.9, 0.7], [1.0, 3.0, 2.0]), [0.0, 1.0, 0.25])
    np.testing.assert_allclose(lp_fu([0.5, 0.9, 0.7], [1.0, 3.0, 2.0], cross_domain=True),
                               [1.0, 0.0, 0.25])
    np.testing.assert_allclose(lp_fu([0.4, 0.4], [1.0, 2.0]), [0.0, 0.5])
    with pytest.raises(ValueError, match="lack the component 'vc'"):
        ncti([{"seli": 1.0, "ncc": 0.5}])
    with pytest.raises(ValueError, match="NaN or inf"):
        lp_fu([0.1, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="3 models but fu_scores has 2"):
        lp_fu([0.1, 0.2, 0.3], [1.0, 2.0])


def _good_input():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 20)
    return rng.normal(size=(40, 6)) + y[:, None], y


BAD_INPUTS = {
    "nan": (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), y),
            "NaN or inf"),
    "inf": (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 3, np.inf, X), y),
            "NaN or inf"),
    "single_class": (lambda X, y: (X, np.zeros_like(y)), "1 class"),
    "singleton_class": (lambda X, y: (X, np.where(np.arange(y.size) == 0, 2, y)),
                        r"class\(es\) \[2\] have fewer than 2 samples"),
    "labels_not_contiguous": (lambda X, y: (X, 2 * y), r"0\.\.C-1"),
    "mismatched_lengths": (lambda X, y: (X, y[:-1]), "39 entries but there are 40 samples"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
@pytest.mark.parametrize("metric", FEATURE_ENTRY_POINTS, ids=lambda f: f.__name__)
def test_bad_feature_input_raises(metric, problem):
    corrupt, message = BAD_INPUTS[problem]
    with pytest.raises(ValueError, match=message):
        metric(*corrupt(*_good_input()))


def test_bad_probability_input_raises():
    y = np.array([0, 1, 1, 0])
    theta = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="negative entries"):
        leep(np.log(theta), y)
    with pytest.raises(ValueError, match="sum to 1"):
        leep(2 * theta, y)
    with pytest.raises(ValueError, match="3 rows but there are 4 labels"):
        leep(theta[:3], y)
    with pytest.raises(ValueError, match="1 class"):
        leep_per_sample(theta, np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"0\.\.C-1"):
        leep(theta, np.array([0, 2, 2, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        nce([0, -1, 1, 0], y)
    with pytest.raises(ValueError, match="3 entries but there are 4 labels"):
        nce([0, 1, 1], y)


def test_bad_options_raise():
    X, y = _good_input()
    with pytest.raises(ValueError, match="algorithm must be"):
        logme(X, y, algorithm="newton")
    with pytest.raises(ValueError, match="gaussian must be"):
        gbc(X, y, gaussian="full")
    with pytest.raises(ValueError, match="eps must be positive"):
        transrate(X, y, eps=0.0)
    with pytest.raises(ValueError, match="n_dims must be >= 2"):
        parc(X, y, n_dims=1)
    with pytest.raises(ValueError, match="needs 50 components but there are only 40"):
        nleep(X, y, components_per_class=25)
    with pytest.raises(ValueError, match="n_neighbors=41"):
        lp_score(X, y, n_neighbors=41)
