"""A generator is a directory: ``config.json`` + ``*.safetensors`` with the sha256 of each.

Weights are safetensors only: nothing is ever unpickled. ``config.json`` is written last, so a
directory whose ``config.json`` exists is complete; every weight file is checked against its
recorded size and sha256 before loading, and a truncated or altered file is refused by name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from synthct.artifacts import atomic_path, read_json, sha256_file, write_json
from synthct.config import SynthctConfig, config_from_dict
from synthct.models.autoencoder import build_autoencoder
from synthct.models.conditioning import Conditioning
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
]

logger = logging.getLogger(__name__)

_WEIGHT_FILES = {
    "autoencoder": "autoencoder.safetensors",
    "unet": "unet.safetensors",
    "ema": "ema.safetensors",
}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, truncated or altered; the message names the file."""


@dataclass
class Generator:
    """Autoencoder + diffusion UNet (+ its EMA, used for sampling) + latent scale factor."""

    config: SynthctConfig
    autoencoder: nn.Module
    unet: nn.Module
    ema: nn.Module
    scale_factor: float = 1.0

    @property
    def null_class(self) -> int:
        return self.config.labels.num_classes

    @property
    def conditioning(self) -> Conditioning:
        """Class (and site) names -> the UNet's conditioning indices."""
        return conditioning_for(self.config)

    @property
    def renders_sites(self) -> bool:
        """Whether a volume's site changes how it is sampled (site-conditioned UNet) or
        decoded (site-styled autoencoder)."""
        return self.conditioning.site_conditioned or hasattr(self.autoencoder, "site_style")

    def to(self, device: torch.device | str) -> Generator:
        for m in (self.autoencoder, self.unet, self.ema):
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
    return Generator(config, ae, unet, ema)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Atomically write safetensors; return ``{file, sha256, bytes}``."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def load_tensors(
    path: Path, *, sha256: str | None = None, size: int | None = None
) -> dict[str, torch.Tensor]:
    """Read safetensors after checking size and hash (when given)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file missing")
    if size is not None and path.stat().st_size != size:
        raise CheckpointError(
            f"{path}: size {path.stat().st_size} bytes, expected {size} (truncated or altered)"
        )
    if sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match the checkpoint record (altered or corrupt)"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def save_generator(
    gen: Generator,
    directory: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    sampling_only: bool = False,
) -> Path:
    """Write weights then ``config.json`` (the commit marker). Returns the directory.

    ``sampling_only`` keeps the autoencoder and the EMA UNet (what sampling uses) and drops
    the raw UNet: half the size, for shipping; loading then starts the UNet from the EMA.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n in _WEIGHT_FILES if not (sampling_only and n == "unet")]
    files = {
        name: save_tensors(directory / _WEIGHT_FILES[name], getattr(gen, name).state_dict())
        for name in names
    }
    if sampling_only:
        (directory / _WEIGHT_FILES["unet"]).unlink(missing_ok=True)
    payload = {
        "config": gen.config.model_dump(mode="json"),
        "vocabulary": gen.config.labels.classes,
        "vocabulary_hash": gen.config.labels.vocabulary_hash,
        "scale_factor": gen.scale_factor,
        "latent_shape": list(gen.config.latent_shape),
        "files": files,
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


def load_generator(directory: str | Path, device: torch.device | str = "cpu") -> Generator:
    """Rebuild the exact generator saved in ``directory`` (hash-checked)."""
    directory = Path(directory)
    meta_path = directory / "config.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: no generator here (config.json missing)")
    try:
        meta = read_json(meta_path)
        config = config_from_dict(meta["config"], source=str(meta_path))
        files = meta["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable generator record ({exc})") from None
    gen = build_generator(config)
    for name, fname in _WEIGHT_FILES.items():
        record = files.get(name)
        if record is None and name == "unet" and "ema" in files:
            continue  # a sampling-only generator: the UNet starts from the EMA below
        if record is None:
            raise CheckpointError(f"{meta_path}: no record of {fname}")
        path = directory / fname
        state = load_tensors(path, sha256=record["sha256"], size=record["bytes"])
        _load_state(getattr(gen, name), state, path)
    if "unet" not in files:
        gen.unet.load_state_dict(gen.ema.state_dict())
    gen.scale_factor = float(meta["scale_factor"])
    gen.ema.eval().requires_grad_(False)
    return gen.to(device)


def generator_sha256(directory: str | Path) -> str:
    """Identity of a saved generator: the hash of its ``config.json`` (which pins every file)."""
    return sha256_file(Path(directory) / "config.json")
