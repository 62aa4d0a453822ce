"""What a site computes for the gate (the pooled results are checked in test_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from synthct.eval.site_statistics import cubic_index, cubic_moment


def test_packed_third_moments_give_the_cubic_inner_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    _, mult = cubic_index(4)
    packed = float((cubic_moment(a) * mult) @ cubic_moment(b))
    assert packed == pytest.approx(float(((a @ b.T) ** 3).sum()), rel=1e-10)
