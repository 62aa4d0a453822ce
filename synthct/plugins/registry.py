"""A plugin registry is a folder: ``registry.json`` (the base generator it serves, a version
and the history of every change) and one sub-folder per accepted plugin. ``add`` checks
everything before accepting: schema, weight hash and size, base generator, label vocabulary,
and that the tensor names and shapes are exactly those the declared adapter has on the base
UNet. Plugins arrive in any order at any time (by file or through a Flower round); each change
bumps the version and is recorded with who sent it, when, for which base and its sha256.

When the base generator moves on (:func:`move_base`), the plugins trained on the old base are
marked **stale**: they stay in the folder, are never merged (loading says which were left out
and why), and come back only re-fitted on the new base (``synthct plugin train --rebase-from``),
which records the stale plugin it replaces. Nothing is ever unpickled (safetensors only).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import Generator, generator_sha256
from synthct.config import PluginConfig
from synthct.plugins.adapter import (
    DECODER_PREFIX,
    READABLE_FORMATS,
    PluginError,
    adapter_state,
    attach_adapter,
    attach_decoder_adapter,
    read_plugin_meta,
    read_plugin_weights,
)

__all__ = [
    "REGISTRY_FORMAT",
    "Plugin",
    "validate_plugin",
    "add_plugin",
    "list_plugins",
    "load_plugins",
    "move_base",
    "read_index",
    "record_refusal",
]

REGISTRY_FORMAT = 2  # 1: base only; 2: version, per-plugin status and history

logger = logging.getLogger(__name__)

_REQUIRED = {
    "plugin_format": int,
    "base_generator_sha256": str,
    "site": str,
    "vocabulary_hash": str,
    "classes_seen": dict,
    "rank": int,
    "alpha": (int, float),
    "targets": str,
    "target_modules": list,
    "tensors": dict,
    "weights_sha256": str,
    "weights_bytes": int,
}


@dataclass
class Plugin:
    """An accepted plugin: its metadata and adapter tensors (``state``: the UNet's;
    ``decoder_state``: the decoder's, empty for a UNet-only plugin)."""

    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    path: Path
    decoder_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def decoder_rank(self) -> int:
        return int(self.meta.get("decoder", {}).get("rank", 0))

    @property
    def name(self) -> str:
        return f"{self.meta['site']}-{self.meta['weights_sha256'][:12]}"

    @property
    def config(self) -> PluginConfig:
        return PluginConfig(
            rank=self.meta["rank"], alpha=self.meta["alpha"], targets=self.meta["targets"]
        )

    def cases(self, label: str | None = None) -> int:
        seen = self.meta["classes_seen"]
        return int(seen.get(label, 0)) if label is not None else int(sum(seen.values()))


def validate_plugin(plugin_dir: str | Path, gen: Generator, generator_dir: str | Path) -> Plugin:
    """Every check a registry makes; returns the plugin or raises ``PluginError`` with why."""
    plugin_dir = Path(plugin_dir)
    meta = read_plugin_meta(plugin_dir)
    where = plugin_dir / "plugin.json"
    for key, kind in _REQUIRED.items():
        if key not in meta:
            raise PluginError(f"{where}: missing field {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise PluginError(f"{where}: field {key!r} has the wrong type")
    if meta["plugin_format"] not in READABLE_FORMATS:
        raise PluginError(
            f"{where}: plugin format {meta['plugin_format']} (this synthct reads "
            f"{', '.join(map(str, READABLE_FORMATS))})"
        )
    base = generator_sha256(generator_dir)
    if meta["base_generator_sha256"] != base:
        raise PluginError(
            f"{where}: trained on base generator {meta['base_generator_sha256'][:12]}, "
            f"this registry serves {base[:12]}"
        )
    if meta["vocabulary_hash"] != gen.config.labels.vocabulary_hash:
        raise PluginError(f"{where}: label vocabulary differs from the base generator's")
    unknown = set(meta["classes_seen"]) - set(gen.config.labels.classes)
    if unknown:
        raise PluginError(f"{where}: unknown classes {sorted(unknown)}")
    _, everything = read_plugin_weights(plugin_dir, meta)
    weights = plugin_dir / "plugin.safetensors"
    state = {k: v for k, v in everything.items() if not k.startswith(DECODER_PREFIX)}
    decoder_state = {
        k.removeprefix(DECODER_PREFIX): v
        for k, v in everything.items()
        if k.startswith(DECODER_PREFIX)
    }
    try:
        cfg = PluginConfig(rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"])
    except ValueError as exc:
        raise PluginError(f"{where}: bad adapter settings: {exc}") from None
    probe = attach_adapter(copy.deepcopy(gen.ema), cfg, "probe", targets=meta["target_modules"])
    expected = {k: tuple(v.shape) for k, v in adapter_state(probe, "probe").items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        extra = sorted(set(got) - set(expected))[:3]
        missing = sorted(set(expected) - set(got))[:3]
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:3]
        raise PluginError(
            f"{weights}: tensors do not fit the base UNet (unexpected {extra}, missing {missing}, "
            f"wrong shape {wrong})"
        )
    _check_decoder_adapter(meta, decoder_state, gen, weights)
    return Plugin(meta, state, plugin_dir, decoder_state)


def _check_decoder_adapter(
    meta: dict[str, Any], state: dict[str, torch.Tensor], gen: Generator, weights: Path
) -> None:
    """A decoder adapter's tensors must be exactly those its declared rank and targets make on
    the base's decoder; a plugin that declares none must carry none."""
    declared = meta.get("decoder")
    if declared is None:
        if state:
            raise PluginError(f"{weights}: decoder tensors but plugin.json declares no decoder")
        return
    if not isinstance(declared, dict) or not isinstance(declared.get("rank"), int):
        raise PluginError(f"{weights.parent / 'plugin.json'}: field 'decoder' is malformed")
    probe = attach_decoder_adapter(
        copy.deepcopy(gen.autoencoder), declared["rank"], "probe", declared.get("target_modules")
    )
    expected = {k: tuple(v.shape) for k, v in adapter_state(probe, "probe").items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise PluginError(
            f"{weights}: decoder tensors do not fit the base decoder (unexpected "
            f"{sorted(set(got) - set(expected))[:3]}, missing {sorted(set(expected) - set(got))[:3]})"
        )


def _plugin_dirs(registry: Path) -> list[Path]:
    return sorted(p for p in registry.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_index(registry: str | Path) -> dict[str, Any]:
    """``registry.json`` as format 2 (a format-1 index, base only, is read as version 0 with
    every plugin folder active)."""
    registry = Path(registry)
    path = registry / "registry.json"
    if not path.is_file():
        raise PluginError(f"{registry}: not a plugin registry (no registry.json)")
    try:
        index = read_json(path)
    except (OSError, ValueError) as exc:
        raise PluginError(f"{path}: unreadable: {exc}") from None
    if not isinstance(index.get("base_generator_sha256"), str):
        raise PluginError(f"{path}: no base_generator_sha256")
    if "plugins" not in index:  # format 1
        plugins = {}
        for sub in _plugin_dirs(registry):
            meta = read_plugin_meta(sub)
            plugins[sub.name] = {
                "site": meta.get("site"),
                "sha256": meta.get("weights_sha256"),
                "base": meta.get("base_generator_sha256"),
                "added": meta.get("created"),
                "by": "file",
                "status": "active",
                "version": 0,
            }
        index = {**index, "version": 0, "plugins": plugins, "history": []}
    return index


def _write_index(registry: Path, index: dict[str, Any], event: dict[str, Any]) -> None:
    """Bump the version, append ``event`` to the history and write ``registry.json``."""
    index = {k: v for k, v in index.items() if k not in ("kind", "format_version", "versions")}
    index["version"] = int(index.get("version", 0)) + 1
    index["history"] = [
        *index.get("history", []),
        {"version": index["version"], "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **event},
    ]
    index["registry_format"] = REGISTRY_FORMAT
    write_json(registry / "registry.json", index, kind="synthct-plugin-registry")


def add_plugin(
    registry: str | Path,
    plugin_dir: str | Path,
    gen: Generator,
    generator_dir: str | Path,
    *,
    by: str = "file",
    acceptance: dict[str, Any] | None = None,
) -> Plugin:
    """Validate and copy a plugin into the registry (created for this base if new); ``by``
    says how it arrived (a file, or the Flower node that sent it); ``acceptance``: the quality
    decision that let it in, recorded with it. A plugin re-fitted from a stale one
    (``rebased_from`` in its plugin.json) retires that one."""
    registry = Path(registry)
    base = generator_sha256(generator_dir)
    index = _index_for(registry, base)
    plugin = validate_plugin(plugin_dir, gen, generator_dir)
    target = registry / plugin.name
    if target.exists() or plugin.name in index["plugins"]:
        raise PluginError(f"{registry}: plugin {plugin.name} is already registered")
    registry.mkdir(parents=True, exist_ok=True)
    tmp = registry / f".{plugin.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("plugin.json", "plugin.safetensors"):
        shutil.copy2(Path(plugin_dir) / name, tmp / name)
    tmp.replace(target)
    version = int(index.get("version", 0)) + 1
    index["plugins"][plugin.name] = {
        "site": plugin.meta["site"],
        "sha256": plugin.meta["weights_sha256"],
        "base": base,
        "added": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "by": by,
        "status": "active",
        "version": version,
        **({"acceptance": acceptance} if acceptance is not None else {}),
    }
    event = {"event": "added", "plugin": plugin.name, "site": plugin.meta["site"], "by": by}
    old = plugin.meta.get("rebased_from")
    if old is not None:  # it may retire only a stale plugin of its own site
        entry = index["plugins"].get(old) if isinstance(old, str) else None
        if entry is None or entry["status"] != "stale" or entry["site"] != plugin.meta["site"]:
            shutil.rmtree(target, ignore_errors=True)
            raise PluginError(
                f"{plugin_dir}: rebased_from {old!r} is not a stale plugin of site "
                f"{plugin.meta['site']!r} in {registry}"
            )
        entry.update(status="rebased", replaced_by=plugin.name)
        event["replaces"] = old
    try:
        _write_index(registry, index, event)
    except BaseException:  # an unlisted folder would make the registry refuse every load
        shutil.rmtree(target, ignore_errors=True)
        raise
    logger.info(
        "registered plugin %s (%d bytes, by %s)", plugin.name, plugin.meta["weights_bytes"], by
    )
    return Plugin(plugin.meta, plugin.state, target, plugin.decoder_state)


def _index_for(registry: Path, base: str) -> dict[str, Any]:
    """The registry's index if it serves ``base`` (a new one if there is none)."""
    if not (registry / "registry.json").is_file():
        return {"base_generator_sha256": base, "version": 0, "plugins": {}, "history": []}
    index = read_index(registry)
    served = index["base_generator_sha256"]
    if served != base:
        raise PluginError(
            f"{registry} serves base generator {served[:12]}, not {base[:12]} "
            "(move the registry to the new base first: synthct plugin move-base)"
        )
    return index


def record_refusal(
    registry: str | Path, plugin: Plugin, generator_dir: str | Path, *, by: str, decision: dict
) -> None:
    """Write down a plugin the quality check refused (its name, site, sha256, who sent it and
    the numbers that refused it); nothing is added."""
    registry = Path(registry)
    index = _index_for(registry, generator_sha256(generator_dir))
    registry.mkdir(parents=True, exist_ok=True)
    _write_index(
        registry,
        index,
        {
            "event": "refused",
            "plugin": plugin.name,
            "site": plugin.meta["site"],
            "sha256": plugin.meta["weights_sha256"],
            "by": by,
            "decision": decision,
        },
    )
    logger.warning("refused plugin %s of %s: %s", plugin.name, plugin.meta["site"], decision)


def move_base(registry: str | Path, generator_dir: str | Path) -> list[str]:
    """Serve a new base generator: every plugin trained on another base becomes stale (kept,
    never merged, until re-fitted on the new base). Returns the names marked stale."""
    registry = Path(registry)
    index = read_index(registry)
    new = generator_sha256(generator_dir)
    old = index["base_generator_sha256"]
    if new == old:
        return []
    stale = []
    for name, entry in index["plugins"].items():
        if entry["status"] == "active" and entry.get("base") != new:
            entry["status"] = "stale"
            stale.append(name)
    index["base_generator_sha256"] = new
    _write_index(registry, index, {"event": "base moved", "from": old, "to": new, "stale": stale})
    logger.warning(
        "registry %s now serves base %s; %d plugin(s) stale until re-fitted: %s",
        registry,
        new[:12],
        len(stale),
        ", ".join(stale) or "none",
    )
    return stale


def _gated(entry: dict[str, Any]) -> bool:
    """Whether a registry entry came in through the gate (its recorded acceptance says so)."""
    return bool(entry.get("acceptance", {}).get("gated"))


def list_plugins(registry: str | Path) -> list[dict[str, Any]]:
    """Metadata and registry status of the plugins, oldest first."""
    registry = Path(registry)
    if not registry.is_dir():
        raise PluginError(f"{registry}: no plugin registry there (not a folder)")
    entries = read_index(registry)["plugins"] if (registry / "registry.json").is_file() else {}
    rows = []
    for sub in _plugin_dirs(registry):
        meta = read_plugin_meta(sub)
        entry = entries.get(sub.name, {})
        rows.append(
            {
                "name": sub.name,
                **{
                    k: meta[k]
                    for k in ("site", "rank", "targets", "classes_seen", "weights_bytes", "created")
                },
                "status": entry.get("status", "unregistered"),
                "gated": _gated(entry),
                "by": entry.get("by"),
                "version": entry.get("version"),
                **({"replaced_by": entry["replaced_by"]} if "replaced_by" in entry else {}),
            }
        )
    return sorted(rows, key=lambda r: r["created"])


def load_plugins(registry: str | Path, gen: Generator, generator_dir: str | Path) -> list[Plugin]:
    """Every active plugin, re-validated (a file changed after registration is refused).
    Stale and retired plugins are left out and named in a warning, never merged silently."""
    registry = Path(registry)
    index = read_index(registry)
    served = index["base_generator_sha256"]
    base = generator_sha256(generator_dir)
    if served != base:
        raise PluginError(
            f"{registry} serves base generator {served[:12]}, not {base[:12]}: merge with the "
            "base it serves, or move it (synthct plugin move-base)"
        )
    left_out = {n: e["status"] for n, e in index["plugins"].items() if e["status"] != "active"}
    unknown = [p.name for p in _plugin_dirs(registry) if p.name not in index["plugins"]]
    if unknown:
        raise PluginError(f"{registry}: plugin folders not in registry.json: {unknown}")
    if left_out:
        logger.warning(
            "registry %s: left out %s (trained on an older base; re-fit with "
            "synthct plugin train --rebase-from)",
            registry,
            ", ".join(f"{n} ({s})" for n, s in sorted(left_out.items())),
        )
    active = {n: e for n, e in index["plugins"].items() if e["status"] == "active"}
    why = {n: e.get("acceptance", {}).get("why") for n, e in active.items() if not _gated(e)}
    if why:  # a recorded reason means someone vouched for it; none: provenance unknown
        logger.log(
            logging.INFO if all(why.values()) else logging.WARNING,
            "registry %s: not judged by the gate: %s; the cohorts made with them are still "
            "gated before any use",
            registry,
            "; ".join(f"{n} ({w or 'no acceptance recorded'})" for n, w in sorted(why.items())),
        )
    plugins = [validate_plugin(registry / name, gen, generator_dir) for name in active]
    if not plugins:
        why = f" ({len(left_out)} stale or retired)" if left_out else ""
        raise PluginError(f"{registry}: no active plugins registered{why}")
    return plugins
