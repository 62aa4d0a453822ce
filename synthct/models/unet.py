"""The latent diffusion UNet (MONAI ``DiffusionModelUNet``) with class (and site) embeddings.

Class indices ``0..n-1`` are the vocabulary, index ``n`` is the *null* class used for
classifier-free guidance, and ``spare_class_slots`` more embeddings are reserved so a class can
be added later without changing tensor shapes. With ``site_conditioning`` the class table is
replaced by a summed class + site table (:mod:`synthct.models.conditioning`), and with
``site_norms`` every GroupNorm gets a scale and shift per site (:mod:`synthct.models.site_norm`).
"""

from __future__ import annotations

from monai.networks.nets import DiffusionModelUNet

from synthct.config import SynthctConfig, UNetConfig
from synthct.models.conditioning import Conditioning, FactorizedEmbedding
from synthct.models.site_norm import add_site_norms

__all__ = ["build_unet", "num_class_embeds", "num_site_embeds", "conditioning_for"]


def num_class_embeds(num_classes: int, cfg: UNetConfig) -> int:
    return num_classes + 1 + cfg.spare_class_slots


def num_site_embeds(num_sites: int, cfg: UNetConfig) -> int:
    return num_sites + 1 + cfg.spare_site_slots


def conditioning_for(config: SynthctConfig) -> Conditioning:
    """The conditioning vocabulary of the UNet ``config`` builds."""
    if not config.unet.site_conditioning:
        return Conditioning(config.labels.num_classes)
    sites = tuple(config.site_names)
    return Conditioning(config.labels.num_classes, sites, num_site_embeds(len(sites), config.unet))


def build_unet(
    cfg: UNetConfig, *, latent_channels: int, num_classes: int, num_sites: int = 0
) -> DiffusionModelUNet:
    """``forward(z_t: B×C×x×y×z, t: B, class_labels: B) -> B×C×x×y×z`` (eps or v);
    ``class_labels`` are :meth:`Conditioning.encode` indices (``num_sites`` with
    ``cfg.site_conditioning``)."""
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=num_class_embeds(num_classes, cfg),
        include_fc=False,
    )
    if cfg.site_conditioning:
        if num_sites < 1:
            raise ValueError("a site-conditioned UNet needs num_sites >= 1")
        dim = unet.class_embedding.embedding_dim
        unet.class_embedding = FactorizedEmbedding(
            num_class_embeds(num_classes, cfg), num_site_embeds(num_sites, cfg), dim
        )
        if cfg.site_norms:
            add_site_norms(unet, num_site_embeds(num_sites, cfg))
    return unet
