"""The server's two questions to the sites once a run's autoencoder is final: statistics of
their ``train`` cases under it, never the cases themselves.

``scale``: per-channel latent moments, pooled exactly into the UNet's latent normalisation.
``noise``: each site's scanner noise spectrum (``synthct.models.scanner_noise``), kept per site;
a reply that is unreadable, of the wrong shape, with negative or non-finite power or without
cases is set aside with the reason (a broken or hostile site must not spoil the others').
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from synthct.config import SynthctConfig
from synthct.fed.errors import FederatedError
from synthct.fed.rounds import site_name
from synthct.fed.sites import wait_for_sites
from synthct.models.latent_norm import LatentNorm, pooled_latent_norm
from synthct.models.scanner_noise import NoisePower, ScannerNoise

__all__ = ["query_sites", "latent_norm_from", "scanner_noise_from", "screen_noise_power"]

logger = logging.getLogger(__name__)


def query_sites(grid: Grid, config: SynthctConfig, cfg: ConfigRecord) -> list[Message]:
    """Send the query ``cfg`` (its ``phase`` says which) to every site; the replies without
    error, at least ``federated.min_sites`` of them."""
    nodes = wait_for_sites(grid, config)
    messages = [
        Message(
            content=RecordDict({"config": cfg}), message_type=MessageType.QUERY, dst_node_id=node
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=config.federated.round_timeout_s))
    ok = [r for r in replies if not r.has_error()]
    if len(ok) < config.federated.min_sites:
        reasons = [r.error.reason for r in replies if r.has_error()]
        raise FederatedError(
            f"{cfg['phase']} query: {len(ok)} site(s) replied, need "
            f"{config.federated.min_sites}; errors: {reasons}"
        )
    return ok


def _metrics(reply: Message) -> Any:
    return next(iter(reply.content.metric_records.values()))


def latent_norm_from(
    config: SynthctConfig, replies: list[Message]
) -> tuple[LatentNorm, dict[str, Any]]:
    """The latent normalisation (the config's kind) pooled from the sites' moments, and its
    ``rounds.jsonl`` record."""
    moments, per_site = [], {}
    for r in replies:
        m = _metrics(r)
        moments.append({k: [float(v) for v in m[k]] for k in ("count", "sum", "sumsq")})
        per_site[site_name(config, r)] = int(m["num-examples"])
    try:
        norm = pooled_latent_norm(moments, config.diffusion.latent_norm)
    except ValueError as exc:
        raise FederatedError(str(exc)) from None
    return norm, {"phase": "scale", "round": 0, "latent_norm": norm.to_json(), "cases": per_site}


def screen_noise_power(
    expected: tuple[int, ...],
    sent: dict[str, tuple[torch.Tensor, int]],
    max_std_hu: float,
) -> tuple[dict[str, NoisePower], dict[str, str]]:
    """The sites' (summed spectrum, cases) fit to keep, and the reason for each set aside: a
    spectrum of another shape or type, with negative or non-finite power, without cases, or
    whose noise would exceed ``max_std_hu`` (the HU window's width: no scanner's noise does,
    and one site's outsized spectrum would dominate the pooled one every unseen site gets)."""
    power, rejected = {}, {}
    for site, (total, cases) in sent.items():
        if tuple(total.shape) != expected:
            rejected[site] = f"spectrum shape {tuple(total.shape)}, expected {expected}"
        elif not total.is_floating_point():
            rejected[site] = f"spectrum of type {total.dtype}, expected real floating point"
        elif not torch.isfinite(total).all() or (total < 0).any():
            rejected[site] = "negative or non-finite power"
        elif cases < 1:
            rejected[site] = "no cases"
        else:
            noise = ScannerNoise({site: (total.double() / cases).float()}).noise_std()[site]
            if noise > max_std_hu:
                rejected[site] = f"noise of {noise:.3g} HU std, above {max_std_hu:g}"
            else:
                power[site] = NoisePower(total.double(), cases)
    return power, rejected


def scanner_noise_from(
    config: SynthctConfig, replies: list[Message]
) -> tuple[ScannerNoise | None, dict[str, Any]]:
    """Each site's scanner noise (None when no reply is fit to keep), and its record."""
    x, y, z = config.data.shape
    sent, unreadable = {}, {}
    for r in replies:
        site = site_name(config, r)
        if site in sent or site in unreadable:
            unreadable[site] = "more than one reply for this site"
            sent.pop(site, None)
            continue
        try:
            total = r.content["arrays"].to_torch_state_dict()["noise-power"]
            sent[site] = (total, int(_metrics(r)["num-examples"]))
        except (KeyError, StopIteration, TypeError, ValueError) as exc:
            unreadable[site] = f"unreadable reply ({exc})"
    low, high = config.data.hu_window
    power, rejected = screen_noise_power((x, y, z // 2 + 1), sent, max_std_hu=high - low)
    rejected.update(unreadable)
    for site, why in rejected.items():
        logger.warning("scanner noise of site %s set aside: %s", site, why)
    noise = ScannerNoise.from_power(power) if power else None
    record = {
        "phase": "noise",
        "round": 0,
        "noise_std_hu": None if noise is None else noise.noise_std(),
        "cases": {s: p.cases for s, p in power.items()},
        "rejected": rejected,
    }
    return noise, record
