"""Flower ClientApp: one hospital. Trains on its own ``train`` cases, sends back weights.

Where a site's data is comes from the SuperNode's ``--node-config`` (``site``, ``manifest``,
``audit-dir``) in a deployment; in the simulation the site is ``data.sites[partition-id]`` and
the server names the (single-machine) manifest. The run's config travels in every message, so
every site trains the same networks. A site refuses weights whose hash does not match. Under
``federated.secagg`` the same train function runs inside Flower's SecAgg+ protocol
(``fed/secagg.py``); a SuperNode started with ``require-secagg=true`` refuses plain rounds.
"""

from __future__ import annotations

import json
import logging
import time

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from synthct.config import SynthctConfig
from synthct.fed.payload import tensors_from_bytes
from synthct.fed.secagg import secure_train_mod
from synthct.fed.site_state import OptimizerStateStore, load_site_cases, round_seed
from synthct.fed.sites import prepare_site, release
from synthct.fed.task import (
    LocalRun,
    SiteError,
    site_latents,
    site_noise,
    train_autoencoder_round,
    train_decoder_round,
    train_diffusion_round,
)
from synthct.models.latent_norm import LatentNorm, latent_moments
from synthct.training import resolve_device

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = ClientApp()


def _inject_fault(config: SynthctConfig, site: str, phase: str, server_round: int) -> None:
    for fault in config.federated.faults:
        if (fault.site, fault.phase, fault.round) == (site, phase, server_round):
            if fault.kind == "error":
                raise SiteError(f"site {site!r}: injected fault in {phase} round {server_round}")
            if fault.kind == "delay":
                logger.warning("site %s: injected %.1f s delay", site, fault.delay_s)
                time.sleep(fault.delay_s)


def _corrupt_update(
    config: SynthctConfig, site: str, phase: str, server_round: int, state: dict
) -> None:
    """Drills only (``federated.faults`` kinds ``nan`` / ``huge``): spoil what this site sends,
    in place, as a broken or hostile site would."""
    for fault in config.federated.faults:
        if (fault.site, fault.phase, fault.round) != (site, phase, server_round):
            continue
        floats = [t for t in state.values() if t.is_floating_point()]
        if fault.kind == "nan":
            floats[0].view(-1)[0] = float("nan")
        elif fault.kind == "huge":
            for t in floats:
                t.mul_(1000.0)


def _frozen_autoencoder(cfg: ConfigRecord) -> tuple[dict[str, torch.Tensor], str]:
    sha = str(cfg["autoencoder-sha256"])
    weights = tensors_from_bytes(
        bytes(cfg["autoencoder-safetensors"]), sha256=sha, what="frozen autoencoder"
    )
    return weights, sha


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """One round of local training for the phase the server names."""
    config, cfg, site = prepare_site(msg, context)
    phase, server_round = str(cfg["phase"]), int(cfg["server-round"])
    try:
        _inject_fault(config, site.name, phase, server_round)
        cases = load_site_cases(config, site.manifest, site.name)
        weights = msg.content["arrays"].to_torch_state_dict()
        device = resolve_device(config.train.device)
        only = str(cfg.get("train-only", "")) or None  # a calibration: these weights only
        run = LocalRun(
            steps=int(cfg["local-steps"]),
            seed=round_seed(config.seed, phase, server_round, site.name),
            proximal_mu=float(cfg.get("proximal-mu", 0.0)),
            device=device,
            optimizer_state=(
                (
                    OptimizerStateStore(
                        site.audit_dir / "optimizer", "site-rows" if only else phase
                    ),
                    server_round,
                )
                if config.federated.keep_optimizer_state
                else None
            ),
            only=None if only is None else tuple(only.split(",")),
            lr=float(cfg["lr"]) if "lr" in cfg else None,
        )
        if phase == "autoencoder":
            result = train_autoencoder_round(config, weights, cases, run)
        elif phase in ("decoder", "diffusion"):
            ae_weights, ae_sha = _frozen_autoencoder(cfg)
            latents = site_latents(config, ae_weights, ae_sha, cases, device)
            if phase == "decoder":
                result = train_decoder_round(config, weights, latents, cases, run)
            else:
                norm = LatentNorm.from_json(json.loads(str(cfg["latent-norm"])))
                result = train_diffusion_round(
                    config, weights, latents, cases, run, latent_norm=norm
                )
        else:
            raise SiteError(f"unknown phase {phase!r}")
    except SiteError as exc:
        logger.error("%s (%s round %d)", exc, phase, server_round)
        raise
    except Exception as exc:
        logger.error("site %s failed in %s round %d: %s", site.name, phase, server_round, exc)
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    _corrupt_update(config, site.name, phase, server_round, result.state)
    metrics = {
        "num-examples": result.cases,
        "unit-weight": 1,
        "site-index": site.index,
        "loss": result.loss,
        "steps": result.steps,
    }
    return release(
        msg,
        site,
        phase=phase,
        server_round=server_round,
        tensors=result.state,
        metrics=metrics,
        keep_payload=bool(cfg.get("keep-payload", False)),
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Statistics of this site's ``train`` cases under the frozen autoencoder: per-channel
    latent moments (phase ``scale``; the server pools them into the UNet's latent
    normalisation), or its scanner noise spectrum (phase ``noise``; summed periodograms of
    scans minus reconstructions over soft tissue, never a volume)."""
    config, cfg, site = prepare_site(msg, context)
    phase = str(cfg["phase"])
    tensors: dict[str, torch.Tensor] = {}
    try:
        cases = load_site_cases(config, site.manifest, site.name)
        ae_weights, ae_sha = _frozen_autoencoder(cfg)
        if phase == "noise":
            power = site_noise(config, ae_weights, cases, resolve_device(config.train.device))
            tensors, stats = {"noise-power": power.total}, {}
        elif phase == "scale":
            stats = latent_moments(site_latents(config, ae_weights, ae_sha, cases))
        else:
            raise SiteError(f"site {site.name!r}: unknown query {phase!r}")
    except SiteError:
        raise
    except Exception as exc:
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    metrics = {"num-examples": len(cases), "site-index": site.index, **stats}
    return release(msg, site, phase=phase, server_round=0, tensors=tensors, metrics=metrics)
