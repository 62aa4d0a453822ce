"""What the diffusion UNet is conditioned on: the class and, optionally, the site (scanner).

MONAI's ``DiffusionModelUNet`` adds one embedding of ``class_labels`` to its time embedding.
A site-conditioned UNet replaces that table by two that are summed
(:class:`FactorizedEmbedding`): one per class and one per site, each with its own *null*
entry for classifier-free guidance. The UNet still receives one index per row,

    index = class * site_slots + site        (class_slots x site_slots combinations)

so MONAI's forward, samplers and plugins stay unchanged. Summing, rather than one embedding
per (class, site) pair, lets the generator make a class for a site that never had it (site_b's
consolidation): each half is learnt from every case that carries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from synthct.models.site_norm import SITE_NORM_SUFFIXES

__all__ = [
    "FactorizedEmbedding",
    "Conditioning",
    "UnknownSiteError",
    "UNET_SITE_ROWS",
    "PER_SITE_ROWS",
    "is_per_site_table",
]

# Tables with one row per site slot (the decoder's style, the UNet's site embeddings, and with
# ``unet.site_norms`` every GroupNorm's scale and shift): in federated rounds only the site
# that owns row i moves it, and no weight decay pulls a row toward zero.
UNET_SITE_ROWS = "class_embedding.sites.weight"
PER_SITE_ROWS = (
    "site_style.feature_bias.weight",
    "site_style.output_affine.weight",
    UNET_SITE_ROWS,
)


def is_per_site_table(key: str) -> bool:
    """Whether parameter / state-dict entry ``key`` (possibly under a wrapper's prefix) has one
    row per site slot."""
    return key.endswith(SITE_NORM_SUFFIXES) or any(
        key == table or key.endswith("." + table) for table in PER_SITE_ROWS
    )


class UnknownSiteError(KeyError):
    """A site name the generator was not trained with; the message lists the known sites."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class FactorizedEmbedding(nn.Module):
    """``index -> E_class[index // site_slots] + E_site[index % site_slots]`` (B -> B×dim)."""

    def __init__(self, class_slots: int, site_slots: int, dim: int) -> None:
        super().__init__()
        if class_slots < 2 or site_slots < 2:
            raise ValueError(
                f"class_slots and site_slots must be >= 2, got {class_slots}, {site_slots}"
            )
        self.site_slots = site_slots
        self.classes = nn.Embedding(class_slots, dim)
        self.sites = nn.Embedding(site_slots, dim)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.classes(index // self.site_slots) + self.sites(index % self.site_slots)


@dataclass(frozen=True)
class Conditioning:
    """How class (and site) names become the UNet's conditioning index.

    Attributes:
        num_classes: vocabulary size; index ``num_classes`` is the null class.
        sites: the site vocabulary of a site-conditioned UNet (None: class only); index
            ``len(sites)`` is the null site (site-agnostic sampling, unseen sites).
        site_slots: site embeddings in the UNet (sites + null + spare).
    """

    num_classes: int
    sites: tuple[str, ...] | None = None
    site_slots: int = 0

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def site_conditioned(self) -> bool:
        return self.sites is not None

    @property
    def null_site(self) -> int:
        return len(self.sites) if self.sites is not None else 0

    def site_indices(
        self, names: Sequence[str | None], *, unknown_as_null: bool = False
    ) -> torch.Tensor | None:
        """Site names -> site indices (None for a class-only UNet); None and ``pooled`` are the
        null site. A name this generator does not know is an error listing the ones it does,
        or the null site with ``unknown_as_null`` (a late site training its own plugin)."""
        if self.sites is None:
            return None
        out = []
        for name in names:
            if name is None or name == "pooled" or (unknown_as_null and name not in self.sites):
                out.append(self.null_site)
            elif name in self.sites:
                out.append(self.sites.index(name))
            else:
                raise UnknownSiteError(
                    f"unknown site {name!r}; this generator knows {list(self.sites)} "
                    "(or 'pooled' for site-agnostic cases)"
                )
        return torch.tensor(out, dtype=torch.long)

    def encode(self, classes: torch.Tensor, sites: torch.Tensor | None = None) -> torch.Tensor:
        """Class indices (and site indices; None = null site) -> UNet ``class_labels``."""
        if self.sites is None:
            return classes
        if sites is None:
            sites = torch.full_like(classes, self.null_site)
        return classes * self.site_slots + sites.to(classes.device)

    def drop(
        self,
        classes: torch.Tensor,
        sites: torch.Tensor | None,
        *,
        p_class: float,
        p_site: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Training-time label dropout: each row loses its class with ``p_class`` and,
        independently, its site with ``p_site``; returns the encoded indices."""
        b = len(classes)
        drop_c = torch.rand(b, generator=generator).to(classes.device) < p_class
        classes = torch.where(drop_c, torch.full_like(classes, self.null_class), classes)
        if self.sites is not None and sites is not None:
            sites = sites.to(classes.device)
            drop_s = torch.rand(b, generator=generator).to(classes.device) < p_site
            sites = torch.where(drop_s, torch.full_like(sites, self.null_site), sites)
        return self.encode(classes, sites)
