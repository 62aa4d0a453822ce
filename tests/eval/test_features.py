"""Radiomics features: a tissue that fades out of a volume moves its features continuously."""

from __future__ import annotations

import numpy as np
import torch

from synthct.eval.features import RADIOMICS_NAMES, radiomics_features


def _body(bone_voxels: int, bone_hu: float = 260.0) -> torch.Tensor:
    """A soft-tissue block (40 HU) with a lung cavity and ``bone_voxels`` bone voxels."""
    hu = np.full((16, 16, 16), -1000.0)
    hu[2:14, 2:14, 2:14] = 40.0
    hu[5:11, 5:11, 5:11] = -850.0
    flat = hu[2:4, 2:14, 2:14].reshape(-1)
    flat[:bone_voxels] = bone_hu
    hu[2:4, 2:14, 2:14] = flat.reshape(2, 12, 12)
    return torch.from_numpy(hu).float()[None, None]


def test_an_emptied_window_reports_its_fading_edge_not_its_centre():
    features = radiomics_features(torch.cat([_body(1), _body(0)]))
    bone_mean = RADIOMICS_NAMES.index("bone_mean")
    one_voxel, none = features[:, bone_mean]
    assert one_voxel == 260.0
    assert none == 250.0  # the bone window's edge nearest the body median (40 HU), not 875
    assert features[1, RADIOMICS_NAMES.index("bone_fraction")] == 0.0
    assert np.isfinite(features).all()
