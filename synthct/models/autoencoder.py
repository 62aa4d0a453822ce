"""The 3D KL autoencoder (MONAI ``AutoencoderKL``) built from its typed config."""

from __future__ import annotations

from monai.networks.nets import AutoencoderKL

from synthct.config import AutoencoderConfig

__all__ = ["build_autoencoder"]


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """One-channel CT in, one out; ``len(cfg.channels) - 1`` halvings per axis.

    Shapes: ``encode``: B×1×X×Y×Z -> (B×C×X/f×Y/f×Z/f mean, sigma); ``decode`` inverts it.
    """
    levels = len(cfg.channels)
    return AutoencoderKL(
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
    )
