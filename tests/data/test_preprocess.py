from __future__ import annotations

import numpy as np
import pytest
import torch

from synthct.data.preprocess import hu_to_model, lung_roi_centre, model_to_hu, prepare_volume
from synthct.data.volume_io import Volume, orientation_affine


def test_window_round_trip():
    hu = torch.tensor([-1024.0, -500.0, 0.0, 1024.0])
    x = hu_to_model(hu, (-1024, 1024))
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(model_to_hu(x, (-1024, 1024)), hu)
    assert hu_to_model(torch.tensor([3000.0]), (-1024, 1024)).item() == 1.0


def test_resample_pads_with_air_and_records_spacing(smoke_config):
    hu = np.zeros((8, 8, 8), np.float32)  # water cube, 2 mm voxels: tiny in the 16^3 model grid
    volume = Volume(hu, orientation_affine(hu.shape, (2.0, 2.0, 2.0), "RAS"), "cube")
    prepared = prepare_volume(volume, smoke_config.data)
    assert prepared.image.shape == (1, 16, 16, 16)
    out = model_to_hu(prepared.image, smoke_config.data.hu_window)
    assert out[0, 0, 0, 0].item() == pytest.approx(-1024.0)  # padding is air, not water
    assert prepared.original_spacing == pytest.approx((2.0, 2.0, 2.0))


def test_lung_roi_centre_finds_enclosed_air():
    shifted = np.zeros((20, 20, 20), np.float32)  # all air (HU+1024 = 0)
    shifted[2:18, 2:18, 2:18] = 1064.0  # body
    shifted[10:14, 4:8, 6:16] = 150.0  # a lung pocket
    assert lung_roi_centre(shifted) == (11, 5, 10)
