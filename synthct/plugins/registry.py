"""A plugin registry is a folder: ``registry.json`` (the base generator it serves) and one
sub-folder per accepted plugin. ``add`` checks everything before accepting: schema, weight
hash and size, base generator, label vocabulary, and that the tensor names and shapes are
exactly those the declared adapter has on the base UNet. Plugins arrive in any order at any
time; nothing is ever unpickled (safetensors only).
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from synthct.artifacts import read_json, sha256_bytes, write_json
from synthct.checkpoint import Generator, generator_sha256
from synthct.config import PluginConfig
from synthct.plugins.adapter import (
    PLUGIN_FORMAT,
    PluginError,
    adapter_state,
    attach_adapter,
    read_plugin_meta,
)

__all__ = ["Plugin", "validate_plugin", "add_plugin", "list_plugins", "load_plugins"]

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
    """An accepted plugin: its metadata and adapter tensors."""

    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    path: Path

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
    if meta["plugin_format"] != PLUGIN_FORMAT:
        raise PluginError(
            f"{where}: plugin format {meta['plugin_format']} (this synthct reads {PLUGIN_FORMAT})"
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
    weights = plugin_dir / "plugin.safetensors"
    if not weights.is_file():
        raise PluginError(f"{plugin_dir}: no plugin.safetensors")
    data = weights.read_bytes()
    if len(data) != meta["weights_bytes"] or sha256_bytes(data) != meta["weights_sha256"]:
        raise PluginError(f"{weights}: sha256/size do not match plugin.json (altered or truncated)")
    try:
        state = load_bytes(data)
    except SafetensorError as exc:
        raise PluginError(f"{weights}: not a safetensors file: {exc}") from None
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
    return Plugin(meta, state, plugin_dir)


def add_plugin(
    registry: str | Path, plugin_dir: str | Path, gen: Generator, generator_dir: str | Path
) -> Plugin:
    """Validate and copy a plugin into the registry (created for this base if new)."""
    registry = Path(registry)
    index = registry / "registry.json"
    base = generator_sha256(generator_dir)
    if index.is_file():
        served = read_json(index)["base_generator_sha256"]
        if served != base:
            raise PluginError(f"{registry} serves base generator {served[:12]}, not {base[:12]}")
    plugin = validate_plugin(plugin_dir, gen, generator_dir)
    target = registry / plugin.name
    if target.exists():
        raise PluginError(f"{registry}: plugin {plugin.name} is already registered")
    registry.mkdir(parents=True, exist_ok=True)
    if not index.is_file():
        write_json(index, {"base_generator_sha256": base}, kind="synthct-plugin-registry")
    tmp = registry / f".{plugin.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("plugin.json", "plugin.safetensors"):
        shutil.copy2(Path(plugin_dir) / name, tmp / name)
    tmp.replace(target)
    logger.info("registered plugin %s (%d bytes)", plugin.name, plugin.meta["weights_bytes"])
    return Plugin(plugin.meta, plugin.state, target)


def list_plugins(registry: str | Path) -> list[dict[str, Any]]:
    """Metadata of the registered plugins, oldest first."""
    registry = Path(registry)
    if not registry.is_dir():
        raise PluginError(f"{registry}: no plugin registry there (not a folder)")
    rows = []
    for sub in sorted(p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = read_plugin_meta(sub)
        rows.append(
            {
                "name": sub.name,
                **{
                    k: meta[k]
                    for k in ("site", "rank", "targets", "classes_seen", "weights_bytes", "created")
                },
            }
        )
    return sorted(rows, key=lambda r: r["created"])


def load_plugins(registry: str | Path, gen: Generator, generator_dir: str | Path) -> list[Plugin]:
    """Every registered plugin, re-validated (a file changed after registration is refused)."""
    registry = Path(registry)
    if not (registry / "registry.json").is_file():
        raise PluginError(f"{registry}: not a plugin registry (no registry.json)")
    plugins = [
        validate_plugin(sub, gen, generator_dir)
        for sub in sorted(
            p for p in registry.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    ]
    if not plugins:
        raise PluginError(f"{registry}: no plugins registered")
    return plugins
