"""Flower ClientApp: one hospital. Trains on its own ``train`` cases, sends back weights.

Where a site's data is comes from the SuperNode's ``--node-config`` (``site``, ``manifest``,
``audit-dir``) in a deployment; in the simulation the site is ``data.sites[partition-id]`` and
the server names the (single-machine) manifest. The run's config travels in every message, so
every site trains the same networks. A site refuses weights whose hash does not match.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from synthct.config import SynthctConfig
from synthct.fed.task import (
    LocalRun,
    OptimizerStateStore,
    SiteError,
    config_from_json,
    latent_moments,
    load_site_cases,
    round_seed,
    site_latents,
    tensors_from_bytes,
    train_autoencoder_round,
    train_decoder_round,
    train_diffusion_round,
    write_audit,
)
from synthct.training import resolve_device

__all__ = ["app", "SiteSettings", "site_settings", "prepare_site"]

logger = logging.getLogger(__name__)

app = ClientApp()


class SiteSettings:
    """Who this node is and where its files are."""

    def __init__(self, name: str, index: int, manifest: Path, audit_dir: Path) -> None:
        self.name, self.index, self.manifest, self.audit_dir = name, index, manifest, audit_dir


def site_settings(context: Context, config: SynthctConfig, cfg: ConfigRecord) -> SiteSettings:
    """Resolve the site from node config (deployment) or partition id (simulation)."""
    node = context.node_config
    if "site" in node:
        name = str(node["site"])
    elif "partition-id" in node:
        pid = int(node["partition-id"])
        if not 0 <= pid < len(config.site_names):
            raise SiteError(f"partition-id {pid} has no site (sites: {config.site_names})")
        name = config.site_names[pid]
    else:
        raise SiteError(
            "node config names no site: start the SuperNode with --node-config 'site=…'"
        )
    if name not in config.site_names:
        raise SiteError(f"site {name!r} is not in the run's config (sites: {config.site_names})")
    if "manifest" in node:
        manifest = Path(str(node["manifest"]))
    elif "sim-manifest" in cfg:
        manifest = Path(str(cfg["sim-manifest"]))
    else:
        raise SiteError(f"site {name!r}: node config has no 'manifest' path")
    if "audit-dir" in node:
        audit_dir = Path(str(node["audit-dir"]))
    elif "sim-site-root" in cfg:
        audit_dir = Path(str(cfg["sim-site-root"])) / name
    else:
        audit_dir = manifest.parent / "synthct-audit" / name
    return SiteSettings(name, config.site_names.index(name), manifest, audit_dir)


def _inject_fault(config: SynthctConfig, site: str, phase: str, server_round: int) -> None:
    for fault in config.federated.faults:
        if (fault.site, fault.phase, fault.round) == (site, phase, server_round):
            if fault.kind == "error":
                raise SiteError(f"site {site!r}: injected fault in {phase} round {server_round}")
            logger.warning("site %s: injected %.1f s delay", site, fault.delay_s)
            time.sleep(fault.delay_s)


def prepare_site(
    msg: Message, context: Context
) -> tuple[SynthctConfig, ConfigRecord, SiteSettings]:
    """The run's config, the message's config record and this site, from any synthct message
    (generator and downstream ClientApps alike); applies the simulation's thread count."""
    cfg = msg.content["config"]
    config = config_from_json(str(cfg["synthct-config"]))
    if "sim-threads" in cfg:
        torch.set_num_threads(int(cfg["sim-threads"]))
    return config, cfg, site_settings(context, config, cfg)


def _reply(
    msg: Message,
    site: SiteSettings,
    phase: str,
    server_round: int,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    keep_payload: bool,
) -> Message:
    write_audit(
        site.audit_dir,
        site=site.name,
        phase=phase,
        server_round=server_round,
        tensors=tensors,
        metrics=metrics,
        keep_payload=keep_payload,
    )
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if tensors:
        content["arrays"] = ArrayRecord(tensors)
    return Message(content=content, reply_to=msg)


def _frozen_autoencoder(cfg: ConfigRecord) -> tuple[dict[str, torch.Tensor], str]:
    sha = str(cfg["autoencoder-sha256"])
    weights = tensors_from_bytes(
        bytes(cfg["autoencoder-safetensors"]), sha256=sha, what="frozen autoencoder"
    )
    return weights, sha


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training for the phase the server names."""
    config, cfg, site = prepare_site(msg, context)
    phase, server_round = str(cfg["phase"]), int(cfg["server-round"])
    try:
        _inject_fault(config, site.name, phase, server_round)
        cases = load_site_cases(config, site.manifest, site.name)
        weights = msg.content["arrays"].to_torch_state_dict()
        device = resolve_device(config.train.device)
        run = LocalRun(
            steps=int(cfg["local-steps"]),
            seed=round_seed(config.seed, phase, server_round, site.name),
            proximal_mu=float(cfg.get("proximal-mu", 0.0)),
            device=device,
            optimizer_state=(
                (OptimizerStateStore(site.audit_dir / "optimizer", phase), server_round)
                if config.federated.keep_optimizer_state
                else None
            ),
        )
        if phase == "autoencoder":
            result = train_autoencoder_round(config, weights, cases, run)
        elif phase in ("decoder", "diffusion"):
            ae_weights, ae_sha = _frozen_autoencoder(cfg)
            latents = site_latents(config, ae_weights, ae_sha, cases, device)
            if phase == "decoder":
                result = train_decoder_round(config, weights, latents, cases, run)
            else:
                scale = float(cfg["scale-factor"])
                result = train_diffusion_round(
                    config, weights, latents, cases, run, scale_factor=scale
                )
        else:
            raise SiteError(f"unknown phase {phase!r}")
    except SiteError as exc:
        logger.error("%s (%s round %d)", exc, phase, server_round)
        raise
    except Exception as exc:
        logger.error("site %s failed in %s round %d: %s", site.name, phase, server_round, exc)
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    metrics = {
        "num-examples": result.cases,
        "unit-weight": 1,
        "site-index": site.index,
        "loss": result.loss,
        "steps": result.steps,
    }
    return _reply(
        msg,
        site,
        phase,
        server_round,
        result.state,
        metrics,
        keep_payload=bool(cfg.get("keep-payload", False)),
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Latent moments under the frozen autoencoder, pooled by the server into a scale factor."""
    config, cfg, site = prepare_site(msg, context)
    try:
        cases = load_site_cases(config, site.manifest, site.name)
        ae_weights, ae_sha = _frozen_autoencoder(cfg)
        moments = latent_moments(site_latents(config, ae_weights, ae_sha, cases))
    except SiteError:
        raise
    except Exception as exc:
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    metrics = {"num-examples": len(cases), "site-index": site.index, **moments}
    return _reply(msg, site, "scale", 0, {}, metrics, keep_payload=False)
