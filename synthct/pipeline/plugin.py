"""The plugin stages: a site trains its LoRA plugin (fresh, or a stale one re-fitted on a new
base), and a generator is put together with a registry's plugins (Fusion merges their
parameters, Mixture mixes their predictions), with merge weights from case counts or fitted
on a few ``train`` cases. ``synthct plugin train`` and ``synthct generate|sample --plugins``
call these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from synthct.checkpoint import Generator, load_generator
from synthct.config import PluginConfig
from synthct.data.dataset import load_cases
from synthct.plugins.adapter import (
    DECODER_PREFIX,
    PluginError,
    export_plugin,
    read_plugin_weights,
    train_site_adapters,
)

__all__ = ["train_plugin", "apply_plugins"]


def train_plugin(
    generator_dir: str | Path,
    manifest: str | Path,
    site: str,
    out: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    rebase_from: str | Path | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[..., Any] | None = None,
) -> Path:
    """Train ``site``'s plugin on its ``train`` cases of ``manifest`` against the generator in
    ``generator_dir`` and export it to ``out``; returns the plugin folder. ``settings``
    overrides the generator's ``plugins`` config (rank, steps, targets, decoder_rank,
    decoder_steps; None values are ignored). ``rebase_from``: a stale plugin of the same site,
    re-fitted from its own weights and settings on this base."""
    generator_dir = Path(generator_dir)
    gen = load_generator(generator_dir)
    chosen = {k: v for k, v in (settings or {}).items() if v is not None}
    cfg = gen.config.plugins.model_copy(update=chosen)
    cases = load_cases(manifest, gen.config, splits=("train",), sites=(site,))
    if len(cases) == 0:
        raise PluginError(f"{manifest}: no train cases of site {site!r}")
    initial, targets, rebased, decoder_initial = None, None, None, None
    if rebase_from is not None:  # a stale plugin re-fitted on this base: its settings, its start
        meta, initial = read_plugin_weights(rebase_from)
        if meta["site"] != site:
            raise PluginError(f"{rebase_from} is site {meta['site']!r}'s plugin, not {site!r}'s")
        decoder_initial = {
            k.removeprefix(DECODER_PREFIX): initial.pop(k)
            for k in list(initial)
            if k.startswith(DECODER_PREFIX)
        } or None
        cfg = cfg.model_copy(
            update=PluginConfig(
                rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"]
            ).model_dump(include={"rank", "alpha", "targets"})
        )
        if decoder_initial:
            cfg = cfg.model_copy(update={"decoder_rank": meta["decoder"]["rank"]})
        targets, rebased = meta["target_modules"], Path(rebase_from).name
    unet, decoder = train_site_adapters(
        gen,
        cases,
        cfg,
        seed=seed,
        device=device,
        progress=progress,
        initial=initial,
        decoder_initial=decoder_initial,
        targets=targets,
    )
    return export_plugin(
        unet,
        out,
        decoder=decoder,
        gen=gen,
        generator_dir=generator_dir,
        site=site,
        cases=cases,
        cfg=cfg,
        targets=targets,
        rebased_from=rebased,
    )


def apply_plugins(
    gen: Generator,
    generator_dir: str | Path,
    registry: str | Path | None,
    *,
    merge: str = "fusion",
    fit_weights: str | Path | None = None,
) -> tuple[Generator, Any, str | None]:
    """``(generator, denoiser or None, provenance note)`` with ``registry``'s plugins applied:
    ``fusion`` merges them into the UNet, ``mixture`` keeps them apart and mixes their
    predictions (the denoiser). Merge weights come from the plugins' case counts, or are
    fitted on ``fit_weights``' ``train`` cases (a manifest)."""
    if registry is None:
        if fit_weights is not None:
            raise PluginError("fitting merge weights needs a plugin registry")
        return gen, None, None
    from synthct.plugins.merge import MixtureDenoiser, fuse, with_site_decoders
    from synthct.plugins.registry import load_plugins

    plugins = load_plugins(registry, gen, Path(generator_dir))
    weights, fitted = None, ""
    if fit_weights is not None:
        from synthct.plugins.fit import fit_fusion_weights, fit_mixture_weights, validation_draws

        draws = validation_draws(gen, load_cases(fit_weights, gen.config))
        fit = (fit_fusion_weights if merge == "fusion" else fit_mixture_weights)(
            gen, plugins, draws
        )
        weights = fit.weights
        fitted = f";fitted={json.dumps(fit.summary())}"
    note = f"{merge}({','.join(p.name for p in plugins)}){fitted}"
    if merge == "fusion":
        return fuse(gen, plugins, None if weights is None else weights.tolist()), None, note
    return with_site_decoders(gen, plugins), MixtureDenoiser(gen, plugins, weights), note
