"""Typed, validated run configuration (YAML -> pydantic).

One config object is passed whole through the data path (nanoGPT style). Every section forbids
unknown keys, so a typo fails before any work starts, with the file, the key path
(``data.sites[2].noise_hu``) and the bad value in one message.
"""

from __future__ import annotations

import copy
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "LabelConfig",
    "SiteProfile",
    "SplitFractions",
    "LesionProfile",
    "DataConfig",
    "AutoencoderConfig",
    "UNetConfig",
    "DiffusionConfig",
    "SamplingConfig",
    "TrainConfig",
    "FaultConfig",
    "DPConfig",
    "SecAggClipNorms",
    "SecAggConfig",
    "FederatedConfig",
    "UtilityRule",
    "DownstreamConfig",
    "PluginConfig",
    "SAMPLERS",
    "SynthctConfig",
    "load_config",
    "packaged_config_path",
]

from synthct.config.base import ConfigError, _Strict
from synthct.config.data import (
    DataConfig,
    LabelConfig,
    LesionProfile,
    SiteProfile,
    SplitFractions,
)
from synthct.config.downstream import DownstreamConfig, PluginConfig, UtilityRule
from synthct.config.models import (
    _LOSS_ONLY,
    SAMPLERS,
    AutoencoderConfig,
    DiffusionConfig,
    SamplingConfig,
    UNetConfig,
)
from synthct.config.training import (
    DPConfig,
    FaultConfig,
    FederatedConfig,
    SecAggClipNorms,
    SecAggConfig,
    TrainConfig,
)


class SynthctConfig(_Strict):
    """A whole run: labels, data and the later stages' sections."""

    seed: int = Field(default=0, ge=0)
    labels: LabelConfig
    data: DataConfig
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    federated: FederatedConfig = FederatedConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    plugins: PluginConfig = PluginConfig()

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """C×X×Y×Z of the latent grid."""
        f = self.autoencoder.downsample
        return (self.autoencoder.latent_channels, *(s // f for s in self.data.shape))

    @model_validator(mode="after")
    def _late_site_is_new(self) -> SynthctConfig:
        late = self.plugins.late_site
        if late is not None and late.name in self.site_names:
            raise _LocatedError(
                ("plugins", "late_site", "name"),
                late.name,
                "the late site must be a site that did not train the generator "
                f"(not one of data.sites: {self.site_names})",
            )
        return self

    @model_validator(mode="after")
    def _patch_fits(self) -> SynthctConfig:
        patch = self.train.ae_patch
        if patch is None:
            return self
        f = self.autoencoder.downsample
        if any(p > s or p % f for p, s in zip(patch, self.data.shape, strict=True)):
            raise _LocatedError(
                ("train", "ae_patch"),
                list(patch),
                f"patches must fit data.shape {list(self.data.shape)} and be multiples of the "
                f"autoencoder's downsampling ({f})",
            )
        return self

    @model_validator(mode="after")
    def _labels_known(self) -> SynthctConfig:
        classes = set(self.labels.classes)
        for i, site in enumerate(self.data.sites):
            for name in site.counts:
                if name not in classes:
                    raise _LocatedError(
                        ("data", "sites", i, "counts", name),
                        name,
                        f"unknown class {name!r} (vocabulary: {self.labels.classes})",
                    )
            for local, target in site.label_map.items():
                if target not in classes:
                    raise _LocatedError(
                        ("data", "sites", i, "label_map", local),
                        target,
                        f"maps to unknown class {target!r} (vocabulary: {self.labels.classes})",
                    )
        for name, scale in self.sampling.class_guidance.items():
            if name not in classes:
                raise _LocatedError(
                    ("sampling", "class_guidance", name),
                    name,
                    f"unknown class {name!r} (vocabulary: {self.labels.classes})",
                )
            if scale < 0:
                raise _LocatedError(
                    ("sampling", "class_guidance", name), scale, "guidance must be >= 0"
                )
        for i, fault in enumerate(self.federated.faults):
            if fault.site not in self.site_names:
                raise _LocatedError(
                    ("federated", "faults", i, "site"),
                    fault.site,
                    f"unknown site (configured: {self.site_names})",
                )
        return self

    def network_mismatch(self, other: SynthctConfig) -> str | None:
        """Why weights trained under ``other`` cannot be used under this config, or None:
        networks, label vocabulary, noise schedule and volume shape must be identical."""
        for section in ("labels", "autoencoder", "unet", "diffusion"):
            loss_only = _LOSS_ONLY.get(section, set())
            mine = getattr(self, section).model_dump(exclude=loss_only)
            if mine != getattr(other, section).model_dump(exclude=loss_only):
                return f"the {section!r} sections differ"
        if self.data.shape != other.data.shape:
            return f"volume shape {other.data.shape} != {self.data.shape}"
        site_aware = self.unet.site_conditioning or self.autoencoder.site_style
        if site_aware and self.site_names != other.site_names:
            return f"site vocabulary {other.site_names} != {self.site_names}"
        return None

    def site(self, name: str) -> SiteProfile:
        for s in self.data.sites:
            if s.name == name:
                return s
        raise KeyError(f"unknown site {name!r}; configured sites: {self.site_names}")

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.data.sites]

    def resolve_label(self, site: str, raw: str) -> str:
        """Map a site's own label to a vocabulary class; an unmapped label is an error."""
        profile = next((s for s in self.data.sites if s.name == site), None)
        if profile is not None and raw in profile.label_map:
            return profile.label_map[raw]
        if raw in self.labels.classes:
            return raw
        raise KeyError(
            f"site {site!r}: label {raw!r} is neither a class {self.labels.classes} "
            f"nor mapped in data.sites[{site}].label_map"
        )


class _LocatedError(ValueError):
    """Raised inside validators to report a precise key path."""

    def __init__(self, loc: tuple[Any, ...], value: Any, message: str) -> None:
        super().__init__(message)
        self.loc, self.value, self.message = loc, value, message


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _lookup(document: Any, loc: tuple[Any, ...]) -> Any:
    node = document
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


PACKAGED_CONFIGS = ("demo", "smoke", "chest64", "chest128")  # chest*: GPU scale


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or a packaged config's name (``demo``, ``smoke``)."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in PACKAGED_CONFIGS:
        return packaged_config_path(str(name_or_path))
    return path


def apply_overrides(document: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``key.path=value`` items (values in YAML syntax) applied onto a config document; the
    result is validated like the file itself, so a bad key or value is named the same way."""
    out = copy.deepcopy(document)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.batch_size=2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section in {source}")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> SynthctConfig:
    """Read and validate a YAML config (a path or a packaged name), with ``--set``-style
    ``overrides``; raise :class:`ConfigError` naming file, key and value."""
    path = resolve_config_path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(PACKAGED_CONFIGS)
        raise ConfigError(f"{path}: config file not found (packaged names: {known})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(document).__name__}")
    source = str(path)
    if overrides:
        document = apply_overrides(document, overrides, source)
        source += " with --set " + " ".join(overrides)
    return config_from_dict(document, source=source)


def config_from_dict(document: dict[str, Any], *, source: str = "<dict>") -> SynthctConfig:
    try:
        return SynthctConfig.model_validate(document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            ctx_error = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _LocatedError):
                loc, value, msg = ctx_error.loc, ctx_error.value, ctx_error.message
            else:
                loc = tuple(p for p in err["loc"] if p not in ("function-after",))
                value = _lookup(document, loc) if err["type"] != "missing" else "<missing>"
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key"
            problems.append(f"{_format_loc(loc)} = {value!r}: {msg}")
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (``demo``, ``smoke``)."""
    resource = files("synthct.configs") / f"{name}.yaml"
    path = Path(str(resource))
    if not path.is_file():
        raise ConfigError(f"no packaged config named {name!r} ({path})")
    return path
