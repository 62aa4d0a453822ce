"""A hospital that joins late: its plugin, accepted into a registry, and what it changes in its
own scanner's style.

The late site (``plugins.late_site``) trained nothing of the shared generator. Its phantoms are
rendered with its own scanner; it trains a plugin on its ``train`` cases (a LoRA adapter on the
frozen UNet and, with ``plugins.decoder_rank``, one on the decoder), exports it, and the
registry validates and accepts it. Before and after: the base generator's cases for classes the
site has (site-agnostic: the base has never seen it) against the same cases made for the site by
the base with the plugin fused in, each scored by the class-matched radiomics KID to the site's
own ``holdout`` scans (the gate's fidelity measure: its scanner style) and by the reference
classifier (the class still means what it says). A config without a late site falls back to
the site with the most rare-class cases (no style comparison: the base already saw it).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthct.checkpoint import Generator, load_generator
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.data.preprocess import hu_to_model, model_to_hu
from synthct.eval.distribution import class_matched_kid
from synthct.eval.features import radiomics_features
from synthct.plugins.adapter import export_plugin, train_site_adapters
from synthct.plugins.merge import fuse
from synthct.plugins.registry import add_plugin, load_plugins
from synthct.reference import ReferenceModel, evaluate_classifier
from synthct.sampling import sample_volumes

__all__ = ["late_site_plugin"]

logger = logging.getLogger(__name__)

SAMPLES_PER_CLASS = 4


def _rare_class(config: SynthctConfig) -> int:
    """Index of the first rare class (the last class if none is marked rare)."""
    labels = config.labels
    return labels.index(labels.rare[0] if labels.rare else labels.classes[-1])


def _site_cases(
    config: SynthctConfig, manifest: Path, run: Path
) -> tuple[str, CaseSet, CaseSet | None, bool]:
    """(site, its train cases, its holdout cases, whether it is a late joiner)."""
    late = config.plugins.late_site
    if late is None:
        rare = _rare_class(config)
        cases = load_cases(manifest, config, splits=("train",))
        counts = Counter(
            s for s, y in zip(cases.sites, cases.labels.tolist(), strict=True) if y == rare
        )
        site = max(config.site_names, key=lambda name: counts[name])  # first one on ties
        own = cases.subset([i for i, s in enumerate(cases.sites) if s == site])
        return site, own, None, False
    from synthct.data.phantoms import write_phantom_sites

    world = config.model_copy(
        update={"data": config.data.model_copy(update={"sites": [late], "test_per_class": 0})}
    )
    late_manifest = run / "late_site" / "manifest.csv"
    if not late_manifest.is_file():
        write_phantom_sites(world, run / "late_site")
    train = load_cases(late_manifest, world, splits=("train",))
    holdout = load_cases(late_manifest, world, splits=("holdout",))
    return late.name, train, holdout, True


def _arm(
    gen: Generator,
    labels: torch.Tensor,
    sites: list[str] | None,
    reference: ReferenceModel,
    config: SynthctConfig,
    seed: int,
    style: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One generator's samples, scored: conditional accuracy and (late site) radiomics KID."""
    hu = sample_volumes(gen, labels, generator=torch.Generator().manual_seed(seed), sites=sites)
    acc = evaluate_classifier(
        reference.predict(hu_to_model(hu, config.data.hu_window)),
        labels,
        config.labels.num_classes,
    )
    out: dict[str, Any] = {
        "mean": round(acc["balanced_accuracy"], 3),
        "per_class": {
            config.labels.classes[c]: round(v, 3) for c, v in acc["per_class_recall"].items()
        },
    }
    if style is not None:  # the gate's radiomics fidelity, against the site's own scans
        real_f, real_y, scale = style
        kid = class_matched_kid(radiomics_features(hu), labels.numpy(), real_f, real_y, scale)
        out["kid_radiomics_to_site"] = round(kid, 3)
    return out, hu


def late_site_plugin(
    manifest: Path,
    config: SynthctConfig,
    run: Path,
    reference: ReferenceModel,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress=None,  # noqa: ANN001 - a synthct.progress bar factory (name, total) -> update
) -> dict[str, Any]:
    """The late site's plugin on the run's generator (``RUN/generator``): trained, exported to
    ``RUN/plugins/<site>``, accepted into ``RUN/plugins/registry``, and scored before/after."""
    from synthct.fed.payload import tensors_to_bytes

    gen_dir = run / "generator"
    gen = load_generator(gen_dir)
    site, own, holdout, late = _site_cases(config, manifest, run)
    cfg = config.plugins
    start = time.perf_counter()
    unet, decoder = train_site_adapters(gen, own, cfg, seed=seed, device=device, progress=progress)
    train_s = time.perf_counter() - start
    plugin_dir = export_plugin(
        unet,
        run / "plugins" / site,
        gen=gen,
        generator_dir=gen_dir,
        site=site,
        cases=own,
        cfg=cfg,
        decoder=decoder,
    )
    registry = run / "plugins" / "registry"
    shutil.rmtree(registry, ignore_errors=True)  # the demo's own registry, rebuilt on a rerun
    why = "the demo's late-site stage: compared with the base on the site's holdout, not gated"
    add_plugin(
        registry,
        plugin_dir,
        gen,
        gen_dir,
        acceptance={"gated": False, "accepted": True, "why": why},
    )
    plugins = load_plugins(registry, gen, gen_dir)
    labels_cfg = gen.config.labels
    rare = _rare_class(config)
    seen = sorted(set(own.labels.tolist()))  # the classes the site has
    labels = torch.tensor(seen).repeat_interleave(SAMPLES_PER_CLASS)
    unet_bytes = len(tensors_to_bytes(dict(gen.ema.state_dict())))
    decoder_bytes = len(tensors_to_bytes(dict(gen.autoencoder.decoder.state_dict())))
    result: dict[str, Any] = {
        "site": site,
        "late_joiner": late,
        "rare_class": labels_cfg.classes[rare],
        "train_s": round(train_s, 1),
        "plugin_bytes": int(plugins[0].meta["weights_bytes"]),
        "unet_update_bytes": unet_bytes,
        "generator_update_bytes": unet_bytes + decoder_bytes,
        "rank": cfg.rank,
        "decoder_rank": cfg.decoder_rank if decoder is not None else 0,
        "targets": cfg.targets,
        "steps": cfg.steps,
    }
    result["share_of_unet_update"] = round(result["plugin_bytes"] / result["unet_update_bytes"], 4)
    result["share_of_generator_update"] = round(
        result["plugin_bytes"] / result["generator_update_bytes"], 4
    )
    style = None
    if holdout is not None and len(holdout):
        window = config.data.hu_window
        others = load_cases(manifest, config, splits=("holdout",)).images
        style = (
            radiomics_features(model_to_hu(holdout.images, window)),
            holdout.labels.numpy(),
            radiomics_features(model_to_hu(torch.cat([others, holdout.images]), window)),
        )
    # base: what the shared generator makes for a site it never saw (site-agnostic); after: the
    # same classes made for the site with its plugin fused in (its decoder renders its style)
    base, base_hu = _arm(gen, labels, None, reference, config, seed, style)
    fused, hu = _arm(
        fuse(gen, plugins), labels, [site] * len(labels), reference, config, seed, style
    )
    result["base"], result["fusion"] = base, fused
    shown = rare if rare in seen else seen[-1]  # the montages' class
    result["samples"] = hu[labels == shown][:3, 0].numpy()
    result["base_samples"] = base_hu[labels == shown][:3, 0].numpy()
    if holdout is not None:
        real = holdout.images[holdout.labels == shown][:3]
        result["real_samples"] = model_to_hu(real, config.data.hu_window)[:, 0].numpy()
    logger.info("late site %s: plugin %d bytes, %s", site, result["plugin_bytes"], fused)
    return result
