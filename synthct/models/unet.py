"""The latent diffusion UNet (MONAI ``DiffusionModelUNet``) with class embeddings.

Class indices ``0..n-1`` are the vocabulary, index ``n`` is the *null* class used for
classifier-free guidance, and ``spare_class_slots`` more embeddings are reserved so a class can
be added later without changing tensor shapes.
"""

from __future__ import annotations

from monai.networks.nets import DiffusionModelUNet

from synthct.config import UNetConfig

__all__ = ["build_unet", "num_class_embeds"]


def num_class_embeds(num_classes: int, cfg: UNetConfig) -> int:
    return num_classes + 1 + cfg.spare_class_slots


def build_unet(cfg: UNetConfig, *, latent_channels: int, num_classes: int) -> DiffusionModelUNet:
    """``forward(z_t: B×C×x×y×z, t: B, class_labels: B) -> B×C×x×y×z`` (eps or v)."""
    return DiffusionModelUNet(
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
