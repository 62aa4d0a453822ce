"""A generator is a folder laid out per component, as diffusers lays out a pipeline:

    config.json                         the record: training config, vocabulary, latent
                                        normalisation, and the size + sha256 of every file below
    inference.json                      inference defaults (sampler, steps, guidance, ...)
    autoencoder/config.json, model.safetensors
    unet/config.json, model.safetensors the EMA UNet: what sampling uses
    scheduler/scheduler_config.json     the training noise schedule (diffusers' own format)
    noise/scanner_noise.safetensors     each site's scanner noise spectrum, when measured
    training/unet.safetensors, discriminator.safetensors
                                        resume state only (absent from a shipped generator)

Weights are safetensors only: nothing is ever unpickled. ``config.json`` is written last, so a
folder whose ``config.json`` exists is complete; every file is checked against its recorded
size and sha256 before it is used, and a truncated or altered file is refused by name. The
inference defaults live in ``inference.json`` alone (the record's config has no sampling
section), so a command, the demo and a bench sample one generator the same way unless told
otherwise. Folders of the earlier flat layout (``autoencoder.safetensors``, ``ema.safetensors``
beside ``config.json``) still load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from synthct.artifacts import artifact_header, atomic_path, read_json, sha256_file, write_json
from synthct.config import SynthctConfig, config_from_dict
from synthct.errors import SynthctError
from synthct.models.autoencoder import build_autoencoder, build_discriminator
from synthct.models.conditioning import Conditioning
from synthct.models.latent_norm import LatentNorm
from synthct.models.scanner_noise import ScannerNoise
from synthct.models.schedulers import training_scheduler
from synthct.models.unet import build_unet, conditioning_for

__all__ = [
    "CheckpointError",
    "Generator",
    "build_generator",
    "save_generator",
    "load_generator",
    "save_tensors",
    "load_tensors",
    "generator_sha256",
    "generator_config",
    "network_data_format",
    "LAYOUT",
]

logger = logging.getLogger(__name__)

LAYOUT = 2  # 1: flat files beside config.json (read only)
_WEIGHT_FILES = {
    "autoencoder": "autoencoder/model.safetensors",
    "ema": "unet/model.safetensors",  # the EMA UNet is the inference UNet
    "unet": "training/unet.safetensors",  # training only: resumes the raw UNet
    "discriminator": "training/discriminator.safetensors",  # while an adversarial decoder trains
}
_FLAT_FILES = {name: f"{name}.safetensors" for name in _WEIGHT_FILES}  # layout 1
INFERENCE_FILE = "inference.json"
NOISE_FILE = "noise/scanner_noise.safetensors"
SCHEDULER_DIR = "scheduler"


class CheckpointError(SynthctError, ValueError):
    """A checkpoint is missing, incomplete, truncated or altered; the message names the file."""


@dataclass
class Generator:
    """Autoencoder + diffusion UNet (+ its EMA, used for sampling) + latent scale factor
    (+ the decoder phase's patch discriminator while an adversarial decoder trains) (+ each
    site's scanner noise, measured against this autoencoder's reconstructions)."""

    config: SynthctConfig
    autoencoder: nn.Module
    unet: nn.Module
    ema: nn.Module
    latent_norm: LatentNorm = field(default_factory=LatentNorm)
    discriminator: nn.Module | None = None
    scanner_noise: ScannerNoise | None = None
    # site -> an autoencoder whose decoder carries that site's plugin adapter (its scanner's
    # style): cases made for the site decode with it (``synthct.plugins.merge``); never saved
    site_decoders: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return self.config.labels.num_classes

    @property
    def conditioning(self) -> Conditioning:
        """Class (and site) names -> the UNet's conditioning indices."""
        return conditioning_for(self.config)

    @property
    def site_style(self) -> nn.Module | None:
        """The decoder's per-site style (``autoencoder.site_style``), or None."""
        return getattr(self.autoencoder, "site_style", None)

    @property
    def renders_sites(self) -> bool:
        """Whether a volume's site changes how it is sampled (site-conditioned UNet) or
        decoded (site-styled autoencoder)."""
        return self.conditioning.site_conditioned or self.site_style is not None

    def to(self, device: torch.device | str) -> Generator:
        for m in (self.autoencoder, self.unet, self.ema, self.discriminator):
            if m is not None:
                m.to(device)
        return self


def build_generator(config: SynthctConfig, *, seed: int | None = None) -> Generator:
    """Fresh weights from the config (deterministic for ``seed``)."""
    if seed is not None:
        torch.manual_seed(seed)
    ae = build_autoencoder(config.autoencoder, config.site_names)
    unet = build_unet(
        config.unet,
        latent_channels=config.autoencoder.latent_channels,
        num_classes=config.labels.num_classes,
        num_sites=len(config.site_names),
    )
    ema = build_unet(
        config.unet,
        latent_channels=config.autoencoder.latent_channels,
        num_classes=config.labels.num_classes,
        num_sites=len(config.site_names),
    )
    ema.load_state_dict(unet.state_dict())
    ema.eval().requires_grad_(False)
    return Generator(config, ae, unet, ema, discriminator=build_discriminator(config.autoencoder))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Atomically write safetensors; return ``{file, sha256, bytes}``."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _check_file(path: Path, *, sha256: str | None, size: int | None) -> None:
    """Refuse a missing file, or one whose size or sha256 is not the recorded one."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    if size is not None and path.stat().st_size != size:
        raise CheckpointError(
            f"{path}: size {path.stat().st_size} bytes, expected {size} (truncated or altered)"
        )
    if sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match the checkpoint record (altered or corrupt)"
        )


def load_tensors(
    path: Path, *, sha256: str | None = None, size: int | None = None
) -> dict[str, torch.Tensor]:
    """Read safetensors after checking size and hash (when given)."""
    _check_file(path, sha256=sha256, size=size)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def _file_record(directory: Path, relative: str) -> dict[str, Any]:
    path = directory / relative
    return {"file": relative, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def network_data_format(config: SynthctConfig, *, sites: bool) -> dict[str, Any]:
    """What the generator takes and gives, in MONAI bundle terms (``metadata.json``)."""
    inputs: dict[str, Any] = {
        "labels": {
            "type": "string",
            "format": "class name",
            "num_channels": 1,
            "spatial_shape": [],
            "dtype": "str",
            "value_range": list(config.labels.classes),
            "is_patch_data": False,
            "channel_def": {"0": "class"},
        }
    }
    if sites:
        inputs["sites"] = {
            **inputs["labels"],
            "format": "site name (None or 'pooled': site-agnostic)",
            "value_range": list(config.site_names),
            "channel_def": {"0": "site"},
        }
    return {
        "inputs": inputs,
        "outputs": {
            "pred": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": list(config.data.shape),
                "spacing_mm": list(config.data.spacing_mm),
                "dtype": "int16",
                "value_range": list(config.data.hu_window),
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        },
    }


def _component_configs(gen: Generator) -> dict[str, dict[str, Any]]:
    """What each component folder's ``config.json`` says: how to rebuild that network alone."""
    config = gen.config
    return {
        "autoencoder": {
            "builder": "synthct.models.autoencoder.build_autoencoder",
            **config.autoencoder.model_dump(mode="json"),
            "site_names": list(config.site_names),
            "image_shape": list(config.data.shape),
            "latent_shape": list(config.latent_shape),
        },
        "unet": {
            "builder": "synthct.models.unet.build_unet",
            **config.unet.model_dump(mode="json"),
            "latent_channels": config.autoencoder.latent_channels,
            "num_classes": config.labels.num_classes,
            "classes": list(config.labels.classes),
            "num_sites": len(config.site_names),
            "weights": "exponential moving average of the trained UNet",
        },
    }


def save_generator(
    gen: Generator,
    directory: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    sampling_only: bool = False,
) -> Path:
    """Write the component files, then ``config.json`` (the commit marker). Returns the folder.

    ``sampling_only`` keeps the autoencoder and the EMA UNet (what sampling uses) and drops
    the training state (raw UNet, discriminator): half the size, for shipping; loading then
    starts the UNet from the EMA.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    training_only = ("unet", "discriminator") if sampling_only else ()
    names = [n for n in _WEIGHT_FILES if n not in training_only and getattr(gen, n) is not None]
    files = {}
    for name in names:
        path = directory / _WEIGHT_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        files[name] = {
            **save_tensors(path, getattr(gen, name).state_dict()),
            "file": _WEIGHT_FILES[name],
        }
    for name in _WEIGHT_FILES:  # a stale file of an earlier save would look like part of it
        if name not in names:
            (directory / _WEIGHT_FILES[name]).unlink(missing_ok=True)
        (directory / _FLAT_FILES[name]).unlink(missing_ok=True)
    noise = None
    if gen.scanner_noise is not None:
        path = directory / NOISE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = {
            **save_tensors(path, gen.scanner_noise.tensors()),
            "file": NOISE_FILE,
            "cases": gen.scanner_noise.cases,
        }
    else:
        (directory / NOISE_FILE).unlink(missing_ok=True)
    configs = {}
    for name, content in _component_configs(gen).items():
        write_json(directory / name / "config.json", content, kind=f"generator-{name}")
        configs[name] = _file_record(directory, f"{name}/config.json")
    write_json(
        directory / INFERENCE_FILE,
        gen.config.sampling.model_dump(mode="json"),
        kind="generator-inference",
    )
    configs["inference"] = _file_record(directory, INFERENCE_FILE)
    training_scheduler(gen.config.diffusion).save_config(str(directory / SCHEDULER_DIR))
    configs["scheduler"] = _file_record(directory, f"{SCHEDULER_DIR}/scheduler_config.json")
    payload = {
        "layout": LAYOUT,
        "config": gen.config.model_dump(mode="json", exclude={"sampling"}),
        "vocabulary": gen.config.labels.classes,
        "vocabulary_hash": gen.config.labels.vocabulary_hash,
        "latent_norm": gen.latent_norm.to_json(),
        "latent_shape": list(gen.config.latent_shape),
        "scanner_noise": noise,
        "network_data_format": network_data_format(gen.config, sites=gen.renders_sites),
        "files": files,
        "configs": configs,
        **(extra or {}),
    }
    write_json(directory / "config.json", payload, kind="generator")
    logger.info("saved generator to %s", directory)
    return directory


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit the configured model ({exc})") from None


def _recorded_path(directory: Path, record: dict[str, Any], meta_path: Path) -> Path:
    """The file a record names, refused if it would lie outside the generator folder."""
    relative = Path(str(record["file"]))
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{meta_path}: file {relative} lies outside the generator folder")
    return directory / relative


def _read_record(directory: Path) -> tuple[dict[str, Any], SynthctConfig]:
    """The folder's ``config.json`` and the generator config it describes, with the inference
    defaults of its (hash-checked) ``inference.json``; every recorded config file is checked."""
    meta_path = directory / "config.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: no generator here (config.json missing)")
    try:
        meta = read_json(meta_path)
        raw = dict(meta["config"])
        files = meta["files"]
        layout = meta.get("layout", 1)  # 1: flat, no config files pinned
        configs = meta["configs"] if layout >= 2 else {}
        if layout >= 2 and "inference" not in configs:
            raise KeyError("configs.inference")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable generator record ({exc})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{meta_path}: unreadable generator record (files)")
    for record in configs.values():
        path = _recorded_path(directory, record, meta_path)
        _check_file(path, sha256=record.get("sha256"), size=record.get("bytes"))
    if "inference" in configs:
        inference = read_json(_recorded_path(directory, configs["inference"], meta_path))
        raw["sampling"] = {
            k: v for k, v in inference.items() if k not in artifact_header("generator-inference")
        }
    return meta, config_from_dict(raw, source=str(meta_path))


def generator_config(directory: str | Path) -> SynthctConfig:
    """The config of the generator saved in ``directory`` (its inference defaults included),
    without loading its weights."""
    return _read_record(Path(directory))[1]


def load_generator(directory: str | Path, device: torch.device | str = "cpu") -> Generator:
    """Rebuild the exact generator saved in ``directory`` (hash-checked)."""
    directory = Path(directory)
    meta_path = directory / "config.json"
    meta, config = _read_record(directory)
    files = meta["files"]
    gen = build_generator(config)
    for name in _WEIGHT_FILES:
        record = files.get(name)
        if record is None and name == "unet" and "ema" in files:
            continue  # a sampling-only generator: the UNet starts from the EMA below
        if name == "discriminator" and (record is None or gen.discriminator is None):
            continue  # none saved: a fresh one (a first adversarial phase); none configured
        if record is None:
            raise CheckpointError(f"{meta_path}: no record of the {name} weights")
        path = _recorded_path(directory, record, meta_path)
        state = load_tensors(path, sha256=record["sha256"], size=record["bytes"])
        _load_state(getattr(gen, name), state, path)
    if "unet" not in files:
        gen.unet.load_state_dict(gen.ema.state_dict())
    try:
        gen.latent_norm = (
            LatentNorm.from_json(meta["latent_norm"])
            if "latent_norm" in meta
            else LatentNorm(scale=(float(meta["scale_factor"]),))  # saved before per-channel
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable latent normalisation ({exc})") from None
    gen.scanner_noise = _load_scanner_noise(directory, meta.get("scanner_noise"), meta_path, config)
    gen.ema.eval().requires_grad_(False)
    return gen.to(device)


def _load_scanner_noise(
    directory: Path, record: dict[str, Any] | None, meta_path: Path, config: SynthctConfig
) -> ScannerNoise | None:
    """The recorded scanner noise spectra (hash-checked), or None when none were measured."""
    if record is None:
        return None
    try:
        path = _recorded_path(directory, record, meta_path)
        sha256, size, cases = record["sha256"], record["bytes"], record.get("cases", {})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable scanner noise record ({exc})") from None
    tensors = load_tensors(path, sha256=sha256, size=size)
    try:
        noise = ScannerNoise.from_tensors(tensors, cases)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    x, y, z = config.data.shape
    if noise.shape != (x, y, z // 2 + 1):
        raise CheckpointError(
            f"{path}: spectra of shape {noise.shape} do not fit volumes of {config.data.shape}"
        )
    return noise


def generator_sha256(directory: str | Path) -> str:
    """Identity of a saved generator: the hash of its ``config.json`` (which pins every file)."""
    return sha256_file(Path(directory) / "config.json")
