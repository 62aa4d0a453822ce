"""From a scanner volume to model input and back: reorient, resample, ROI, crop/pad, window.

Model input is a float32 tensor ``1×X×Y×Z`` (RAS voxel order) on the configured spacing and
shape, HU window mapped to [-1, 1]. MONAI transforms do the geometry. They pad with zeros, so
geometry runs on ``HU + 1024``: zero padding then means air (-1024 HU), not water.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing, SpatialCrop
from scipy import ndimage

from synthct.config import DataConfig
from synthct.data.volume_io import Volume

__all__ = [
    "AIR_SHIFT",
    "PreparedVolume",
    "prepare_volume",
    "hu_to_model",
    "model_to_hu",
    "lung_roi_centre",
]

AIR_SHIFT = 1024.0


@dataclass(frozen=True)
class PreparedVolume:
    """Model-ready volume plus what is needed to trace it back to its file."""

    image: torch.Tensor  # 1×X×Y×Z in [-1, 1]
    original_spacing: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    source: str


def hu_to_model(hu: torch.Tensor | np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """Map HU to [-1, 1] over ``window`` (clipped)."""
    lo, hi = window
    t = torch.as_tensor(hu, dtype=torch.float32)
    return ((t.clamp(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).contiguous()


def model_to_hu(x: torch.Tensor | np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """Inverse of :func:`hu_to_model` on [-1, 1] (values outside are clipped first)."""
    lo, hi = window
    t = torch.as_tensor(x, dtype=torch.float32).clamp(-1.0, 1.0)
    return (t + 1.0) / 2.0 * (hi - lo) + lo


def lung_roi_centre(shifted: np.ndarray) -> tuple[int, int, int] | None:
    """Centre voxel of the lungs' bounding box: air-like voxels (< -400 HU) not connected to
    the volume border (which is the air around the patient). ``shifted`` is HU + 1024."""
    air = shifted < (AIR_SHIFT - 400.0)
    labels, n = ndimage.label(air)
    if n == 0:
        return None
    border = np.unique(
        np.concatenate(
            [labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]
        )
    )
    inner = air & ~np.isin(labels, border)
    if inner.sum() < 8:
        return None
    idx = np.argwhere(inner)
    lo, hi = idx.min(0), idx.max(0)
    return tuple(int(v) for v in (lo + hi) // 2)


def prepare_volume(volume: Volume, data: DataConfig) -> PreparedVolume:
    """Reorient to RAS, resample to ``data.spacing_mm``, crop/pad to ``data.shape`` (centred on
    the lungs when ``data.roi == 'lung'``), and window to [-1, 1]."""
    shifted = MetaTensor(
        torch.as_tensor(volume.hu + AIR_SHIFT, dtype=torch.float32)[None],
        affine=torch.as_tensor(volume.affine, dtype=torch.float64),
    )
    shifted = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(shifted)
    shifted = Spacing(pixdim=data.spacing_mm, mode="bilinear", padding_mode="zeros")(shifted)
    array = shifted.as_tensor()
    if data.roi == "lung":
        centre = lung_roi_centre(array[0].numpy())
        if centre is not None:
            array = SpatialCrop(roi_center=centre, roi_size=data.shape)(array)
            array = torch.as_tensor(array)
    array = ResizeWithPadOrCrop(spatial_size=data.shape, mode="constant", value=0.0)(array)
    if isinstance(array, MetaTensor):  # plain tensors downstream: no metadata overhead
        array = array.as_tensor()
    hu = torch.as_tensor(array).float() - AIR_SHIFT
    return PreparedVolume(
        image=hu_to_model(hu, data.hu_window),
        original_spacing=volume.spacing,
        original_shape=tuple(int(s) for s in volume.hu.shape),
        source=volume.source,
    )
