"""A generator as a MONAI bundle: ``configs/metadata.json`` + ``configs/inference.json`` +
``models/generator/`` (the hash-checked safetensors checkpoint), runnable by ``monai.bundle``.

    synthct export-bundle --generator RUN --out BUNDLE
    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE --labels "['nodule']"

The inference config instantiates :class:`BundleSampler`, which loads the checkpoint with
:func:`synthct.checkpoint.load_generator` (every file's sha256 checked, never pickle) and writes
each sampled volume as NIfTI in HU on the generator's spacing. Sampling uses the generator's own
inference settings. The bundle needs synthct installed (``required_packages_version``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from synthct import __version__
from synthct.artifacts import atomic_write_text, read_json
from synthct.checkpoint import generator_sha256, load_generator, network_data_format
from synthct.data.volume_io import write_nifti
from synthct.errors import UsageError
from synthct.generator_pipeline import SynthctPipeline
from synthct.sampling import inference_settings

__all__ = ["BUNDLE_SCHEMA", "export_bundle", "BundleSampler"]

logger = logging.getLogger(__name__)

BUNDLE_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20240725.json"
)
_GENERATOR = "models/generator"


def _inference_config(labels: list[str]) -> dict[str, Any]:
    return {
        "imports": ["$import synthct.bundle"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/outputs'",
        "labels": labels,
        "sites": None,
        "seed": 0,
        "device": "cpu",
        "sampler": {
            "_target_": "synthct.bundle.BundleSampler",
            "generator_dir": f"$@bundle_root + '/{_GENERATOR}'",
            "output_dir": "@output_dir",
            "labels": "@labels",
            "sites": "@sites",
            "seed": "@seed",
            "device": "@device",
        },
        "run": ["$@sampler.run()"],
    }


def _metadata(gen, sha: str) -> dict[str, Any]:
    cfg = gen.config
    classes = list(cfg.labels.classes)
    settings = inference_settings(gen, None, None, None)
    return {
        "schema": BUNDLE_SCHEMA,
        "version": __version__,
        "changelog": {__version__: "exported by synthct export-bundle"},
        "monai_version": version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": version("numpy"),
        "required_packages_version": {
            "synthct": __version__,
            "diffusers": version("diffusers"),
            "nibabel": version("nibabel"),
            "safetensors": version("safetensors"),
        },
        "name": "synthct class-conditional CT latent diffusion",
        "task": "Class-conditional (and site-conditional) 3D CT volume synthesis",
        "description": (
            "A latent-diffusion CT generator trained by synthct: a MONAI AutoencoderKL and "
            "DiffusionModelUNet sampled with classifier-free guidance. Synthetic volumes are "
            "for research; gate every cohort (synthct gate) before training on it."
        ),
        "authors": "synthct",
        "copyright": "see the synthct licence",
        "intended_use": "research: class-balanced synthetic cohorts, gated before use",
        "generator_sha256": sha,
        "label_vocabulary": classes,
        "vocabulary_hash": cfg.labels.vocabulary_hash,
        "sites": cfg.site_names if gen.renders_sites else [],
        "spacing_mm": list(cfg.data.spacing_mm),
        "inference_settings": settings,
        "network_data_format": network_data_format(cfg, sites=gen.renders_sites),
    }


def export_bundle(generator_dir: str | Path, out: str | Path) -> Path:
    """Write ``out`` as a MONAI bundle of the generator in ``generator_dir`` (loaded first, so
    a checkpoint whose files fail their hashes is refused, not exported)."""
    generator_dir, out = Path(generator_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; give a new one for the bundle")
    gen = load_generator(generator_dir)
    sha = generator_sha256(generator_dir)
    target = out / _GENERATOR
    target.mkdir(parents=True)
    for name in ["config.json", *(r["file"] for r in _records(generator_dir))]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(generator_dir / name, target / name)
    for name, content in (
        ("metadata.json", _metadata(gen, sha)),
        ("inference.json", _inference_config([gen.config.labels.classes[0]])),
    ):
        atomic_write_text(out / "configs" / name, json.dumps(content, indent=2) + "\n")
    atomic_write_text(
        out / "docs" / "README.md",
        f"# synthct generator {sha[:12]}\n\nClasses: {', '.join(gen.config.labels.classes)}.\n"
        "Sample with `python -m monai.bundle run --config_file configs/inference.json "
        "--meta_file configs/metadata.json --bundle_root . --labels \"['CLASS']\"`.\n"
        "Outputs: NIfTI volumes in HU under `outputs/`.\n",
    )
    logger.info("exported bundle of %s to %s", generator_dir, out)
    return out


def _records(generator_dir: Path) -> list[dict[str, Any]]:
    """Every file the generator's record pins (weights, then component configs)."""
    meta = read_json(generator_dir / "config.json")
    return [*meta["files"].values(), *meta.get("configs", {}).values()]


class BundleSampler:
    """What the bundle's ``sampler`` component is: sample ``labels`` (class names, one volume
    each; ``sites`` the site each is for) and write them as NIfTI into ``output_dir``."""

    def __init__(
        self,
        generator_dir: str | Path,
        output_dir: str | Path,
        labels: Sequence[str],
        *,
        sites: Sequence[str | None] | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        self.generator_dir, self.output_dir = Path(generator_dir), Path(output_dir)
        self.labels, self.seed, self.device = list(labels), int(seed), device
        self.sites = list(sites) if sites is not None else None

    def run(self) -> list[Path]:
        pipe = SynthctPipeline.from_pretrained(self.generator_dir, device=self.device)
        out = pipe(self.labels, sites=self.sites, seed=self.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (name, vol) in enumerate(zip(self.labels, out.volumes, strict=True)):
            path = self.output_dir / f"{name}_seed{self.seed}_{i:04d}.nii.gz"
            write_nifti(path, vol[0].numpy(), out.spacing_mm)
            paths.append(path)
        logger.info("bundle sampled %d volumes into %s", len(paths), self.output_dir)
        return paths
