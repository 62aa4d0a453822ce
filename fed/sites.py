"""What every synthct Flower app shares: who a site is and where its files are (client side),
waiting for the sites to connect and setting aside unfit updates (server side).

The generator, reference, gate and downstream apps all resolve their site the same way, from
the SuperNode's ``--node-config`` (``site``, ``manifest``, ``audit-dir``) in a deployment or from
the partition id and the server's ``sim-*`` settings in Flower's simulation, so each app runs
in both alike.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from synthct.config import SynthctConfig
from synthct.fed.errors import FederatedError, SiteError
from synthct.fed.payload import config_from_json, config_to_json, write_audit

__all__ = [
    "DEPLOYED_PULL_INTERVAL_S",
    "PromptGrid",
    "SiteSettings",
    "site_settings",
    "prepare_site",
    "release",
    "wait_for_sites",
    "screen_updates",
    "task_config",
]

logger = logging.getLogger(__name__)

# how often a deployed ServerApp asks the SuperLink for replies (Flower's own grid: 3 s)
DEPLOYED_PULL_INTERVAL_S = 0.5


class PromptGrid:
    """A Flower grid whose ``send_and_receive`` polls for replies every ``pull_interval``
    seconds and, given a ``stopped`` event, gives up as soon as it is set.

    Flower's deployed grid sleeps 3 s between pulls, so every exchange with the sites (a round,
    a holdout count, a gate summary) ended up to 3 s after the last reply; the deployed
    ServerApp polls every ``DEPLOYED_PULL_INTERVAL_S`` instead. In the simulation, Flower's
    ``run_simulation`` raises when its runtime dies but leaves the ServerApp thread polling
    until the round timeout (30 min by default), after which synthct would log a skipped round
    and write a checkpoint; with ``stopped`` set by the runtime's end the thread raises instead.
    Everything else passes through to the wrapped grid.
    """

    def __init__(
        self, grid, *, pull_interval: float, stopped: threading.Event | None = None
    ) -> None:  # noqa: ANN001 - a flwr Grid
        self._grid = grid
        self._pull_interval = pull_interval
        self._stopped = stopped

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        """Flower's ``send_and_receive`` (push, then poll until all replied or timeout)."""
        waiting = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list = []
        while timeout is None or time.time() < end:
            if self._stopped is not None and self._stopped.is_set():
                raise FederatedError("the simulation runtime stopped; the ServerApp ends here")
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            time.sleep(self._pull_interval)
        return replies


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
        # the simulation's roster: its nodes are every site of the run, also when a message's
        # config names fewer (a plugin judged on one site's data)
        roster = str(cfg["sim-sites"]).split(",") if "sim-sites" in cfg else config.site_names
        if not 0 <= pid < len(roster):
            raise SiteError(f"partition-id {pid} has no site (sites: {roster})")
        name = roster[pid]
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


def task_config(
    config: SynthctConfig,
    task: str,
    *,
    manifest: Path | None,
    site_root: Path | None,
    roster: list[str] | None = None,
) -> dict[str, Any]:
    """What every message of a federated task carries: the run's config and the task's name
    (``fed/app.py`` routes on it), plus, in Flower's simulation (``manifest`` given), where the
    single-machine manifest and the sites' folders are and which site each node is
    (``roster``, default the config's sites); a deployed site takes all that from its
    SuperNode's node config instead."""
    out: dict[str, Any] = {"synthct-config": config_to_json(config), "task": task}
    if manifest is not None:
        out["sim-manifest"] = str(manifest)
        out["sim-sites"] = ",".join(roster or config.site_names)
        out["sim-threads"] = config.federated.client_cpus
        if site_root is not None:
            out["sim-site-root"] = str(site_root)
    return out


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


def release(
    msg: Message,
    site: SiteSettings,
    *,
    phase: str,
    server_round: int,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    keep_payload: bool = False,
) -> Message:
    """The reply that carries what a site sends (``tensors``, ``metrics``), written to the
    site's hash-chained audit log first: every app releases through here, so nothing leaves a
    site unaudited. The reply names where the site's chain stood, so a server that logs it can
    later show a rewritten log does not match."""
    record = write_audit(
        site.audit_dir,
        site=site.name,
        phase=phase,
        server_round=server_round,
        tensors=tensors,
        metrics=metrics,
        keep_payload=keep_payload,
    )
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "audit": ConfigRecord({"chain": record["chain"]})}
    )
    if tensors:
        content["arrays"] = ArrayRecord(tensors)
    return Message(content=content, reply_to=msg)


def wait_for_sites(grid: Grid, config: SynthctConfig) -> list[int]:
    """Wait up to ``connect_timeout_s`` for every configured site, at least ``min_sites``."""
    fed, wanted = config.federated, len(config.site_names)
    deadline = time.monotonic() + fed.connect_timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(nodes) < fed.min_sites:
        raise FederatedError(
            f"only {len(nodes)} site(s) connected within {fed.connect_timeout_s:.0f} s; "
            f"federated.min_sites = {fed.min_sites}"
        )
    if len(nodes) < wanted:
        logger.warning("%d of %d sites connected; continuing", len(nodes), wanted)
    return nodes


def screen_updates(
    replies: list[Message],
    global_state: dict[str, torch.Tensor],
    norm_ratio: float,
    site_of: Callable[[Message], str],
) -> tuple[list[Message], list[dict[str, Any]]]:
    """Keep the replies fit to aggregate: an update with NaN/Inf, or (``norm_ratio`` > 0) one
    whose distance from the global weights is more than ``norm_ratio`` times the median of the
    other sites' distances, is set aside with the reason (a broken or hostile site must not
    spoil the round for the others)."""
    kept, rejected, norms = [], [], {}
    for r in replies:
        state = r.content["arrays"].to_torch_state_dict()
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        if not all(bool(torch.isfinite(v).all()) for v in floats.values()):
            rejected.append((r, "update holds NaN or Inf values"))
            continue
        kept.append(r)
        norms[id(r)] = math.sqrt(
            sum(
                float((v.double() - global_state[k].double()).pow(2).sum())
                for k, v in floats.items()
            )
        )
    if norm_ratio > 0 and len(kept) >= 2:
        fit = []
        for r in kept:
            others = [norms[id(o)] for o in kept if o is not r]
            limit = norm_ratio * statistics.median(others)
            if limit > 0 and norms[id(r)] > limit:
                rejected.append(
                    (
                        r,
                        f"update norm {norms[id(r)]:.3g} > {norm_ratio:g} x the other sites' median",
                    )
                )
            else:
                fit.append(r)
        kept = fit
    out = []
    for r, reason in rejected:
        site = site_of(r)  # logged with the round's other failures
        out.append(
            {"node": r.metadata.src_node_id, "site": site, "reason": f"site {site!r}: {reason}"}
        )
    return kept, out
