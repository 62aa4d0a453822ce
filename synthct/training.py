"""Training steps as plain functions (no I/O): the central trainer and Flower clients call them.

Notation follows the DDPM/LDM papers: ``z_0`` latents of real volumes, ``z_t`` noised latents,
``eps`` the noise, ``v = alpha_t * eps - sigma_t * z_0`` the v-prediction target.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn

from synthct.config import AutoencoderConfig, DiffusionConfig
from synthct.errors import UsageError
from synthct.models.autoencoder import styled_decode
from synthct.models.conditioning import Conditioning

__all__ = [
    "resolve_device",
    "autocast",
    "random_patch",
    "BalancedSampler",
    "EMA",
    "ema_decay_at",
    "autoencoder_loss",
    "autoencoder_step",
    "detail_range",
    "reconstruction_loss",
    "LatentDecoder",
    "decoder_step",
    "encode_latents",
    "diffusion_loss",
    "denoising_target",
    "diffusion_step",
    "proximal_term",
]


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` without one is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device 'cuda' requested but no CUDA device is available (use --device cpu or auto)"
        )
    return torch.device(choice)


def autocast(device: torch.device):
    """bf16 autocast on GPU; a no-op context on CPU (CPU bf16 is slower there)."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


class BalancedSampler:
    """Draw batches whose classes are uniform over the classes present, so rare ones are seen.

    With ``balanced=False`` it draws cases uniformly (the data's own class mix).
    """

    def __init__(self, labels: torch.Tensor, *, balanced: bool, generator: torch.Generator) -> None:
        if labels.numel() == 0:
            raise ValueError("cannot sample batches from an empty case set")
        self.labels = labels
        self.balanced = balanced
        self.generator = generator
        self.by_class = [torch.nonzero(labels == c).flatten() for c in labels.unique().tolist()]

    def __call__(self, batch_size: int) -> torch.Tensor:
        if not self.balanced:
            return torch.randint(0, len(self.labels), (batch_size,), generator=self.generator)
        which = torch.randint(0, len(self.by_class), (batch_size,), generator=self.generator)
        out = torch.empty(batch_size, dtype=torch.long)
        for i, c in enumerate(which.tolist()):
            members = self.by_class[c]
            out[i] = members[torch.randint(0, len(members), (1,), generator=self.generator)]
        return out


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay for the ``step``-th averaged optimiser step (1-based), with diffusers'
    ``EMAModel`` warm-up ``min(decay, (1 + n) / (10 + n))``, ``n = step - 1``: the first step
    copies the weights and early steps forget the random start quickly, so a short run's EMA
    is not mostly its initialisation (0.999 alone keeps 37 % of it after 1000 steps)."""
    n = step - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))


class EMA:
    """Exponential moving average of a model's parameters (the weights we sample with).

    ``step`` counts the optimiser steps averaged so far (restored on resume). ``step=None``
    turns the warm-up off: the target is already a trained EMA being continued or fine-tuned,
    so restarting the warm-up would throw its average away.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        *,
        target: nn.Module | None = None,
        step: int | None = 0,
    ) -> None:
        """Average into ``target`` (same architecture) or into a fresh copy of ``model``."""
        self.decay = decay
        self.step = step
        self.model = (
            (target if target is not None else copy.deepcopy(model)).eval().requires_grad_(False)
        )

    def _advance(self, steps: int) -> float:
        """Count ``steps`` more averaged steps; the decay that folds them in at once."""
        if self.step is None:
            return self.decay**steps
        product = 1.0
        for i in range(1, steps + 1):
            product *= ema_decay_at(self.decay, self.step + i)
        self.step += steps
        return product

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """Fold in ``model`` as it stands after ``steps`` optimiser steps (a federated round's
        aggregate: the per-step decays multiplied, as if averaged step by step)."""
        decay = self._advance(steps)
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def _edges(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.diff(dim=d) for d in (2, 3, 4)]


def detail_range(ae_cfg: AutoencoderConfig, hu_window: tuple[float, float]) -> tuple[float, float]:
    """``detail_window_hu`` in model units ([-1, 1] over the data's ``hu_window``)."""
    low, high = hu_window
    return tuple(float(2 * (v - low) / (high - low) - 1) for v in ae_cfg.detail_window_hu)


def reconstruction_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    cfg: AutoencoderConfig,
    detail: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + gradient difference (keeps lesion edges) + L1 inside the detail window, rescaled to
    [-1, 1] (amplifies parenchymal haze that the full window makes a small error)."""
    l1 = F.l1_loss(recon, x)
    edge = sum(F.l1_loss(a, b) for a, b in zip(_edges(recon), _edges(x), strict=True)) / 3
    loss = l1 + cfg.edge_weight * edge
    parts = {"l1": l1.item(), "edge": edge.item()}
    if cfg.detail_weight > 0:
        if detail is None:
            raise ValueError("autoencoder.detail_weight > 0 needs the detail range (detail_range)")
        low, high = detail
        scale = 2.0 / (high - low)
        in_window = F.l1_loss(recon.clamp(low, high) * scale, x.clamp(low, high) * scale)
        loss = loss + cfg.detail_weight * in_window
        parts["detail"] = in_window.item()
    return loss, parts


def autoencoder_loss(
    ae: nn.Module,
    x: torch.Tensor,
    cfg: AutoencoderConfig,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    detail: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction loss + KL (+ optional feature loss through a frozen reference encoder).
    ``x``: B×1×X×Y×Z in [-1, 1]; ``detail``: :func:`detail_range` when ``detail_weight > 0``."""
    recon, mu, sigma = ae(x)
    loss, parts = reconstruction_loss(recon, x, cfg, detail)
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum(dim=(1, 2, 3, 4))
    kl = kl.mean()
    loss = loss + cfg.kl_weight * kl
    parts["kl"] = kl.item()
    if feature_fn is not None and cfg.perceptual_weight > 0:
        perceptual = F.mse_loss(feature_fn(recon), feature_fn(x).detach())
        loss = loss + cfg.perceptual_weight * perceptual
        parts["perceptual"] = perceptual.item()
    parts["loss"] = loss.item()
    return loss, parts


def random_patch(
    x: torch.Tensor,
    size: Sequence[int],
    generator: torch.Generator,
    *,
    latents: torch.Tensor | None = None,
    downsample: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random ``size``-voxel crop of every volume in ``x`` (B×1×X×Y×Z; one place for the
    whole batch, at a multiple of ``downsample``) and the same region of ``latents``
    (B×C×X/f×Y/f×Z/f, ``f = downsample``) when given: patch training of the autoencoder."""
    starts = [
        int(torch.randint(0, (full - p) // downsample + 1, (1,), generator=generator)) * downsample
        for full, p in zip(x.shape[2:], size, strict=True)
    ]
    crop = x[(..., *(slice(a, a + p) for a, p in zip(starts, size, strict=True)))]
    if latents is None:
        return crop, None
    region = (
        slice(a // downsample, (a + p) // downsample) for a, p in zip(starts, size, strict=True)
    )
    return crop, latents[(..., *region)]


def autoencoder_step(
    ae: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    cfg: AutoencoderConfig,
    *,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    detail: tuple[float, float] | None = None,
    patch: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimiser step on a batch (on one random ``patch`` of it when given, drawn with
    ``generator``); ``extra_loss`` is e.g. a FedProx proximal term."""
    if patch is not None:
        x, _ = random_patch(x, patch, generator or torch.default_generator)
    ae.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device):  # bf16 on GPU only
        loss, parts = autoencoder_loss(ae, x, cfg, feature_fn, detail)
    _optimise(ae, optimizer, loss, extra_loss)
    return parts


class LatentDecoder(nn.Module):
    """The decoding half of an ``AutoencoderKL`` (``post_quant_conv`` + ``decoder``, + its
    ``site_style`` when it has one, + the patch ``discriminator`` of an adversarial decoder
    phase), sharing their modules: the decoder phase trains and sends only these (same
    state-dict names)."""

    def __init__(self, ae: nn.Module, discriminator: nn.Module | None = None) -> None:
        super().__init__()
        self.post_quant_conv = ae.post_quant_conv
        self.decoder = ae.decoder
        self.site_style = getattr(ae, "site_style", None)
        self.discriminator = discriminator

    def forward(self, z: torch.Tensor, sites: torch.Tensor | None = None) -> torch.Tensor:
        return styled_decode(self.post_quant_conv, self.decoder, self.site_style, z, sites)

    def decoding_parameters(self) -> list[nn.Parameter]:
        """Everything but the discriminator (what the reconstruction loss trains)."""
        skip = {id(p) for p in self.discriminator.parameters()} if self.discriminator else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def site_rows(
        self, names: list[str], *, dropout: float, generator: torch.Generator
    ) -> torch.Tensor | None:
        """Style rows for cases of these sites, each dropped to the null site with
        ``dropout`` (None for a decoder without site style)."""
        if self.site_style is None:
            return None
        rows = self.site_style.indices(names)
        drop = torch.rand(len(rows), generator=generator) < dropout
        return torch.where(drop, torch.full_like(rows, self.site_style.null_site), rows)


_ADVERSARIAL = PatchAdversarialLoss(criterion="least_squares")


def decoder_step(
    decoder: LatentDecoder,
    optimizer: torch.optim.Optimizer,
    z: torch.Tensor,
    x: torch.Tensor,
    cfg: AutoencoderConfig,
    *,
    sites: torch.Tensor | None = None,
    detail: tuple[float, float] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    patch: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One decoder-only step: reconstruct ``x`` from its frozen encoder's posterior means
    ``z`` (what sampling decodes), so the encoder's latents and a UNet trained on them stay
    valid; ``sites``: style rows of a site-styled decoder (:meth:`LatentDecoder.site_rows`).
    With ``patch`` the step decodes one random region (``patch`` voxels) of the latents.

    With ``cfg.adversarial_weight`` the decoder also learns to fool the patch discriminator
    (least squares), and the discriminator, in the same step from the same weights, learns to
    tell ``x`` from the reconstruction (MONAI's tutorial recipe, one optimiser for both)."""
    if patch is not None:
        f = x.shape[2] // z.shape[2]
        x, z = random_patch(x, patch, generator or torch.default_generator, latents=z, downsample=f)
    decoder.train()
    optimizer.zero_grad(set_to_none=True)
    disc = decoder.discriminator
    with autocast(x.device):
        recon = decoder(z, sites)
        loss, parts = reconstruction_loss(recon, x, cfg, detail)
        if disc is not None and cfg.adversarial_weight > 0:
            disc.requires_grad_(False)  # the decoder's term must not train the discriminator
            fooled = _ADVERSARIAL(disc(recon)[-1], target_is_real=True, for_discriminator=False)
            disc.requires_grad_(True)
            loss = loss + cfg.adversarial_weight * fooled
            parts["adversarial"] = fooled.item()
    parts["loss"] = loss.item()
    if extra_loss is not None:
        loss = loss + extra_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder.decoding_parameters(), 1.0)
    if disc is not None and cfg.adversarial_weight > 0:
        with autocast(x.device):
            d_loss = 0.5 * (
                _ADVERSARIAL(disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
                + _ADVERSARIAL(disc(x)[-1], target_is_real=True, for_discriminator=True)
            )
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), 1.0)
        parts["discriminator"] = d_loss.item()
    optimizer.step()
    return parts


def _optimise(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    extra_loss: Callable[[], torch.Tensor] | None,
) -> None:
    if extra_loss is not None:
        loss = loss + extra_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


@torch.no_grad()
def encode_latents(ae: nn.Module, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Posterior means of the autoencoder: N×1×X×Y×Z -> N×C×x×y×z (no sampling noise)."""
    ae.eval()
    return torch.cat([ae.encode(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])


def diffusion_loss(
    unet: nn.Module,
    z0: torch.Tensor,
    labels: torch.Tensor,
    scheduler,
    cfg: DiffusionConfig,
    *,
    conditioning: Conditioning,
    generator: torch.Generator,
    sites: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoising loss on scaled latents ``z0`` (B×C×x×y×z) with label dropout for CFG
    (``sites``: B site indices for a site-conditioned UNet, dropped independently)."""
    b = z0.shape[0]
    noise = torch.randn(z0.shape, generator=generator).to(z0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(
        z0.device
    )
    z_t = scheduler.add_noise(z0, noise, t)  # z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    cls = conditioning.drop(
        labels, sites, p_class=cfg.p_uncond, p_site=cfg.p_site_uncond, generator=generator
    )
    pred = unet(z_t, t, class_labels=cls)
    target = denoising_target(scheduler, cfg, z0, noise, t)
    return F.mse_loss(pred.float(), target.float())


def denoising_target(
    scheduler, cfg: DiffusionConfig, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet predicts for ``z_t``: the noise, or ``v`` for v-prediction."""
    return noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)


def diffusion_step(
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    z0: torch.Tensor,
    labels: torch.Tensor,
    scheduler,
    cfg: DiffusionConfig,
    *,
    conditioning: Conditioning,
    generator: torch.Generator,
    sites: torch.Tensor | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimiser step; ``extra_loss`` is added to the loss (e.g. FedProx's term)."""
    unet.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(z0.device):  # bf16 on GPU only; the loss itself is taken in float32
        loss = diffusion_loss(
            unet,
            z0,
            labels,
            scheduler,
            cfg,
            conditioning=conditioning,
            generator=generator,
            sites=sites,
        )
    total = loss + extra_loss() if extra_loss is not None else loss
    total.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    return {"loss": loss.item(), "total": total.item()}


def proximal_term(
    model: nn.Module, reference: list[torch.Tensor], mu: float
) -> Callable[[], torch.Tensor]:
    """FedProx: ``mu/2 * ||w - w_global||^2`` against the round's starting weights."""

    def term() -> torch.Tensor:
        return (
            0.5
            * mu
            * sum((p - r).pow(2).sum() for p, r in zip(model.parameters(), reference, strict=True))
        )

    return term
