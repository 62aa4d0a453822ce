"""The 3D KL autoencoder (MONAI ``AutoencoderKL``) built from its typed config.

With ``autoencoder.site_style`` the decoder is told the site (scanner) a volume is for: a
learnt per-site bias on its first block's features (noise and kernel character spread from
there through every later block) and a per-site gain and offset on its output (HU
calibration). The scanner style then lives where the scanner lives, in the decoder, and the
encoder, its latents and any UNet trained on them stay as they are.
Decoder-only, from the shipped generator (``bench/site_decoder_probe.py``, results in
``bench/results/site_decoder_probe_adversarial_2026-12-02.txt``): site style match of
reconstructions 0.50 -> 1.00 in every run at ``train.decoder_lr``; radiomics KID 0.40 -> 0.26
to 0.64 over runs, still above the gate's 0.21.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn

from synthct.config import AutoencoderConfig
from synthct.models.conditioning import Conditioning

__all__ = [
    "build_autoencoder",
    "build_discriminator",
    "SiteStyle",
    "SiteStyledAutoencoderKL",
    "styled_decode",
]


class SiteStyle(nn.Module):
    """Per-site feature bias (``site_slots x channels``) and output gain/offset, zero-initialised
    so a new site (or the null site, row ``len(sites)``) decodes exactly as the plain decoder."""

    def __init__(self, sites: Sequence[str], spare_slots: int, channels: int) -> None:
        super().__init__()
        self.vocabulary = Conditioning(num_classes=0, sites=tuple(sites), site_slots=0)
        slots = len(sites) + 1 + spare_slots
        self.feature_bias = nn.Embedding(slots, channels)
        self.output_affine = nn.Embedding(slots, 2)
        nn.init.zeros_(self.feature_bias.weight)
        nn.init.zeros_(self.output_affine.weight)

    @property
    def null_site(self) -> int:
        return self.vocabulary.null_site

    def indices(self, names: Sequence[str | None]) -> torch.Tensor:
        """Site names -> rows (None and ``pooled``: the null site; unknown names: an error)."""
        return self.vocabulary.site_indices(names)


def styled_decode(
    post_quant_conv: nn.Module,
    decoder: nn.Module,
    style: SiteStyle | None,
    z: torch.Tensor,
    sites: torch.Tensor | None = None,
) -> torch.Tensor:
    """``AutoencoderKL.decode`` with the site's style added (``sites``: B rows; None = null)."""
    h = post_quant_conv(z)
    if style is None:
        return decoder(h)
    if sites is None:
        sites = torch.full((z.shape[0],), style.null_site, dtype=torch.long)
    sites = sites.to(z.device)
    h = decoder.blocks[0](h) + style.feature_bias(sites)[:, :, None, None, None]
    for block in decoder.blocks[1:]:
        h = block(h)
    gain, offset = style.output_affine(sites).to(h.dtype).unbind(dim=1)
    return h * (1 + gain[:, None, None, None, None]) + offset[:, None, None, None, None]


class SiteStyledAutoencoderKL(AutoencoderKL):
    """``AutoencoderKL`` whose ``decode(z, sites)`` renders a site's style (see module doc);
    ``forward`` (the autoencoder phase) decodes with the null site."""

    def __init__(self, *, sites: Sequence[str], spare_site_slots: int, **kwargs) -> None:
        super().__init__(**kwargs)
        with torch.no_grad():
            probe = torch.zeros(1, kwargs["latent_channels"], *(2,) * kwargs["spatial_dims"])
            channels = self.decoder.blocks[0](self.post_quant_conv(probe)).shape[1]
        self.site_style = SiteStyle(sites, spare_site_slots, channels)

    def decode(self, z: torch.Tensor, sites: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():  # as AutoencoderKL.decode does
            return torch.utils.checkpoint.checkpoint(
                styled_decode,
                self.post_quant_conv,
                self.decoder,
                self.site_style,
                z,
                sites,
                use_reentrant=False,
            )
        return styled_decode(self.post_quant_conv, self.decoder, self.site_style, z, sites)


def build_autoencoder(cfg: AutoencoderConfig, sites: Sequence[str] = ()) -> AutoencoderKL:
    """One-channel CT in, one out; ``len(cfg.channels) - 1`` halvings per axis.

    Shapes: ``encode``: B×1×X×Y×Z -> (B×C×X/f×Y/f×Z/f mean, sigma); ``decode`` inverts it
    (``decode(z, sites)`` with ``cfg.site_style``: ``sites`` is the site vocabulary then).
    """
    levels = len(cfg.channels)
    kwargs = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(cfg.channels),
        num_res_blocks=(cfg.num_res_blocks,) * levels,
        attention_levels=(False,) * levels,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.attention,
        with_decoder_nonlocal_attn=cfg.attention,
        include_fc=False,
        use_checkpoint=cfg.gradient_checkpointing,
    )
    if not cfg.site_style:
        return AutoencoderKL(**kwargs)
    if not sites:
        raise ValueError("autoencoder.site_style needs the site vocabulary (data.sites)")
    return SiteStyledAutoencoderKL(sites=sites, spare_site_slots=cfg.spare_site_slots, **kwargs)


def build_discriminator(cfg: AutoencoderConfig) -> PatchDiscriminator | None:
    """MONAI's patch discriminator for the adversarial decoder term (None without one).
    ``forward(x)`` returns every layer's features; the last entry is the patch logits.
    Instance norm: no running statistics, so federated averaging has no buffers to blend."""
    if cfg.adversarial_weight <= 0:
        return None
    return PatchDiscriminator(
        spatial_dims=3,
        num_layers_d=cfg.discriminator_layers,
        channels=cfg.discriminator_channels,
        in_channels=1,
        out_channels=1,
        norm="INSTANCE",
    )
