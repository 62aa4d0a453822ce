"""Copy detection sees through flips, shifts and noise; distinct phantoms are not copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthct.data.dataset import load_cases
from synthct.eval.privacy import copy_scores, prepare_for_matching


@pytest.fixture(scope="module")
def demo_real(demo_sites, demo_config):
    train = load_cases(demo_sites, demo_config, splits=("train",))
    holdout = load_cases(demo_sites, demo_config, splits=("holdout",))
    return train, holdout


def _shift(x: torch.Tensor, dy: int, dz: int) -> torch.Tensor:
    """A true translation (edges replicated), not a circular roll."""
    pad = F.pad(x, (3, 3, 3, 3, 0, 0), mode="replicate")
    return pad[:, :, :, 3 + dy : 3 + dy + x.shape[3], 3 + dz : 3 + dz + x.shape[4]]


def test_disguised_copies_score_above_every_distinct_case(demo_real):
    train, holdout = demo_real
    g = torch.Generator().manual_seed(0)
    src = train.images[:16]
    copies = (_shift(src.flip(2), 3, -2) + 0.03 * torch.randn(src.shape, generator=g)).clamp(-1, 1)
    t = prepare_for_matching(train.images)
    found = copy_scores(prepare_for_matching(copies), t)
    distinct = copy_scores(prepare_for_matching(holdout.images), t)
    assert (found.index == np.arange(16)).all()
    assert found.score.min() > distinct.score.max()
    assert found.score.min() > 0.97 and distinct.score.max() < 0.98
