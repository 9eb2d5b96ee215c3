"""Properties of the segmentation metrics: exact MSTs, invariances, analytic cases, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import cdist

from nnunet_te.metrics._graph import full_quantile, mst_edges, pairwise_distances
from nnunet_te.metrics.ccfv import ccfv
from nnunet_te.metrics.consistency import adapted_rand_error, effective_invariance
from nnunet_te.metrics.topology import FusionGate, fit_gate, fuse, grtd, lbtc

FAST = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
grtd_options = st.fixed_dictionaries({
    "label_graph": st.sampled_from(["preserve", "max", "min", "constant"]),
    "form": st.sampled_from(["divergence", "rtd_lite"]),
})


def _is_spanning_tree(edges, n):
    parent = list(range(n))

    def root(v):
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for u, v in edges:
        ru, rv = root(u), root(v)
        if ru == rv:
            return False
        parent[ru] = rv
    return len(edges) == n - 1


def _points(seed, n, d=5, n_classes=2):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.arange(n) % n_classes
    return X, rng.permutation(y)


# --- exact MST ---------------------------------------------------------------------------------

@FAST
@given(seed=seeds, n=st.integers(2, 40))
def test_mst_matches_scipy_on_positive_distances(seed, n):
    X = np.random.default_rng(seed).normal(size=(n, 3))
    dist = cdist(X, X)
    edges, weights = mst_edges(dist)
    assert edges.shape == (n - 1, 2) and weights.shape == (n - 1,)
    assert _is_spanning_tree(edges, n)
    np.testing.assert_array_equal(weights, dist[edges[:, 0], edges[:, 1]])
    assert weights.sum() == pytest.approx(minimum_spanning_tree(dist).sum(), rel=1e-12)


def test_mst_keeps_zero_weight_edges_that_scipy_drops():
    y = np.repeat([0, 1, 2], 4)
    dist = 2.5 * (y[:, None] != y[None, :])
    edges, weights = mst_edges(dist)
    assert _is_spanning_tree(edges, y.size)
    assert weights.sum() == 5.0  # two inter-class steps of 2.5; nine zero edges inside classes
    assert np.count_nonzero(weights == 0) == 9
    # scipy reads the zeros as missing edges and has to connect each vertex by a 2.5 edge.
    assert minimum_spanning_tree(dist).sum() == pytest.approx(2.5 * 11)


def test_pairwise_distances_and_quantile():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(700, 16)) + 1e3  # large offset: the centring keeps the Gram exact
    D = pairwise_distances(X)
    np.testing.assert_allclose(D, cdist(X, X), rtol=0, atol=1e-9)
    assert np.all(np.diag(D) == 0)
    for q in (0.0, 0.5, 0.9, 1.0):
        assert full_quantile(D, q) == pytest.approx(np.quantile(D, q), rel=1e-14)


# --- GRTD ----------------------------------------------------------------------------------------

@FAST
@given(seed=seeds, n=st.integers(6, 40), options=grtd_options)
def test_grtd_permutation_scale_translation_invariant(seed, n, options):
    X, y = _points(seed, n)
    base = grtd(X, y, **options)
    assert base >= 0
    order = np.random.default_rng(seed + 1).permutation(n)
    assert grtd(X[order], y[order], **options) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert grtd(7.5 * X, y, **options) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert grtd(X - 3.0, y, **options) == pytest.approx(base, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("label_graph, form, expected", [
    ("preserve", "divergence", 1.0), ("preserve", "rtd_lite", 0.5),
    ("max", "divergence", 1.0), ("constant", "divergence", 1.0), ("min", "divergence", 0.0),
    ("max", "rtd_lite", 0.5),
])
def test_grtd_identical_features(label_graph, form, expected):
    # All distances 0: A = 0; B has one inter-class step of lam = 1 (0 for 'min'); C = 0.
    n = 10
    X = np.ones((n, 4))
    y = np.arange(n) % 2
    assert grtd(X, y, label_graph=label_graph, form=form) == pytest.approx(expected / (n - 1))


LABEL_SENSITIVE = [("preserve", "divergence"), ("min", "divergence"), ("max", "rtd_lite"), ("min", "rtd_lite"),
                   ("constant", "rtd_lite")]


@FAST
@given(seed=seeds, option=st.sampled_from(LABEL_SENSITIVE))
def test_grtd_separated_clusters_beat_shuffled_labels(seed, option):
    label_graph, form = option
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 8)) + 6.0 * np.eye(8)[y]
    shuffled = rng.permutation(y)
    assert (grtd(X, y, label_graph=label_graph, form=form)
            < grtd(X, shuffled, label_graph=label_graph, form=form))


@FAST
@given(seed=seeds)
def test_grtd_divergence_ignores_labels_for_constant_and_usually_max(seed):
    # Documented flaw: W(MST(B)) = (C - 1) * lam for 'constant' whatever the labels, and for
    # 'max' whenever every class pair has some distance below lam (here: overlapping classes).
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, 4))
    y = np.arange(40) % 2
    shuffled = rng.permutation(y)
    for label_graph in ("constant", "max"):
        assert grtd(X, y, label_graph=label_graph) == pytest.approx(
            grtd(X, shuffled, label_graph=label_graph), rel=1e-12)


def test_default_grtd_sees_the_labels_of_real_features(reference_dir):
    # On every real EPFL feature set of the reference folder, true labels give a lower (better)
    # default GRTD than shuffled ones; the collapsing readings cannot tell them apart.
    for path in sorted(reference_dir.glob("seg_*.npz")):
        data = np.load(path)
        X, y = data["X"].astype(np.float64), data["y"]
        shuffled = np.random.default_rng(0).permutation(y)
        assert grtd(X, y) < 0.7 * grtd(X, shuffled), path.name
        assert grtd(X, y, label_graph="max") == pytest.approx(
            grtd(X, shuffled, label_graph="max"), rel=1e-2), path.name


# --- LBTC ----------------------------------------------------------------------------------------

def _patches(seed, n_patches, P, d=6):
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n_patches, P, d))
    Y = rng.integers(0, 3, size=(n_patches, P))
    Y[0, :3] = [0, 1, 2]
    return F, Y


@FAST
@given(seed=seeds, n_patches=st.integers(1, 12), P=st.integers(2, 30), excess=st.booleans())
def test_lbtc_invariances(seed, n_patches, P, excess):
    F, Y = _patches(seed, n_patches, max(P, 3))
    base = lbtc(F, Y, excess=excess)
    assert 0 <= base <= 1
    rng = np.random.default_rng(seed + 1)
    patch_order = rng.permutation(F.shape[0])
    point_order = rng.permutation(F.shape[1])
    assert lbtc(F[patch_order], Y[patch_order], excess=excess) == pytest.approx(base)
    assert lbtc(F[:, point_order], Y[:, point_order], excess=excess) == pytest.approx(base)
    assert lbtc(0.01 * F, Y, excess=excess) == pytest.approx(base)
    assert lbtc(F + 100.0, Y, excess=excess) == pytest.approx(base)


def test_lbtc_separated_classes():
    rng = np.random.default_rng(0)
    P = 49
    Y = np.tile(np.arange(P) % 2, (5, 1))
    F = rng.normal(size=(5, P, 8)) * 0.1 + 10.0 * Y[:, :, None]
    assert lbtc(F, Y, excess=True) == 1.0
    assert lbtc(F, Y) == pytest.approx(1.0 - 1.0 / (P - 1))  # one unavoidable crossing edge


def test_lbtc_single_class_patch_has_no_leakage():
    F = np.random.default_rng(1).normal(size=(2, 25, 4))
    Y = np.stack([np.zeros(25, int), np.ones(25, int)])
    assert lbtc(F, Y) == 1.0


def test_lbtc_counts_leakage():
    # Points on a line alternating 0,1,0,1: the MST is the path, every edge crosses.
    F = np.arange(4.0)[None, :, None]
    Y = np.array([[0, 1, 0, 1]])
    assert lbtc(F, Y) == pytest.approx(0.0)
    assert lbtc(F, Y, excess=True) == pytest.approx(1.0 - 2.0 / 3.0)


# --- CCFV ----------------------------------------------------------------------------------------

def _ccfv_stages(seed, n_images=4, n_stages=2):
    rng = np.random.default_rng(seed)
    stages = []
    for d in (3, 5)[:n_stages]:
        groups = np.repeat(np.arange(n_images), 30)
        labels = np.tile(np.repeat([0, 1, 2], 10), n_images)
        features = rng.normal(size=(groups.size, d)) + labels[:, None] + 0.3 * groups[:, None]
        stages.append((features, labels, groups))
    return stages


@FAST
@given(seed=seeds, mode=st.sampled_from(["paper", "reference"]))
def test_ccfv_image_order_invariant(seed, mode):
    stages = _ccfv_stages(seed)
    base = ccfv(*[list(s) for s in zip(*stages)], mode=mode)
    assert np.isfinite(base)
    rng = np.random.default_rng(seed + 1)
    relabel = rng.permutation(4)
    permuted = []
    for X, y, g in stages:
        rows = rng.permutation(y.size)
        permuted.append((X[rows], y[rows], relabel[g][rows]))
    assert ccfv(*[list(s) for s in zip(*permuted)], mode=mode) == pytest.approx(base, rel=1e-9)


def test_ccfv_paper_skips_absent_class_and_scale_dependence():
    X, y, g = _ccfv_stages(0, n_stages=1)[0]
    keep = ~((g == 0) & (y == 2))  # class 2 missing from image 0
    value = ccfv([X[keep]], [y[keep]], [g[keep]], mode="paper")
    assert np.isfinite(value)
    with pytest.raises(ValueError, match="class 2 has 0 in image 0"):
        ccfv([X[keep]], [y[keep]], [g[keep]], mode="reference")
    # Documented weakness: scaling all features by c shifts the score by about -2 log c
    # (exactly, but for the 1e-3 in the variety and the ridge).
    scaled = ccfv([10.0 * X], [y], [g], mode="paper", ridge=0.0)
    assert scaled == pytest.approx(ccfv([X], [y], [g], mode="paper", ridge=0.0)
                                   - 2 * np.log(10.0), abs=1e-2)


# --- fusion --------------------------------------------------------------------------------------

def test_fuse_all_equal_and_direction():
    assert np.all(fuse([0.3, 0.3, 0.3], [0.8, 0.8, 0.8], 2) == 0.5)
    # Lowest GRTD and highest LBTC -> best fused score, whatever the gate.
    scores = fuse([0.1, 0.5, 0.9], [0.9, 0.5, 0.1], 4)
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.0])
    # k0 = 2, alpha = 1: gamma(2) = 0.5 weighs both terms equally.
    np.testing.assert_allclose(fuse([0.0, 1.0], [0.0, 1.0], 2), [0.5, 0.5])


def test_gate_monotone_in_number_of_classes():
    gammas = [FusionGate().gamma(k) for k in range(1, 12)]
    assert np.all(np.diff(gammas) > 0)
    assert FusionGate().gamma(2) == 0.5


def test_fusion_gate_recovers_synthetic_gate():
    rng = np.random.default_rng(0)
    pilot = []
    for k_cls in (1, 1, 2, 5, 6, 8):
        truth = rng.normal(size=8)
        noise = rng.normal(size=8)
        # Few classes: LBTC carries the truth; many classes: (negated) GRTD does.
        if k_cls <= 2:
            pilot.append((noise, truth, k_cls, truth))
        else:
            pilot.append((-truth, noise, k_cls, truth))
    gate = FusionGate().fit(pilot)
    assert gate.pilot_score_ > 0.9
    assert gate.gamma(1) < 0.2 and gate.gamma(2) < 0.2 and gate.gamma(5) > 0.8
    same = fit_gate([p[:3] for p in pilot], [p[3] for p in pilot])
    assert (same.alpha_, same.k0_) == (gate.alpha_, gate.k0_)
    np.testing.assert_allclose(gate.score_zoo(*pilot[0][:3]),
                               fuse(*pilot[0][:3], alpha=gate.alpha_, k0=gate.k0_))


# --- consistency ---------------------------------------------------------------------------------

def test_effective_invariance_hand_computed():
    p0 = np.array([[[0.9, 0.2], [0.1, 0.6]]], dtype=np.float32)
    p1 = np.array([[[0.8, 0.7], [0.1, 0.3]]], dtype=np.float32)
    # mask: (0,0), (0,1), (1,1); EI: sqrt(.9*.8), 0 (labels differ), 0 (labels differ)
    result = effective_invariance(p0, p1)
    assert result["per_patch"][0] == pytest.approx(np.sqrt(0.72) / 3, rel=1e-6)
    assert result["mask_fraction"] == 0.75
    empty = effective_invariance(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    assert np.isnan(empty["score"]) and empty["mask_fraction"] == 0.0


def test_adapted_rand_error_identical_and_split():
    a = np.zeros((1, 12, 12), dtype=np.int64)
    a[0, 2:6, 2:10] = 1
    a[0, 7:11, 2:10] = 2
    assert adapted_rand_error(a, a)["score"] == pytest.approx(1.0)
    merged = np.where(a > 0, 1, 0)
    assert adapted_rand_error(a, merged)["score"] < 1.0


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    X, y = _points(0, 20)
    F, Y = _patches(0, 3, 9)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        grtd(bad, y)
    with pytest.raises(ValueError, match="class"):
        grtd(X, np.zeros(20, int))
    with pytest.raises(ValueError, match="19 entries but there are 20 samples"):
        grtd(X, y[:-1])
    with pytest.raises(ValueError, match="0..C-1"):
        grtd(X, 2 * y)
    with pytest.raises(ValueError, match="label_graph"):
        grtd(X, y, label_graph="mean")
    F_bad = F.copy()
    F_bad[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        lbtc(F_bad, Y)
    with pytest.raises(ValueError, match="patch_labels has shape"):
        lbtc(F, Y[:, :-1])
    with pytest.raises(ValueError, match="1 class"):
        lbtc(F, np.zeros_like(Y))
    with pytest.raises(ValueError, match="0..C-1"):
        lbtc(F, Y + 1)
    with pytest.raises(ValueError, match="same stages"):
        ccfv([X], [y, y], [y])
    with pytest.raises(ValueError, match="groups has 19 entries"):
        ccfv([X], [y], [np.arange(19) % 2])
    with pytest.raises(ValueError, match="zoo-relative"):
        fuse([0.1], [0.2], 2)
    with pytest.raises(ValueError, match="but p_perturbed has"):
        effective_invariance(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        effective_invariance(np.full((1, 2, 2), 1.5), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="negative"):
        mst_edges(-np.ones((3, 3)))


def test_grtd_subsamples_to_its_cap():
    from nnunet_te.metrics._linalg import capped_rows

    rng = np.random.default_rng(9)
    y = np.arange(300) % 3
    X = rng.normal(size=(300, 5)) + y[:, None]
    rows = capped_rows(y, 100, 4)
    assert grtd(X, y, max_points=100, random_state=4) == grtd(X[rows], y[rows], max_points=None)
    assert grtd(X, y) == grtd(X, y, max_points=None)
    with pytest.raises(ValueError, match="cannot keep 2 samples"):
        grtd(X, y, max_points=5)
