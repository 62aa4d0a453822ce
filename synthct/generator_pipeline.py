"""A saved generator as one callable object, as diffusers serves a pipeline:

    pipe = SynthctPipeline.from_pretrained("runs/demo/generator")
    out = pipe(["nodule", "consolidation"], sites=["site_a", "site_a"], seed=0)
    out.volumes          # N x 1 x X x Y x Z in HU, on out.spacing_mm

Sampler, steps and guidance default to the generator's own ``inference.json``; a value given to
the call overrides it for that call only. Loading checks every file against its sha256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthct.checkpoint import Generator, generator_sha256, load_generator, save_generator
from synthct.config import SamplingConfig
from synthct.sampling import inference_settings, labels_to_indices, sample_volumes

__all__ = ["GeneratedVolumes", "SynthctPipeline"]


@dataclass(frozen=True)
class GeneratedVolumes:
    """What one call made: the volumes, what each was asked for, and how it was sampled."""

    volumes: torch.Tensor
    labels: list[str]
    sites: list[str | None]
    spacing_mm: tuple[float, float, float]
    inference: dict[str, Any]
    generator_sha256: str | None


class SynthctPipeline:
    """Class- (and site-) conditional CT volumes from one generator."""

    def __init__(self, generator: Generator, *, sha256: str | None = None) -> None:
        self.generator = generator
        self.sha256 = sha256

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: torch.device | str = "cpu"
    ) -> SynthctPipeline:
        """The generator saved in ``path`` (a generator folder), hash-checked."""
        return cls(load_generator(path, device), sha256=generator_sha256(path))

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the sampling part (autoencoder, EMA UNet, scheduler, inference defaults)."""
        path = save_generator(self.generator, path, sampling_only=True)
        self.sha256 = generator_sha256(path)
        return path

    @property
    def classes(self) -> list[str]:
        return list(self.generator.config.labels.classes)

    @property
    def sites(self) -> list[str]:
        """Sites whose style the generator can render (empty for a class-only generator)."""
        return list(self.generator.config.site_names) if self.generator.renders_sites else []

    @property
    def inference(self) -> SamplingConfig:
        """The generator's own inference defaults."""
        return self.generator.config.sampling

    def __call__(
        self,
        labels: Sequence[str],
        *,
        sites: Sequence[str | None] | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> GeneratedVolumes:
        """One volume per class name in ``labels`` (``sites``: the site each is for; None or
        ``pooled``: site-agnostic). The same seed and settings give the same volumes."""
        gen = self.generator
        indices = labels_to_indices(gen, list(labels))
        device = device or next(gen.ema.parameters()).device
        volumes = sample_volumes(
            gen,
            indices,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(int(seed)),
            device=device,
            sites=sites,
        )
        return GeneratedVolumes(
            volumes=volumes,
            labels=list(labels),
            sites=list(sites) if sites is not None else [None] * len(labels),
            spacing_mm=tuple(gen.config.data.spacing_mm),
            inference={
                **inference_settings(gen, sampler, steps, guidance),
                "guidance_interval": list(self.inference.guidance_interval),
                "seed": int(seed),
            },
            generator_sha256=self.sha256,
        )
