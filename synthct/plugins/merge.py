"""Two ways to use many sites' plugins with one shared generator.

**Fusion** merges parameters: ``W = W0 + sum_i w_i * s_i * B_i A_i`` on every adapted layer
(``s_i = alpha_i / rank_i``; weights from case counts by default), giving an ordinary generator
checkpoint. This equals peft's ``add_weighted_adapter(..., combination_type="cat")`` merged
(peft's ``linear`` averages the A and B factors separately, which is not this sum).

**Mixture** keeps plugins separate and mixes the adapted UNets' predictions at every sampling
step with per-class weights ``pi_i(c)`` proportional to the cases of class ``c`` plugin ``i``'s
site has seen, so a rare class is led by the sites that have it; a class no plugin has seen
falls back to the base UNet (in general the base gets the share ``1 - sum_i pi_i(c)``, which
fitted weights may keep). The classifier-free guidance null branch of a sample uses the
weights of the class that sample asks for, so guidance compares like with like. Each plugin
is merged into its own copy of the UNet once, so a Mixture step costs one base UNet call per
plugin (and the base) that a row mixes, with no LoRA layers to run.

Decoder adapters (a plugin's scanner style) are never averaged, in either mode: a case made for
a site decodes with that site's adapted decoder (:func:`site_decoders`), any other case with the
base decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from synthct.checkpoint import Generator
from synthct.plugins.adapter import (
    PluginError,
    attach_decoder_adapter,
    load_adapter_state,
)
from synthct.plugins.registry import Plugin

__all__ = [
    "plugin_deltas",
    "fuse",
    "merged_unet",
    "MixtureDenoiser",
    "mixture_weights",
    "site_decoders",
    "with_site_decoders",
]

logger = logging.getLogger(__name__)


def plugin_deltas(plugin: Plugin, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per base weight name, the plugin's full-rank update ``s * B A``."""
    scaling = plugin.meta["alpha"] / plugin.meta["rank"]
    deltas = {}
    for module in plugin.meta["target_modules"]:
        a = plugin.state[f"{module}.lora_A.weight"].double()
        b = plugin.state[f"{module}.lora_B.weight"].double()
        weight = base_state[f"{module}.weight"]
        delta = (b.flatten(1) @ a.flatten(1)).view(weight.shape) * scaling
        deltas[f"{module}.weight"] = delta
    return deltas


def case_weights(plugins: list[Plugin]) -> list[float]:
    total = sum(p.cases() for p in plugins)
    if total <= 0:
        return [1.0 / len(plugins)] * len(plugins)
    return [p.cases() / total for p in plugins]


def merged_unet(gen: Generator, plugins: list[Plugin], weights: list[float]) -> torch.nn.Module:
    """A copy of the EMA UNet carrying ``sum_i w_i * delta_i`` in its weights (summed in
    float64): a plain UNet, as fast as the base."""
    base = {k: v.detach().clone() for k, v in gen.ema.state_dict().items()}
    merged = {k: v.double() for k, v in base.items()}
    for plugin, w in zip(plugins, weights, strict=True):
        for name, delta in plugin_deltas(plugin, base).items():
            merged[name] = merged[name] + w * delta.to(merged[name].device)
    unet = copy.deepcopy(gen.ema)
    unet.load_state_dict({k: merged[k].to(base[k].dtype) for k in base})
    return unet


def fuse(gen: Generator, plugins: list[Plugin], weights: list[float] | None = None) -> Generator:
    """A new generator whose (EMA and raw) UNet carries ``sum_i w_i * delta_i``."""
    if not plugins:
        raise PluginError("fusion needs at least one plugin")
    weights = case_weights(plugins) if weights is None else list(weights)
    if len(weights) != len(plugins):
        raise PluginError(f"{len(plugins)} plugins but {len(weights)} weights")
    unet = merged_unet(gen, plugins, weights)
    fused = Generator(
        config=gen.config,
        autoencoder=gen.autoencoder,
        unet=copy.deepcopy(unet),
        ema=unet,
        latent_norm=gen.latent_norm,
        scanner_noise=gen.scanner_noise,
    )
    fused.site_decoders = site_decoders(gen, plugins)
    logger.info("fused %d plugins with weights %s", len(plugins), [round(w, 3) for w in weights])
    return fused


def site_decoders(gen: Generator, plugins: list[Plugin]) -> dict[str, torch.nn.Module]:
    """Per site, the base autoencoder carrying that site's decoder adapter (its scanner's style;
    of several plugins from one site, the last). Decoders are not mixed: a case is made for one
    site and decodes in that site's style; cases for other sites, or pooled, use the base."""
    out: dict[str, torch.nn.Module] = {}
    for plugin in plugins:
        if not plugin.decoder_state:
            continue
        ae = attach_decoder_adapter(
            copy.deepcopy(gen.autoencoder),
            plugin.decoder_rank,
            "site",
            plugin.meta["decoder"].get("target_modules"),
        )
        load_adapter_state(ae, plugin.decoder_state, "site")
        out[plugin.meta["site"]] = ae.eval()
    if out:
        logger.info("decoder adapters for sites %s", sorted(out))
    return out


def with_site_decoders(gen: Generator, plugins: list[Plugin]) -> Generator:
    """``gen`` (same UNet) whose cases for a plugin's site decode with its decoder adapter
    (what Mixture samples with)."""
    return dataclasses.replace(gen, site_decoders=site_decoders(gen, plugins))


def mixture_weights(plugins: list[Plugin], classes: list[str]) -> torch.Tensor:
    """(K+1)×P weights: row c mixes the plugins for class c (rows sum to 1, or are all zero
    when no plugin saw c: then the base UNet answers; in general the base UNet gets what a
    row leaves, ``1 - sum``). Row K (the null class) stays zero: a null branch uses the
    weights of the class it is paired with."""
    w = torch.zeros(len(classes) + 1, len(plugins), dtype=torch.float64)
    for c, name in enumerate(classes):
        seen = torch.tensor([float(p.cases(name)) for p in plugins], dtype=torch.float64)
        if seen.sum() > 0:
            w[c] = seen / seen.sum()
    return w


class MixtureDenoiser:
    """A denoiser for :func:`synthct.sampling.sample_volumes`: mixes the plugins' adapted
    predictions per requested class (see the module docstring)."""

    def __init__(
        self, gen: Generator, plugins: list[Plugin], weights: torch.Tensor | None = None
    ) -> None:
        if not plugins:
            raise PluginError("a mixture needs at least one plugin")
        self.base = gen.ema.eval()
        # each plugin merged into its own copy of the UNet (W0 + s B A): a plugin's prediction
        # then costs what the base UNet's does, with no LoRA layers to run at every step
        self.experts = [merged_unet(gen, [p], [1.0]).eval() for p in plugins]
        self.weights = (
            mixture_weights(plugins, gen.config.labels.classes) if weights is None else weights
        )
        self.calls = 0

    @torch.no_grad()
    def __call__(
        self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, requested: torch.Tensor
    ) -> torch.Tensor:
        w = self.weights.to(z.device)[requested].to(z.dtype)  # N×P, by the class each row is for
        out = torch.zeros_like(z)
        rest = (1 - w.sum(1)).clamp_min(0)  # what the plugins leave to the base UNet
        if (rest > 1e-6).any():
            rows = (rest > 1e-6).nonzero().flatten()
            pred = self.base(z[rows], t[rows], class_labels=labels[rows])
            out[rows] = rest[rows].view(-1, *([1] * (z.dim() - 1))) * pred
            self.calls += 1
        for i, expert in enumerate(self.experts):
            rows = (w[:, i] > 0).nonzero().flatten()
            if len(rows) == 0:
                continue
            pred = expert(z[rows], t[rows], class_labels=labels[rows])
            out[rows] += w[rows, i].view(-1, *([1] * (z.dim() - 1))) * pred
            self.calls += 1
        return out
