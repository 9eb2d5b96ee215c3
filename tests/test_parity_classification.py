"""Parity of the classification-style metrics with the official reference implementations.

Every case of these metric families in ``../shared/reference/expected.json`` becomes one test,
compared with the case's ``suggested_tolerance`` (numpy ``isclose`` semantics).
"""

import json

import numpy as np
import pytest
from conftest import SHARED, _require
from scipy.special import softmax
from threadpoolctl import threadpool_limits

from nnunet_te.metrics.logme import logme
from nnunet_te.metrics.gbc import gbc
from nnunet_te.metrics.hscore import h_score, regularized_h_score
from nnunet_te.metrics.leep import leep, nce, nleep
from nnunet_te.metrics.lpfu import lp_score
from nnunet_te.metrics.ncti import ncti, ncti_components
from nnunet_te.metrics.parc import parc
from nnunet_te.metrics.sfda import sfda
from nnunet_te.metrics.transrate import transrate

REFERENCE = SHARED / "reference"
METRICS = {"leep", "nce", "nleep", "nleep_log", "logme", "h_score", "regularized_h_score",
           "transrate", "parc", "sfda", "ncti_components", "ncti_zoo", "gbc_spherical",
           "gbc_diagonal", "lp"}

# The NCA optimum of LP_Score is chaotic in the last bits of BLAS arithmetic: on this feature
# set the reference value (2 threads) is reproduced neither with 1 thread (0.77692, +7 votes)
# nor with 2 threads (0.76667, -7 votes), so no faithful reimplementation can match it.
LP_NOT_REPRODUCIBLE = {
    "cls_breastmnist__randconv2_gap::lp":
        "NCA (L-BFGS, 50 iterations) lands on a different optimum depending on BLAS rounding; "
        "5-NN votes flip (ours 0.776923 with 1 thread, 0.766667 with 2; reference 0.771795)",
}


def _params():
    path = REFERENCE / "expected.json"
    if not path.exists():
        # One placeholder case; the test skips it, or fails under CI=true (see conftest).
        return [pytest.param(None, id="missing-reference")]
    params = []
    for case in json.loads(path.read_text())["cases"]:
        if case["metric"] not in METRICS:
            continue
        marks = []
        if case["expected"] is None:
            marks.append(pytest.mark.skip(reason="the reference raised: " + case.get("notes", "")))
        elif case["case_id"] in LP_NOT_REPRODUCIBLE:
            marks.append(pytest.mark.xfail(reason=LP_NOT_REPRODUCIBLE[case["case_id"]],
                                           strict=False))
        params.append(pytest.param(case, id=case["case_id"], marks=marks))
    return params


@pytest.fixture(autouse=True)
def _single_blas_thread():
    # One BLAS thread: small matrices run several times faster, and the seeded optimisers
    # (GaussianMixture, NCA) follow one reproducible arithmetic path.
    with threadpool_limits(limits=1):
        yield


_arrays: dict = {}


def _load(name: str) -> dict:
    if name not in _arrays:
        with np.load(REFERENCE / name) as data:
            _arrays[name] = dict(data)
    return _arrays[name]


def _features(case: dict) -> tuple[np.ndarray, np.ndarray]:
    data = _load(case["files"][0])
    key = case["inputs"]["X"].split()[0]
    X = data[key].astype(np.float64)
    if "z-score" in case["inputs"]["X"]:
        std = X.std(axis=0)
        X = (X - X.mean(axis=0)) / np.where(std == 0, 1.0, std)
    y_source = case["inputs"]["y"]
    y = _load(y_source.split("from ")[1])["y"] if "from " in y_source else data["y"]
    return X, y


def _scalar(case: dict) -> float:
    metric, case_id = case["metric"], case["case_id"]
    if metric in ("leep", "nce"):
        data = _load(case["files"][0])
        if metric == "nce":
            return nce(data["src_argmax"], data["y"])
        from_logits = "logits" in str(case["inputs"])
        probs = softmax(data["logits"], axis=1) if from_logits else data["probs"]
        return leep(probs, data["y"])
    X, y = _features(case)
    if metric == "nleep":
        return nleep(X, y, random_state=0, log=False)
    if metric == "nleep_log":
        return nleep(X, y, random_state=42, log=True)
    if metric == "logme":
        return logme(X, y, algorithm="icml" if case_id.endswith("_tllib") else "fixed_point")
    if metric.startswith("gbc_"):
        return gbc(X, y, gaussian=metric.removeprefix("gbc_"))
    simple = {"h_score": h_score, "regularized_h_score": regularized_h_score,
              "transrate": transrate, "parc": parc, "sfda": sfda, "lp": lp_score}
    return simple[metric](X, y)


def _ncti_components_of(name: str) -> dict:
    with np.load(REFERENCE / name) as data:
        return ncti_components(data["X"].astype(np.float64), data["y"])


@pytest.mark.filterwarnings("ignore::nnunet_te.metrics._validation.DegenerateInputWarning")
@pytest.mark.parametrize("case", _params())
def test_matches_reference(case):
    if case is None:
        _require(REFERENCE / "expected.json")
    tol = case["suggested_tolerance"]
    expected = case["expected"]
    if case["metric"] == "ncti_components":
        got = _ncti_components_of(case["files"][0])
        for key in ("seli", "ncc", "vc"):
            assert np.isclose(got[key], expected[key], **tol), (key, got[key], expected[key])
    elif case["metric"] == "ncti_zoo":
        assert case["inputs"]["models"] == expected["models"]
        got = ncti([_ncti_components_of(name) for name in case["files"]])
        np.testing.assert_allclose(got, expected["scores"], **tol)
    else:
        got = _scalar(case)
        assert np.isclose(got, expected, **tol), (got, expected)
