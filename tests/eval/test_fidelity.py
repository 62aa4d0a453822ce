"""Pooled class-matched fidelity equals what one site holding every case computes."""

from __future__ import annotations

import numpy as np
import pytest

from synthct.eval import distribution as dist
from synthct.eval.fidelity import class_matched_fidelity, pool_kernel_sums
from synthct.eval.site_statistics import cubic_moment

K = 2  # classes


def _site_sums(train, train_y, hold, hold_y, syn):
    """What a site sends for one feature space (as ``site_statistics`` computes it)."""
    real = np.concatenate([train, hold])
    blocks = np.concatenate([train_y, hold_y + K])
    onehot = np.eye(2 * K)[blocks]
    gram = dist.poly_kernel(real, real)
    np.fill_diagonal(gram, 0.0)
    return {
        "f_n": onehot.sum(0),
        "f_s1": onehot.T @ real,
        "f_s2": np.einsum("nb,ni,nj->bij", onehot, real, real),
        "f_s3": np.stack([cubic_moment(real[onehot[:, b] > 0]) for b in range(2 * K)]),
        "f_block": onehot.T @ gram @ onehot,
        "f_cross": dist.poly_kernel(syn, real) @ onehot,
    }


def test_kid_pooled_over_sites_equals_kid_over_all_cases_with_classes_matched():
    rng = np.random.default_rng(0)
    d = 3
    syn = rng.normal(0.3, 1.0, size=(12, d))
    syn_y = np.repeat([0, 1], 6)  # balanced cohort
    sites = []
    for n_train, n_hold in ((10, 6), (7, 9), (4, 5)):
        sites.append(
            (
                rng.normal(size=(n_train, d)),
                rng.integers(0, K, n_train),
                rng.normal(size=(n_hold, d)),
                rng.integers(0, K, n_hold),
            )
        )
    replies = [_site_sums(*s, syn) for s in sites]
    value = class_matched_fidelity(pool_kernel_sums(replies, "f"), syn, syn_y, K, 20, 0)

    hold = np.concatenate([s[2] for s in sites])
    hold_y = np.concatenate([s[3] for s in sites])
    train = np.concatenate([s[0] for s in sites])
    train_y = np.concatenate([s[1] for s in sites])
    w_syn, w_hold = dist.class_matched_weights(syn_y, hold_y)
    assert value.value == pytest.approx(dist.weighted_kid(syn, w_syn, hold, w_hold), rel=1e-9)
    w_train, w_hold = dist.class_matched_weights(train_y, hold_y)
    assert value.baseline == pytest.approx(
        dist.weighted_kid(train, w_train, hold, w_hold), rel=1e-9
    )
    lo, hi = value.ci
    assert lo <= hi and np.isfinite(value.detail["fd"])
