"""Distribution metrics against closed forms and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from synthct.eval import distribution as dist


def test_frechet_distance_matches_scipy_sqrtm_and_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ np.diag([1, 2, 1, 0.5, 1, 1]) + 0.7
    ma, mb = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((ma - mb) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert dist.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert dist.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_is_unbiased_near_zero_and_grows_with_shift():
    rng = np.random.default_rng(1)
    same = [dist.kid(rng.normal(size=(60, 8)), rng.normal(size=(60, 8))) for _ in range(30)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-3
    shifted = dist.kid(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 1.0)
    assert shifted > 10 * max(np.std(same), 1e-3)


def test_uniform_weights_reproduce_unweighted_metrics():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(25, 4)), rng.normal(size=(35, 4)) + 0.3
    wx, wy = np.full(25, 1 / 25), np.full(35, 1 / 35)
    assert dist.weighted_kid(x, wx, y, wy) == pytest.approx(dist.kid(x, y), rel=1e-9)
    assert dist.weighted_frechet_distance(x, wx, y, wy) == pytest.approx(
        dist.frechet_distance(x, y), rel=1e-9
    )


def test_class_matched_weights_copy_the_real_class_mix():
    syn = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3])  # no class 0; class 3 absent from real
    real = np.array([0, 0, 0, 1, 2, 2, 2])
    ws, wr = dist.class_matched_weights(syn, real)
    assert ws.sum() == pytest.approx(1) and wr.sum() == pytest.approx(1)
    assert ws[syn == 1].sum() == pytest.approx(0.25) and ws[syn == 2].sum() == pytest.approx(0.75)
    assert (ws[syn == 3] == 0).all() and (wr[real == 0] == 0).all()


def test_prdc_extremes():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(50, 5))
    same = dist.prdc(real, real.copy())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = dist.prdc(real, rng.normal(size=(50, 5)) + 50)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0
    collapsed = dist.prdc(real, np.repeat(real[:1], 50, axis=0) + 1e-3)
    assert collapsed["coverage"] < 0.3 and collapsed["precision"] == 1.0


def test_bootstrap_interval_brackets_the_statistic():
    rng = np.random.default_rng(4)
    x = rng.normal(size=200)
    lo, hi = dist.bootstrap_ci(lambda i, _j: float(x[i].mean()), len(x), 1, rounds=300)
    assert lo < x.mean() < hi and hi - lo < 0.5
