"""Class-conditional sampling with classifier-free guidance, the loop written out.

    z_T ~ N(0, I)
    for t in scheduler.timesteps:
        out = uncond + g * (cond - uncond)      # both branches in one doubled batch
        z = scheduler.step(out, t, z).prev_sample
    x = decode(undo_norm(z))                     # -> HU

Guidance ``g = 1`` runs the conditional branch only; ``g = 0`` the unconditional one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from synthct.checkpoint import Generator
from synthct.config import SynthctConfig
from synthct.data.preprocess import model_to_hu
from synthct.models.conditioning import Conditioning
from synthct.models.scanner_noise import NoisePower, noise_power
from synthct.models.schedulers import sampling_scheduler, set_timesteps

__all__ = [
    "sample_latents",
    "decode_latents",
    "reconstruct",
    "site_noise_power",
    "measures_scanner_noise",
    "sample_volumes",
    "class_scales",
    "inference_settings",
    "labels_to_indices",
    "sites_to_indices",
]

logger = logging.getLogger(__name__)

# A denoiser maps (z_t, t, class_labels, requested) -> model output. ``requested`` is the class
# each row is sampled for (for a null-class row, the class of the sample it guides), so a
# Mixture of plugins can route both guidance branches of a sample the same way.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sites_to_indices(gen: Generator, sites: Sequence[str | None]) -> torch.Tensor | None:
    """Site names -> the UNet's site indices (None for a class-only UNet); None or ``pooled``
    = the null site; a site unknown to the UNet or the site-styled decoder is an error listing
    the known ones, except a late site with a plugin decoder (``gen.site_decoders``): the UNet
    draws its cases site-agnostic and its own decoder renders its style."""
    base = [None if s in gen.site_decoders else s for s in sites]
    if gen.site_style is not None:
        gen.site_style.indices(base)
    indices = gen.conditioning.site_indices(base)  # every other site must be known
    if indices is None or not gen.site_decoders:
        return indices
    return gen.conditioning.site_indices(sites, unknown_as_null=True)


def labels_to_indices(gen: Generator, labels: Sequence[str]) -> torch.Tensor:
    """Vocabulary names -> indices; an unknown class is an error naming it."""
    out = []
    for name in labels:
        if name not in gen.config.labels.classes:
            raise ValueError(
                f"unknown class {name!r}; this generator knows {gen.config.labels.classes}"
            )
        out.append(gen.config.labels.classes.index(name))
    return torch.tensor(out, dtype=torch.long)


def _unet_denoiser(unet: nn.Module) -> Denoiser:
    return lambda z, t, c, _requested: unet(z, t, class_labels=c)


@torch.no_grad()
def sample_latents(
    denoiser: Denoiser,
    scheduler,
    class_labels: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    conditioning: Conditioning,
    guidance: float | torch.Tensor,
    steps: int,
    generator: torch.Generator,
    device: torch.device,
    sites: torch.Tensor | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    site_guidance: bool = False,
) -> torch.Tensor:
    """Run the reverse process for ``len(class_labels)`` latents (scaled space). ``sites``
    (site-conditioned UNets) stay on in both guidance branches, so guidance amplifies the
    class only; with ``site_guidance`` the unconditional branch drops the site too and
    guidance amplifies both. ``guidance``: one scale, or one per latent (per-class guidance).
    Guidance applies where ``t / T`` lies in ``guidance_interval``; other steps take the
    conditional prediction alone."""
    n = len(class_labels)
    set_timesteps(scheduler, steps, device)
    z = torch.randn((n, *latent_shape), generator=generator).to(device) * scheduler.init_noise_sigma
    requested = class_labels.to(device)
    cond = conditioning.encode(requested, sites)
    null = conditioning.encode(
        torch.full_like(requested, conditioning.null_class),
        None if site_guidance and sites is not None else sites,
    )
    low, high = guidance_interval
    train_steps = scheduler.config.num_train_timesteps
    scales = torch.as_tensor(guidance, dtype=torch.float32).expand(n).to(device)
    scales = scales.view(n, *[1] * len(latent_shape))
    for t in scheduler.timesteps:
        z_in = scheduler.scale_model_input(z, t)
        scale = scales if low <= float(t) / train_steps <= high else torch.ones_like(scales)
        if bool((scale == 1.0).all()):
            out = denoiser(z_in, t.expand(n), cond, requested)
        elif bool((scale == 0.0).all()):
            out = denoiser(z_in, t.expand(n), null, requested)
        else:
            both = denoiser(
                torch.cat([z_in, z_in]),
                t.expand(2 * n),
                torch.cat([cond, null]),
                torch.cat([requested, requested]),
            )
            out_cond, out_uncond = both.chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
        z = scheduler.step(out, t, z, generator=generator).prev_sample
    return z


@torch.no_grad()
def decode_latents(
    gen: Generator,
    z: torch.Tensor,
    *,
    patch: int | None = None,
    sites: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """Scaled latents -> model-space volumes N×1×X×Y×Z; ``patch`` decodes in overlapping
    latent windows (MONAI sliding window) so memory stays bounded for large volumes.
    ``sites``: the site each volume is for, rendered in that site's style by a site-styled
    decoder (None or ``pooled``: the null, average style; ignored by a plain decoder)."""
    return _decode(gen, gen.latent_norm.undo(z), patch=patch, sites=sites)


def _decode(
    gen: Generator,
    z: torch.Tensor,
    *,
    patch: int | None = None,
    sites: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """:func:`decode_latents` on unscaled latents (the encoder's own space); a case for a site
    with a plugin's decoder adapter (``gen.site_decoders``) decodes with that decoder."""
    if gen.site_decoders and sites is not None and set(sites) & set(gen.site_decoders):
        if len(sites) != len(z):
            raise ValueError(f"{len(sites)} sites given for {len(z)} latents")
        out = torch.empty(0)
        for name in dict.fromkeys(sites):
            idx = [i for i, s in enumerate(sites) if s == name]
            own = replace(gen, site_decoders={})
            names = [name] * len(idx)
            if name in gen.site_decoders:  # its adapter is its style (null row of a styled one)
                own, names = replace(own, autoencoder=gen.site_decoders[name]), None
            part = _decode(own, z[idx], patch=patch, sites=names)
            if out.numel() == 0:
                out = part.new_empty((len(z), *part.shape[1:]))
            out[idx] = part
        return out
    ae = gen.autoencoder.eval()
    rows = None
    if gen.site_style is not None and sites is not None:
        if len(sites) != len(z):
            raise ValueError(f"{len(sites)} sites given for {len(z)} latents")
        rows = gen.site_style.indices(sites)
    if patch is None or max(z.shape[2:]) <= patch:
        return ae.decode(z) if rows is None else ae.decode(z, rows)
    out = []
    for i in range(len(z)):  # one volume at a time: the window predictor sees one site
        row = None if rows is None else rows[i : i + 1]
        out.append(
            sliding_window_inference(
                z[i : i + 1],
                roi_size=(patch,) * 3,
                sw_batch_size=1,
                predictor=ae.decode if row is None else (lambda w, r=row: ae.decode(w, r)),
                overlap=0.25,
                mode="gaussian",
            )
        )
    return torch.cat(out)


@torch.no_grad()
def reconstruct(
    gen: Generator,
    images: torch.Tensor,
    *,
    sites: Sequence[str | None] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Autoencoder reconstructions (model space) of N×1×X×Y×Z ``images``, decoded from the
    posterior means (what the diffusion model learns from) for their ``sites``: the ceiling
    any sample of this generator can reach."""
    ae = gen.autoencoder.eval()
    out = []
    for i in range(0, len(images), batch_size):
        mu = ae.encode(images[i : i + batch_size])[0]
        part = None if sites is None else list(sites[i : i + batch_size])
        out.append(_decode(gen, mu, sites=part).cpu())
    return torch.cat(out)


def measures_scanner_noise(gen: Generator, config: SynthctConfig) -> bool:
    """Whether training measures the sites' scanner noise for ``gen``: only when its decoder
    renders each site's style (then a scan minus its reconstruction is the scanner's noise,
    not also its kernel and HU offset: against the site-agnostic shipped decoder, the noise
    put back made the demo cohorts' radiomics excess worse, 1.12 -> 1.49, docs/benchmarks.md),
    and never under DP, whose account would not cover the spectra."""
    return gen.site_style is not None and not config.federated.privacy.enabled


@torch.no_grad()
def site_noise_power(
    gen: Generator, images: torch.Tensor, sites: Sequence[str], *, batch_size: int = 16
) -> dict[str, NoisePower]:
    """Per site, the summed noise periodograms of its ``images`` (model space) against their
    reconstructions for that site (``synthct.models.scanner_noise``): what a site measures and
    sends so that samples made for it carry its scanner's noise."""
    if len(sites) != len(images):
        raise ValueError(f"{len(sites)} sites given for {len(images)} images")
    window = gen.config.data.hu_window
    out: dict[str, NoisePower] = {}
    for i in range(0, len(images), batch_size):
        part = list(sites[i : i + batch_size])
        x = images[i : i + batch_size]
        recon = model_to_hu(reconstruct(gen, x, sites=part, batch_size=batch_size), window)
        scans = model_to_hu(x.float().cpu(), window)
        for site in dict.fromkeys(part):
            idx = [j for j, s in enumerate(part) if s == site]
            power = noise_power(scans[idx], recon[idx])
            out[site] = out[site] + power if site in out else power
    return out


def inference_settings(
    gen: Generator,
    sampler: str | None,
    steps: int | None,
    guidance: float | None,
    scanner_noise: bool | None = None,
) -> dict[str, Any]:
    """Sampler, steps and guidance to sample with: the values given, else the generator's own
    inference settings (its saved ``sampling`` section). ``class_guidance``: the scales of
    classes that do not use ``guidance`` (none when a guidance is given: it applies to all).
    ``scanner_noise``: whether sites' scanner noise is added (only where it was measured)."""
    cfg = gen.config.sampling
    return {
        "sampler": sampler or cfg.sampler,
        "steps": steps or cfg.steps,
        "guidance": cfg.guidance if guidance is None else guidance,
        "class_guidance": dict(cfg.class_guidance) if guidance is None else {},
        "scanner_noise": gen.scanner_noise is not None
        and (cfg.scanner_noise if scanner_noise is None else scanner_noise),
    }


def class_scales(
    gen: Generator, guidance: float, class_guidance: dict[str, float]
) -> dict[str, float]:
    """The guidance of every class, in vocabulary order: its own scale, else ``guidance``."""
    return {name: class_guidance.get(name, guidance) for name in gen.config.labels.classes}


@torch.no_grad()
def sample_volumes(
    gen: Generator,
    class_labels: torch.Tensor,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    class_guidance: dict[str, float] | None = None,
    batch_size: int | None = None,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    denoiser: Denoiser | None = None,
    sites: Sequence[str | None] | None = None,
    scanner_noise: bool | None = None,
) -> torch.Tensor:
    """Sample HU volumes N×1×X×Y×Z (on ``config.data.spacing_mm``); ``None`` = config value
    (a ``guidance`` given without ``class_guidance`` applies to every class). ``sites``: the
    site each volume is for (None or ``pooled``: site-agnostic); a site-conditioned generator
    renders that site's style, and a generator with measured scanner noise adds that site's.
    The noise is drawn after every latent, so the same seed gives the same anatomy with or
    without it."""
    cfg = gen.config.sampling
    settings = inference_settings(gen, sampler, steps, guidance, scanner_noise)
    sampler, steps = settings["sampler"], settings["steps"]
    if class_guidance is None:
        class_guidance = settings["class_guidance"]
    per_class = torch.tensor([*class_scales(gen, settings["guidance"], class_guidance).values()])
    batch_size = batch_size or cfg.batch_size
    names = list(sites) if sites is not None else [None] * len(class_labels)
    if len(names) != len(class_labels):
        raise ValueError(f"{len(names)} sites given for {len(class_labels)} labels")
    site_index = sites_to_indices(gen, names)
    device = torch.device(device)
    scheduler = sampling_scheduler(gen.config.diffusion, sampler)
    denoise = denoiser or _unet_denoiser(gen.ema.eval())
    volumes = []
    for start in range(0, len(class_labels), batch_size):
        labels = class_labels[start : start + batch_size]
        z = sample_latents(
            denoise,
            scheduler,
            labels,
            sites=None if site_index is None else site_index[start : start + batch_size],
            latent_shape=gen.config.latent_shape,
            conditioning=gen.conditioning,
            guidance=per_class[labels.cpu()],
            guidance_interval=cfg.guidance_interval,
            site_guidance=cfg.site_guidance,
            steps=steps,
            generator=generator,
            device=device,
        )
        x = decode_latents(
            gen,
            z,
            patch=gen.config.sampling.decode_patch,
            sites=names[start : start + batch_size],
        )
        volumes.append(model_to_hu(x.float().cpu(), gen.config.data.hu_window))
    out = torch.cat(volumes)
    if settings["scanner_noise"]:
        assert gen.scanner_noise is not None
        seed = int(torch.randint(2**62, (1,), generator=generator))
        noise = gen.scanner_noise.draw(names, out.shape[2:], torch.Generator().manual_seed(seed))
        out = (out + noise).clamp(*gen.config.data.hu_window)
    return out
