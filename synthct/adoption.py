"""Continuing a trained generator under a config that adds site awareness (a site style in
the decoder, a site table or per-site norms in the UNet) or asks for a fresh UNet: the trained
weights carried over so the adopted generator samples exactly as before until it trains on.
Federated runs started from an ``initial`` generator, and the benches that probe a decoder or
a UNet, adopt here."""

from __future__ import annotations

import torch

from synthct.checkpoint import CheckpointError, Generator, build_generator
from synthct.config import SynthctConfig
from synthct.models.site_norm import plain_to_site_norms

__all__ = ["adopt_generator"]


def _site_flags(config: SynthctConfig, like: SynthctConfig) -> SynthctConfig:
    """``config`` with ``like``'s site-awareness switches (to compare everything else)."""
    ae = config.autoencoder.model_copy(
        update={
            "site_style": like.autoencoder.site_style,
            "spare_site_slots": like.autoencoder.spare_site_slots,
        }
    )
    unet = config.unet.model_copy(
        update={
            "site_conditioning": like.unet.site_conditioning,
            "spare_site_slots": like.unet.spare_site_slots,
            "site_norms": like.unet.site_norms,
        }
    )
    return config.model_copy(update={"autoencoder": ae, "unet": unet})


def _class_only_to_factorized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A class-only UNet's weights for its site-conditioned twin: the class table becomes
    the class half; the site half (missing here) starts at zero, which sums to the same
    embedding, so the adopted UNet predicts exactly what the class-only one did."""
    out = dict(state)
    out["class_embedding.classes.weight"] = out.pop("class_embedding.weight")
    return out


def adopt_generator(
    gen: Generator, config: SynthctConfig, *, what: str = "generator", restart_unet: bool = False
) -> Generator:
    """``gen``'s trained weights under ``config``, which may add site awareness ``gen``
    lacks (a site style in the decoder, a site table in the UNet): new site rows start at zero,
    so the adopted generator samples exactly as ``gen`` until it trains on. A config with the
    other latent normalisation, or ``restart_unet``, keeps the autoencoder and starts the UNet
    afresh (seeded by ``config.seed``; the old one learnt another latent space, or is not
    wanted). Anything else that differs (or site awareness taken away) is a
    :class:`CheckpointError` naming ``what``."""
    renormed = gen.latent_norm.mode != config.diffusion.latent_norm
    fresh_unet = renormed or restart_unet
    old = gen.config.model_copy(
        update={
            "diffusion": gen.config.diffusion.model_copy(
                update={"latent_norm": config.diffusion.latent_norm}
            )
        }
    )
    lost = [
        name
        for name, had, has in (
            ("autoencoder.site_style", old.autoencoder.site_style, config.autoencoder.site_style),
            ("unet.site_conditioning", old.unet.site_conditioning, config.unet.site_conditioning),
            ("unet.site_norms", old.unet.site_norms, config.unet.site_norms),
        )
        if had and not has
    ]
    if lost:
        raise CheckpointError(
            f"{what}: the config turns off {lost}; its trained rows would be lost"
        )
    added_style = config.autoencoder.site_style and not old.autoencoder.site_style
    added_sites = config.unet.site_conditioning and not old.unet.site_conditioning
    added_norms = config.unet.site_norms and not old.unet.site_norms
    adds = added_style or added_sites or added_norms
    compared = _site_flags(config, old) if adds else config
    mismatch = compared.network_mismatch(old)
    if mismatch is None and adds:
        mismatch = config.network_mismatch(_site_flags(old, config))  # e.g. the site vocabulary
    if mismatch:
        raise CheckpointError(
            f"{what}: cannot fine-tune this generator under the run's config: {mismatch}"
        )
    new = build_generator(config, seed=config.seed if fresh_unet else None)
    state = gen.autoencoder.state_dict()
    missing, unexpected = new.autoencoder.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("site_style.") for k in missing):
        raise CheckpointError(f"{what}: autoencoder tensors do not fit ({missing}, {unexpected})")
    for name in () if fresh_unet else ("unet", "ema"):
        state = getattr(gen, name).state_dict()
        if added_sites:
            state = _class_only_to_factorized(state)
        if added_norms:  # each GroupNorm's affine becomes every row of its site tables
            state = plain_to_site_norms(state, getattr(new, name))
        missing, unexpected = getattr(new, name).load_state_dict(state, strict=False)
        if unexpected or missing not in ([], ["class_embedding.sites.weight"]):
            raise CheckpointError(f"{what}: {name} tensors do not fit ({missing}, {unexpected})")
        if missing:  # the new site table: zero, not nn.Embedding's N(0, 1) (norm ~11 per row,
            # as large as a class row), so the sum is the old class embedding exactly
            with torch.no_grad():
                getattr(new, name).class_embedding.sites.weight.zero_()
    if gen.discriminator is not None and new.discriminator is not None:
        new.discriminator.load_state_dict(gen.discriminator.state_dict())
    new.latent_norm = gen.latent_norm
    new.scanner_noise = gen.scanner_noise  # measured against the same autoencoder
    new.ema.eval().requires_grad_(False)
    return new
