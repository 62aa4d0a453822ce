"""What one site does in a federated round, with no Flower in sight.

A site opens only its own ``train`` cases (rows of other sites in the manifest are never read),
runs synthct's training steps on the weights it was sent, and reports what it trained on. The
Flower apps (``client_app``/``server_app``) only move these tensors and numbers around.
Everything that leaves a site is written to its audit log first (``payload.write_audit``);
what a site keeps between rounds is in ``site_state.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from synthct.checkpoint import build_generator
from synthct.config import SynthctConfig, TrainConfig
from synthct.data.dataset import CaseSet
from synthct.fed.errors import SiteError
from synthct.fed.site_state import OptimizerStateStore, ProcessCache
from synthct.models.autoencoder import build_autoencoder, build_discriminator
from synthct.models.conditioning import is_per_site_table
from synthct.models.latent_norm import LatentNorm
from synthct.models.scanner_noise import NoisePower
from synthct.models.schedulers import training_scheduler
from synthct.models.unet import build_unet, conditioning_for
from synthct.phases import PHASES
from synthct.sampling import site_noise_power
from synthct.training import (
    BalancedSampler,
    LatentDecoder,
    autoencoder_step,
    decoder_step,
    detail_range,
    diffusion_step,
    encode_latents,
    proximal_term,
)

__all__ = [
    "PHASES",
    "SiteError",
    "RoundResult",
    "LocalRun",
    "build_phase_model",
    "train_autoencoder_round",
    "train_decoder_round",
    "train_diffusion_round",
    "site_latents",
]

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What a site sends back after local training."""

    state: dict[str, torch.Tensor]
    cases: int
    loss: float
    steps: int


def build_phase_model(config: SynthctConfig, phase: str) -> nn.Module:
    """The network a phase trains: the autoencoder, its decoding half, or the diffusion UNet."""
    if phase == "autoencoder":
        return build_autoencoder(config.autoencoder, config.site_names)
    if phase == "decoder":
        return LatentDecoder(
            build_autoencoder(config.autoencoder, config.site_names),
            build_discriminator(config.autoencoder),
        )
    if phase == "diffusion":
        return build_unet(
            config.unet,
            latent_channels=config.autoencoder.latent_channels,
            num_classes=config.labels.num_classes,
            num_sites=len(config.site_names),
        )
    raise SiteError(f"unknown phase {phase!r} (expected one of {PHASES})")


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SiteError(
            f"{what}: received weights do not fit the configured model ({exc})"
        ) from None


def _prox(model: nn.Module, mu: float):
    if mu <= 0:
        return None
    return proximal_term(model, [p.detach().clone() for p in model.parameters()], mu)


@dataclass(frozen=True)
class LocalRun:
    """How one site's round runs: length, seed, FedProx strength, device, and where the
    site keeps its optimiser state (store, server round) if it keeps it."""

    steps: int
    seed: int
    proximal_mu: float = 0.0
    device: torch.device | str = "cpu"
    optimizer_state: tuple[OptimizerStateStore, int] | None = None
    # train only these parameters (no weight decay): a site calibrating its own row
    only: tuple[str, ...] | None = None
    lr: float | None = None  # instead of the phase's learning rate


def _local_training(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    what: str,
    cases: CaseSet,
    train: TrainConfig,
    lr: float,
    run: LocalRun,
    step: Callable[..., dict[str, float]],
) -> RoundResult:
    """Start ``model`` from the global ``weights`` and run ``run.steps`` of
    ``step(optimizer, batch_index, generator, extra_loss)`` on class-balanced batches."""
    _load_weights(model, weights, what)
    model.to(run.device)
    generator = torch.Generator().manual_seed(run.seed)
    sampler = BalancedSampler(cases.labels, balanced=train.balanced, generator=generator)
    if run.only is None:
        # per-site rows without weight decay: a site that does not own row i must not move it
        # (SecAgg recovers each site's row from the mean, other sites' decay included)
        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if not is_per_site_table(n)]},
            {"params": [p for n, p in named if is_per_site_table(n)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=run.lr or lr)
    else:
        named = dict(model.named_parameters())
        missing = [n for n in run.only if n not in named]
        if missing:
            raise SiteError(f"{what}: no parameter {missing} to train")
        for name, p in named.items():
            p.requires_grad_(name in run.only)
        optimizer = torch.optim.AdamW(
            [named[n] for n in run.only], lr=run.lr or lr, weight_decay=0.0
        )
    if run.optimizer_state is not None:
        store, server_round = run.optimizer_state
        store.load_into(optimizer, server_round)
    extra = _prox(model, run.proximal_mu)
    losses = [
        step(optimizer, sampler(train.batch_size), generator, extra)["loss"]
        for _ in range(run.steps)
    ]
    if run.optimizer_state is not None and run.steps:
        store.save(optimizer, server_round)
    return RoundResult(
        state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        cases=len(cases),
        loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        steps=run.steps,
    )


def train_autoencoder_round(
    config: SynthctConfig,
    weights: dict[str, torch.Tensor],
    cases: CaseSet,
    run: LocalRun,
) -> RoundResult:
    """``run.steps`` autoencoder steps from the global weights on this site's cases."""
    ae = build_phase_model(config, "autoencoder")
    torch.manual_seed(run.seed)  # the KL sampling noise inside AutoencoderKL
    detail = detail_range(config.autoencoder, config.data.hu_window)

    def step(optimizer, idx, generator, extra):
        x = cases.images[idx].to(run.device)
        return autoencoder_step(
            ae,
            optimizer,
            x,
            config.autoencoder,
            extra_loss=extra,
            detail=detail,
            patch=config.train.ae_patch,
            generator=generator,
        )

    return _local_training(
        ae, weights, "autoencoder", cases, config.train, config.train.ae_lr, run, step
    )


def train_decoder_round(
    config: SynthctConfig,
    weights: dict[str, torch.Tensor],
    latents: torch.Tensor,
    cases: CaseSet,
    run: LocalRun,
) -> RoundResult:
    """``run.steps`` decoder-only steps from the global decoder, decoding this site's unscaled
    latents (under the frozen encoder) back to its cases."""
    decoder = build_phase_model(config, "decoder")
    detail = detail_range(config.autoencoder, config.data.hu_window)

    def step(optimizer, idx, generator, extra):
        sites = decoder.site_rows(
            [cases.sites[i] for i in idx.tolist()],
            dropout=config.autoencoder.site_style_dropout,
            generator=generator,
        )
        return decoder_step(
            decoder,
            optimizer,
            latents[idx].to(run.device),
            cases.images[idx].to(run.device),
            config.autoencoder,
            sites=sites,
            detail=detail,
            extra_loss=extra,
            patch=config.train.ae_patch,
            generator=generator,
        )

    return _local_training(
        decoder, weights, "decoder", cases, config.train, config.train.decoder_lr, run, step
    )


_LATENT_CACHE = ProcessCache()  # (autoencoder sha256, the site's cases) -> latents


def site_latents(
    config: SynthctConfig,
    autoencoder_weights: dict[str, torch.Tensor],
    autoencoder_sha256: str,
    cases: CaseSet,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unscaled posterior-mean latents of this site's cases under the frozen autoencoder."""
    key = (autoencoder_sha256, "|".join(cases.paths[:1]) + str(len(cases)))

    def encode() -> torch.Tensor:
        ae = build_phase_model(config, "autoencoder")
        _load_weights(ae, autoencoder_weights, "autoencoder")
        return encode_latents(ae.to(device), cases.images.to(device)).cpu()

    return _LATENT_CACHE.get(key, encode)


def site_noise(
    config: SynthctConfig,
    autoencoder_weights: dict[str, torch.Tensor],
    cases: CaseSet,
    device: torch.device | str = "cpu",
) -> NoisePower:
    """This site's summed scanner-noise periodograms: its cases against their reconstructions
    by the frozen autoencoder, in its own style (``synthct.models.scanner_noise``)."""
    gen = build_generator(config)
    _load_weights(gen.autoencoder, autoencoder_weights, "autoencoder")
    power = site_noise_power(gen.to(device), cases.images.to(device), list(cases.sites))
    return sum(power.values(), NoisePower(torch.zeros(()), 0))


def train_diffusion_round(
    config: SynthctConfig,
    weights: dict[str, torch.Tensor],
    latents: torch.Tensor,
    cases: CaseSet,
    run: LocalRun,
    *,
    latent_norm: LatentNorm,
) -> RoundResult:
    """``run.steps`` latent-diffusion steps from the global UNet on this site's latents in the
    pooled normalisation (:mod:`synthct.models.latent_norm`)."""
    unet = build_phase_model(config, "diffusion")
    scheduler = training_scheduler(config.diffusion)
    z0 = latent_norm.apply(latents).to(run.device)
    conditioning = conditioning_for(config)
    sites = conditioning.site_indices(cases.sites)

    def step(optimizer, idx, generator, extra):
        return diffusion_step(
            unet,
            optimizer,
            z0[idx],
            cases.labels[idx].to(run.device),
            scheduler,
            config.diffusion,
            conditioning=conditioning,
            sites=None if sites is None else sites[idx],
            generator=generator,
            extra_loss=extra,
        )

    return _local_training(
        unet, weights, "unet", cases, config.train, config.train.diffusion_lr, run, step
    )
