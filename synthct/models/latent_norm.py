"""The latent space the diffusion UNet learns in: ``(z - shift) * scale``.

``global`` (LDM, MONAI's tutorials): one scale, ``1 / std`` of all latent values, no shift.
``per_channel`` (EDM2, Karras et al. 2024): each channel's own mean and ``1 / std``. An
autoencoder whose channels differ in spread (the shipped phantom one: channel stds 0.07-0.97)
leaves its small channels below the noise at all but the lowest noise levels under one global
scale; per channel, every channel reaches unit variance and the UNet sees all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LatentNorm", "fit_latent_norm", "latent_moments", "pooled_latent_norm"]


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel (or one global) shift and scale; one value broadcasts over every channel."""

    shift: tuple[float, ...] = (0.0,)
    scale: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if len(self.shift) != len(self.scale) and len(self.shift) != 1:
            raise ValueError(f"latent shift {self.shift} and scale {self.scale} do not match")
        if not all(s > 0 and s < float("inf") for s in self.scale):
            raise ValueError(f"latent scale {self.scale} must be positive and finite")

    @property
    def mode(self) -> str:
        return "per_channel" if len(self.scale) > 1 else "global"

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(
            1, -1, *([1] * (z.dim() - 2))
        )

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latents -> the UNet's (normalised) space."""
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def undo(self, z: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> latents the decoder reads."""
        return z / self._view(self.scale, z) + self._view(self.shift, z)

    def to_json(self) -> dict[str, list[float]]:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentNorm:
        return cls(tuple(float(v) for v in data["shift"]), tuple(float(v) for v in data["scale"]))


def latent_moments(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per channel: count, sum and sum of squares (float64), which pool exactly across sites."""
    z = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)
    return {
        "count": [float(z.shape[1])] * z.shape[0],
        "sum": z.sum(1).tolist(),
        "sumsq": (z * z).sum(1).tolist(),
    }


def pooled_latent_norm(moments: Sequence[dict[str, Sequence[float]]], mode: str) -> LatentNorm:
    """The normalisation of all sites' latents together, exactly, from their moments."""
    count = torch.tensor([m["count"] for m in moments], dtype=torch.float64).sum(0)
    total = torch.tensor([m["sum"] for m in moments], dtype=torch.float64).sum(0)
    sumsq = torch.tensor([m["sumsq"] for m in moments], dtype=torch.float64).sum(0)
    if mode == "global":
        count, total, sumsq = (
            count.sum(0, keepdim=True),
            total.sum(0, keepdim=True),
            sumsq.sum(0, keepdim=True),
        )
    if float(count.min()) < 2:
        raise ValueError("latent normalisation: fewer than two latent values reported")
    mean = total / count
    var = ((sumsq / count - mean * mean) * count / (count - 1)).clamp_min(0.0)
    scale = 1.0 / var.sqrt().clamp_min(1e-6)
    shift = mean if mode == "per_channel" else torch.zeros(1, dtype=torch.float64)
    return LatentNorm(tuple(shift.tolist()), tuple(scale.tolist()))


def fit_latent_norm(latents: torch.Tensor, mode: str) -> LatentNorm:
    """:func:`pooled_latent_norm` of one set of latents (N×C×x×y×z)."""
    return pooled_latent_norm([latent_moments(latents)], mode)
