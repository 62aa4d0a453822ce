"""Within-class diversity: mean pairwise MS-SSIM (MONAI ``MultiScaleSSIMMetric``).

High pairwise MS-SSIM among one class's synthetic volumes, above what the real volumes of that
class show among themselves, is the signature of mode collapse. At 32³ the standard 11-voxel
kernel and 5 scales do not fit, so 3 scales of a 3-voxel kernel are used (the first three
standard weights, renormalised).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric

__all__ = ["pairwise_msssim"]

_WEIGHTS = np.array([0.0448, 0.2856, 0.3001])
_WEIGHTS = tuple(float(w) for w in _WEIGHTS / _WEIGHTS.sum())


def _metric(shape: tuple[int, ...]) -> MultiScaleSSIMMetric:
    scales = len(_WEIGHTS)
    kernel = 3
    if min(shape) <= (kernel - 1) * 2 ** (scales - 1):
        raise ValueError(f"volumes of shape {shape} are too small for {scales}-scale MS-SSIM")
    return MultiScaleSSIMMetric(
        spatial_dims=3, data_range=2.0, kernel_size=kernel, weights=_WEIGHTS
    )


@torch.no_grad()
def pairwise_msssim(images: torch.Tensor, *, max_pairs: int = 60, seed: int = 0) -> float:
    """Mean MS-SSIM over (at most ``max_pairs`` random) pairs of model-space volumes."""
    n = len(images)
    if n < 2:
        return float("nan")
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.choice(len(pairs), max_pairs, replace=False)]
    a = torch.stack([images[i] for i, _ in pairs]).float()
    b = torch.stack([images[j] for _, j in pairs]).float()
    # MS-SSIM is defined on non-negative intensities: shift [-1, 1] to [0, 2]
    values = _metric(tuple(images.shape[2:]))(a + 1.0, b + 1.0)
    return float(values.mean())
