"""Each site's scanner noise, measured where the autoencoder cannot reproduce it, put back into
the volumes made for that site.

An autoencoder reconstructs anatomy and lesions but not the scanner's quantum noise: its
reconstructions are smooth, and so are the samples decoded from the diffusion model's latents
(``bench/autoencoder_ceiling.py``: reconstructions of real scans fail the gate's radiomics rule
until the noise is added back, then pass every rule). The field's noise-insertion tools model CT
noise by its noise power spectrum (NPS): stationary Gaussian noise whose power per spatial
frequency is that of the scanner. Here each site measures the NPS of its ``train`` scans minus
their reconstructions (over uniform soft tissue, where the scanner's noise is all that differs)
and sends only that spectrum, a mean over its cases, never a volume; sampling adds noise drawn
from the target site's spectrum (a site-agnostic case, or a site the generator never saw, gets
the case-weighted mean of all sites').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "SOFT_TISSUE_HU",
    "NoisePower",
    "ScannerNoise",
    "noise_power",
    "soft_tissue",
]

SOFT_TISSUE_HU = (-200.0, 250.0)  # fat to enhanced soft tissue: no air or bone edges


def soft_tissue(hu: torch.Tensor) -> torch.Tensor:
    """Uniform soft tissue of N×1×X×Y×Z HU volumes, eroded by one voxel (no tissue edges)."""
    lo, hi = SOFT_TISSUE_HU
    inside = ((hu > lo) & (hu < hi)).cpu().numpy()
    structure = ndimage.generate_binary_structure(3, 1)[None, None]
    return torch.from_numpy(ndimage.binary_erosion(inside, structure=structure))


@dataclass(frozen=True)
class NoisePower:
    """A site's summed per-case periodograms (float64, X×Y×(Z//2+1)) and how many cases: sums
    pool exactly across batches and sites."""

    total: torch.Tensor
    cases: int

    def __add__(self, other: NoisePower) -> NoisePower:
        return NoisePower(self.total + other.total, self.cases + other.cases)


def noise_power(scans_hu: torch.Tensor, reconstructions_hu: torch.Tensor) -> NoisePower:
    """Periodograms of ``scans - reconstructions`` over the soft tissue of both (each case's
    residual centred there and zero elsewhere, its power divided by its voxel count)."""
    if scans_hu.shape != reconstructions_hu.shape or scans_hu.dim() != 5:
        raise ValueError(
            f"scans {tuple(scans_hu.shape)} and reconstructions "
            f"{tuple(reconstructions_hu.shape)} must be the same N×1×X×Y×Z"
        )
    mask = (soft_tissue(scans_hu) & soft_tissue(reconstructions_hu)).double()
    r = (scans_hu - reconstructions_hu).double().cpu()
    voxels = mask.sum(dim=(2, 3, 4), keepdim=True)
    count = voxels.clamp_min(1.0)
    r = (r - (r * mask).sum(dim=(2, 3, 4), keepdim=True) / count) * mask
    power = torch.fft.rfftn(r, dim=(2, 3, 4)).abs().pow(2) / count
    measured = int((voxels.flatten() > 0).sum())  # a case without soft tissue adds nothing
    return NoisePower(power.sum(dim=(0, 1)), measured)


@dataclass
class ScannerNoise:
    """Per site, the mean noise power spectrum of its scans (HU², rfft layout of the volume)."""

    spectra: dict[str, torch.Tensor]
    cases: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.spectra:
            raise ValueError("scanner noise without any site's spectrum")
        shapes = {tuple(s.shape) for s in self.spectra.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"scanner noise spectra of different or non-3D shapes: {shapes}")
        for site, s in self.spectra.items():
            if not s.is_floating_point() or not torch.isfinite(s).all() or (s < 0).any():
                raise ValueError(f"scanner noise of site {site!r}: negative or non-finite power")
        for site, n in self.cases.items():
            if site not in self.spectra or not isinstance(n, int) or n < 1:
                raise ValueError(f"scanner noise: {n!r} cases for site {site!r}")

    @classmethod
    def from_power(cls, power: Mapping[str, NoisePower]) -> ScannerNoise:
        """Each site's mean periodogram from its pooled sums (sites without cases left out)."""
        kept = {site: p for site, p in power.items() if p.cases > 0}
        return cls(
            {site: (p.total / p.cases).float() for site, p in kept.items()},
            {site: p.cases for site, p in kept.items()},
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.spectra.values())).shape)  # type: ignore[return-value]

    def pooled(self) -> torch.Tensor:
        """The case-weighted mean spectrum of all sites: for site-agnostic cases."""
        weights = {s: float(self.cases.get(s, 1)) for s in self.spectra}  # unrecorded: 1
        total = sum(weights.values())
        return sum(self.spectra[s].double() * (w / total) for s, w in weights.items()).float()

    def spectrum(self, site: str | None) -> torch.Tensor:
        """The site's spectrum; the pooled one for None, ``pooled`` or a site it never saw."""
        return self.spectra[site] if site in self.spectra else self.pooled()

    def draw(
        self, sites: Sequence[str | None], volume: Sequence[int], generator: torch.Generator
    ) -> torch.Tensor:
        """N×1×X×Y×Z Gaussian noise (HU), each volume with its site's power spectrum."""
        volume = tuple(int(v) for v in volume)
        expected = (*volume[:2], volume[2] // 2 + 1)
        if self.shape != expected:
            raise ValueError(
                f"scanner noise was measured on {self.shape} spectra; volumes {volume} need "
                f"{expected}"
            )
        out = []
        for site in sites:
            white = torch.randn(volume, generator=generator, dtype=torch.float64)
            amplitude = self.spectrum(site).double().sqrt()
            out.append(torch.fft.irfftn(torch.fft.rfftn(white) * amplitude, s=volume).float())
        return torch.stack(out)[:, None]

    def noise_std(self) -> dict[str, float]:
        """Per site, the noise standard deviation (HU) its spectrum implies (Parseval; the
        volume's last axis is even, as every configured shape is): a readable summary."""
        n = float(np.prod([*self.shape[:2], (self.shape[2] - 1) * 2]))
        out = {}
        for site, s in self.spectra.items():
            full = s.double().clone()
            full[..., 1:-1] *= 2  # rfft holds the conjugate half once
            out[site] = float((full.sum() / n).sqrt())
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Safetensors content: one ``spectrum.<site>`` tensor per site."""
        return {f"spectrum.{site}": s.contiguous() for site, s in self.spectra.items()}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], cases: Mapping[str, int]
    ) -> ScannerNoise:
        """The spectra of a saved file and the case counts recorded beside it."""
        prefix = "spectrum."
        unknown = [k for k in tensors if not k.startswith(prefix)]
        if unknown:
            raise ValueError(f"unexpected tensors {unknown}")
        if not isinstance(cases, Mapping):
            raise ValueError(f"case counts {cases!r} are not a site -> count table")
        spectra = {k[len(prefix) :]: v for k, v in tensors.items()}
        return cls(spectra, dict(cases))
