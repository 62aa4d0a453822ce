"""A site contributes a LoRA plugin through a Flower round, at its own time.

The server names the contributing site, the base generator (by sha256) and the plugin settings;
every connected site gets the message, and only the named one acts: it loads its own copy of
the base generator (node config ``generator``: a folder or ``pretrained``; in Flower's
simulation the server's ``sim-generator``), refuses if its sha256 is not the one the registry
serves, trains the adapter on its own ``train`` cases (the base stays frozen) and sends back
only the adapter tensors (the UNet's and, with ``plugins.decoder_rank``, the decoder's) and
its coarsened class counts, written to its audit log first. In a deployment a site releases a
plugin only if its SuperNode was started with ``contribute-plugins=true``: a plugin is one
site's update in the clear, which a site may refuse.

The server writes the plugin folder from the tensors, checks it as ``synthct plugin add`` does,
and then judges what it does (:class:`PluginGate`): the base with the plugin fused in makes a
cohort for that site, which the federated gate judges on that site's own data; then, for every
other connected site, the base and the fused generator each make a cohort for it, judged on its
data, so a plugin that makes another site's cases worse is caught. Only a plugin whose cohort
passes and that makes no other site worse is added, with the decision and its numbers; a
refusal is recorded in the registry's history. Each contribution is its own run, so sites join
whenever they are ready.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from synthct.checkpoint import generator_sha256, load_generator
from synthct.config import SynthctConfig
from synthct.fed.errors import FederatedError, SiteError
from synthct.fed.plugin_judging import (
    Judging,
    PluginGate,
    judge_contribution,
    judge_other_sites,
    one_site,
)
from synthct.fed.site_state import load_site_cases
from synthct.fed.sites import prepare_site, release, task_config, wait_for_sites
from synthct.pretrained import generator_folder

__all__ = [
    "PluginGate",
    "contribute",
    "contribute_server",
    "contribute_plugin",
]

logger = logging.getLogger(__name__)

OPT_IN_KEY = "contribute-plugins"


def contribute(msg: Message, context: Context) -> Message:
    """Train and send this site's plugin if the message names it; otherwise answer that it
    sends nothing (and releases nothing)."""
    config, cfg, site = prepare_site(msg, context)
    if str(cfg["plugin-site"]) != site.name:
        return Message(
            content=RecordDict({"config": ConfigRecord({"site": site.name, "contributed": 0})}),
            reply_to=msg,
        )
    node = context.node_config
    if "site" in node and str(node.get(OPT_IN_KEY, "false")).lower() not in ("1", "true", "yes"):
        raise SiteError(
            f"site {site.name!r} does not contribute plugins: start its SuperNode with "
            f"--node-config '... {OPT_IN_KEY}=true' to allow it"
        )
    from synthct.plugins.adapter import (
        DECODER_PREFIX,
        adapter_state,
        coarsen,
        train_site_adapters,
    )

    try:
        source = str(node["generator"]) if "generator" in node else str(cfg["sim-generator"])
        gen_dir = generator_folder(source)
        if not (gen_dir / "config.json").is_file():
            raise SiteError(f"site {site.name!r}: no base generator at {gen_dir}")
        wanted = str(cfg["base-sha256"])
        held = generator_sha256(gen_dir)
        if held != wanted:
            raise SiteError(
                f"site {site.name!r}: its base generator {gen_dir} is {held[:12]}, the "
                f"registry serves {wanted[:12]}: install that base first"
            )
        gen = load_generator(gen_dir)
        if gen.config.labels.vocabulary_hash != config.labels.vocabulary_hash:
            raise SiteError(
                f"site {site.name!r}: the run's label vocabulary is not its base generator's"
            )
        cases = load_site_cases(config, site.manifest, site.name)
        if tuple(cases.images.shape[-3:]) != tuple(gen.config.data.shape):
            raise SiteError(
                f"site {site.name!r}: volumes of shape {tuple(cases.images.shape[-3:])}, the "
                f"base generator makes {tuple(gen.config.data.shape)}"
            )
        plugin_cfg = gen.config.plugins.model_copy(
            update={k: v for k, v in _plugin_settings(cfg).items() if v}
        )
        unet, ae = train_site_adapters(gen, cases, plugin_cfg, seed=int(cfg["seed"]))
        tensors = adapter_state(unet, "plugin")
        if ae is not None:  # its scanner's style, on the decoder
            tensors.update({DECODER_PREFIX + k: v for k, v in adapter_state(ae, "plugin").items()})
    except SiteError:
        raise
    except Exception as exc:
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    counts = cases.class_counts(gen.config.labels.num_classes)
    metrics: dict[str, Any] = {"site-index": site.index, "contributed": 1}
    for name, n in zip(gen.config.labels.classes, counts, strict=True):
        metrics[f"seen-{name}"] = coarsen(int(n))
    reply = release(msg, site, phase="plugin", server_round=1, tensors=tensors, metrics=metrics)
    reply.content["config"] = ConfigRecord({"site": site.name, "contributed": 1})
    return reply


def _plugin_settings(cfg: ConfigRecord) -> dict[str, Any]:
    return {
        "rank": int(cfg.get("plugin-rank", 0)),
        "steps": int(cfg.get("plugin-steps", 0)),
        "targets": str(cfg.get("plugin-targets", "")),
        "decoder_rank": int(cfg.get("plugin-decoder-rank", 0)),
    }


def contribute_server(
    grid: Grid,
    config: SynthctConfig,
    *,
    site: str,
    generator_dir: Path,
    registry: Path,
    seed: int = 0,
    rank: int = 0,
    steps: int = 0,
    targets: str = "",
    decoder_rank: int = 0,
    gate: PluginGate | None = None,
    manifest: Path | None = None,
    site_root: Path | None = None,
) -> dict[str, Any]:
    """Ask ``site`` for its plugin on the base at ``generator_dir`` and, if its cohort passes
    ``gate`` (None: not judged, and recorded so), add it to ``registry``; returns the decision
    and what was registered. ``manifest``: Flower's simulation (the sites read their cases and
    the base from the server's paths)."""
    from synthct.plugins.adapter import write_plugin
    from synthct.plugins.registry import add_plugin, record_refusal, validate_plugin

    if site not in config.site_names:
        raise FederatedError(f"site {site!r} is not in the run's config ({config.site_names})")
    gen = load_generator(generator_dir)
    if gen.config.labels.vocabulary_hash != config.labels.vocabulary_hash:
        raise FederatedError(
            f"the run's config and the base generator {generator_dir} have different label "
            "vocabularies: the site would train on labels the base does not mean"
        )
    base = _registry_takes(registry, generator_dir)  # before any site spends time on it
    nodes = wait_for_sites(grid, config)
    cfg = ConfigRecord(
        {
            **task_config(config, "plugin", manifest=manifest, site_root=site_root),
            "plugin-site": site,
            "base-sha256": base,
            "seed": seed,
            "plugin-rank": rank,
            "plugin-steps": steps,
            "plugin-targets": targets,
            "plugin-decoder-rank": decoder_rank,
            **({"sim-generator": str(generator_dir)} if manifest is not None else {}),
        }
    )
    messages = [
        Message(content=RecordDict({"config": cfg}), message_type=MessageType.TRAIN, dst_node_id=n)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=config.federated.round_timeout_s))
    errors = [r.error.reason for r in replies if r.has_error()]
    sent = [
        r
        for r in replies
        if not r.has_error()
        and int(r.content["config"]["contributed"])
        and str(r.content["config"]["site"]) == site
    ]
    if not sent:
        why = "; ".join(errors) or f"site {site!r} did not answer (is its SuperNode connected?)"
        raise FederatedError(f"plugin contribution from {site!r}: {why}")
    if len(sent) > 1:
        nodes_sent = sorted(r.metadata.src_node_id for r in sent)
        raise FederatedError(
            f"plugin contribution from {site!r}: {len(sent)} nodes ({nodes_sent}) claim to be "
            "that site; nothing is registered"
        )
    (reply,) = sent
    others = {  # the other connected sites, which can judge what the plugin does to them
        str(r.content["config"]["site"]): r.metadata.src_node_id
        for r in replies
        if not r.has_error()
        and not int(r.content["config"]["contributed"])
        and str(r.content["config"]["site"]) in config.site_names
    }
    metrics = reply.content["metrics"]
    seen = {c: int(metrics.get(f"seen-{c}", 0)) for c in gen.config.labels.classes}
    chosen = {"rank": rank, "steps": steps, "targets": targets, "decoder_rank": decoder_rank}
    plugin_cfg = gen.config.plugins.model_copy(update={k: v for k, v in chosen.items() if v})
    state = reply.content["arrays"].to_torch_state_dict()
    registry = Path(registry)
    staging = registry.parent / f".incoming-{site}-{uuid.uuid4().hex[:8]}"
    by = f"flower node {reply.metadata.src_node_id}"
    try:
        write_plugin(
            state,
            staging,
            gen=gen,
            generator_dir=generator_dir,
            site=site,
            classes_seen=seen,
            cfg=plugin_cfg,
        )
        staged = validate_plugin(staging, gen, generator_dir)
        decision: dict[str, Any] = {"gated": False, "accepted": True, "why": "not judged"}
        if gate is not None:
            judging = Judging(
                grid, gen, generator_dir, staged, gate, seed, manifest, site_root,
                config.site_names,
            )  # fmt: skip
            decision = judge_contribution(judging, site, reply.metadata.src_node_id, config)
            if decision["accepted"] and gate.other_sites:
                decision = judge_other_sites(judging, others, config, decision)
        result = {
            "plugin": staged.name,
            "site": site,
            "bytes": staged.meta["weights_bytes"],
            "classes_seen": seen,
            "registry": str(registry),
            "decision": decision,
        }
        if not decision["accepted"]:
            record_refusal(registry, staged, generator_dir, by=by, decision=decision)
            return result
        add_plugin(registry, staging, gen, generator_dir, by=by, acceptance=decision)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("site %s contributed plugin %s", site, staged.name)
    return result


def _registry_takes(registry: Path, generator_dir: Path) -> str:
    """The base's sha256, if ``registry`` is new or serves that base; else the refusal."""
    from synthct.plugins.registry import read_index

    base = generator_sha256(generator_dir)
    if (Path(registry) / "registry.json").is_file():
        served = read_index(registry)["base_generator_sha256"]
        if served != base:
            raise FederatedError(
                f"{registry} serves base generator {served[:12]}, not {base[:12]}: no site is "
                "asked for a plugin on a base the registry does not serve"
            )
    return base


def contribute_plugin(
    config: SynthctConfig,
    manifest: str | Path,
    *,
    site: str,
    generator_dir: str | Path,
    registry: str | Path,
    run: str | Path,
    seed: int = 0,
    steps: int = 0,
    decoder_rank: int = 0,
    gate: PluginGate | None = None,
) -> dict[str, Any]:
    """``site``'s contribution in Flower's simulation, every site reading its cases from
    ``manifest``: all the config's sites when the gate judges what the plugin does to the
    others, else one SuperNode, the site itself (the run's config keeps only that site)."""
    from synthct.fed.app import client
    from synthct.fed.simulation import simulate

    if site not in config.site_names:
        raise FederatedError(f"site {site!r} is not in the config's sites ({config.site_names})")
    _registry_takes(Path(registry), Path(generator_dir))
    sites = config if gate is not None and gate.other_sites else one_site(config, site)
    run = Path(run).resolve()
    run.mkdir(parents=True, exist_ok=True)
    return simulate(
        lambda grid: contribute_server(
            grid,
            sites,
            site=site,
            generator_dir=Path(generator_dir).resolve(),
            registry=Path(registry).resolve(),
            seed=seed,
            steps=steps,
            decoder_rank=decoder_rank,
            gate=gate,
            manifest=Path(manifest).resolve(),
            site_root=run / "sites",
        ),
        client,
        num_sites=len(sites.site_names),
        run_dir=run,
        client_cpus=config.federated.client_cpus,
    )
