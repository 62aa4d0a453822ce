"""Per-site normalisation in the diffusion UNet: a scanner's style as each GroupNorm's own
scale and shift (``unet.site_norms``).

Sites differ most by their scanner (noise, kernel, HU offset, field of view): a feature shift.
In federated learning the remedy for a feature shift is to keep the normalisation local
(FedBN, Li et al. 2021): the convolutions are shared and averaged, each client's
normalisation affine is its own. Here every ``GroupNorm`` of a site-conditioned UNet gets a
table of affine rows, one per site slot (sites, the null site, spares), and each case is
normalised with its site's row; the site comes from the UNet's own ``class_labels`` index
(``class * site_slots + site``), so samplers, training and plugins call the UNet as before.
Rows start as the plain GroupNorm's affine, so a converted UNet predicts exactly as it did.
Federated rounds let only the site that owns row i move it
(``synthct.models.conditioning.is_per_site_table``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SiteGroupNorm", "add_site_norms", "plain_to_site_norms", "SITE_NORM_SUFFIXES"]

# the state-dict names of the per-site tables end so (one row per site slot)
SITE_NORM_SUFFIXES = (".site_weight", ".site_bias")


class SiteGroupNorm(nn.Module):
    """``GroupNorm`` without its own affine, then the row of ``site_weight``/``site_bias`` of
    each case's site (``sites``, set by the UNet before every forward)."""

    def __init__(self, norm: nn.GroupNorm, site_slots: int) -> None:
        super().__init__()
        if not norm.affine:
            raise ValueError("SiteGroupNorm replaces an affine GroupNorm")
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.site_weight = nn.Parameter(norm.weight.detach().clone().repeat(site_slots, 1))
        self.site_bias = nn.Parameter(norm.bias.detach().clone().repeat(site_slots, 1))
        self.sites: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sites is None or len(self.sites) != x.shape[0]:
            got = None if self.sites is None else len(self.sites)
            raise RuntimeError(
                f"SiteGroupNorm: {got} site indices for a batch of {x.shape[0]}: call the UNet "
                "with class_labels (the site is read from them)"
            )
        h = F.group_norm(x, self.num_groups, None, None, self.eps)
        shape = (x.shape[0], self.num_channels) + (1,) * (x.dim() - 2)
        weight = self.site_weight[self.sites].view(shape).to(h.dtype)
        bias = self.site_bias[self.sites].view(shape).to(h.dtype)
        return h * weight + bias


def _set_sites(site_slots: int):
    """A forward pre-hook that hands every SiteGroupNorm of the called UNet its cases' sites
    (read from ``class_labels``; it looks the norms up on the module it is called on, so a
    deep copy such as the EMA sets its own)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("class_labels", args[3] if len(args) > 3 else None)
        if labels is None:
            raise RuntimeError("a UNet with per-site norms needs class_labels")
        sites = labels.long() % site_slots
        for norm in module.modules():
            if isinstance(norm, SiteGroupNorm):
                norm.sites = sites.to(norm.site_weight.device)

    return hook


def add_site_norms(unet: nn.Module, site_slots: int) -> nn.Module:
    """Replace every ``GroupNorm`` of ``unet`` by a :class:`SiteGroupNorm` (in place; rows start
    as its affine) and register the hook that tells them the sites; returns ``unet``."""
    for child in list(unet.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.GroupNorm):
                setattr(child, attr, SiteGroupNorm(sub, site_slots))
    unet.register_forward_pre_hook(_set_sites(site_slots), with_kwargs=True)
    return unet


def plain_to_site_norms(state: dict[str, torch.Tensor], unet: nn.Module) -> dict[str, torch.Tensor]:
    """A UNet's weights without per-site norms for ``unet``, which has them: each GroupNorm's
    affine becomes every row of its site tables, so the result predicts exactly as before."""
    out = dict(state)
    for name, module in unet.named_modules():
        if isinstance(module, SiteGroupNorm):
            slots = module.site_weight.shape[0]
            out[f"{name}.site_weight"] = out.pop(f"{name}.weight").repeat(slots, 1)
            out[f"{name}.site_bias"] = out.pop(f"{name}.bias").repeat(slots, 1)
    return out
