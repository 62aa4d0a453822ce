"""A site's plugin: a peft LoRA adapter on the frozen shared diffusion UNet, trained on the
site's own latents, and optionally one on the frozen decoder, trained to reconstruct the site's
own scans; exported as ``plugin.safetensors`` + ``plugin.json``.

UNet targets are 3x3x3 ``Conv3d`` and ``Linear`` leaves (``conv+linear``) or only the attention
and time-embedding linears (``attention+time``); 1x1x1 convolutions are left out (peft cannot
merge them). The decoder adapter (``plugins.decoder_rank`` > 0) wraps the decoder's 3x3x3
convolutions: a scanner's noise, kernel and HU calibration are what a decoder renders, and a
UNet-only adapter cannot express what the shared decoder erases. Its tensors are stored under
``autoencoder/`` in the same file. A plugin is kilobytes to a few MB where a full update is the
whole model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft import set_peft_model_state_dict as _set_state
from torch import nn

from synthct.artifacts import atomic_write_bytes, read_json, sha256_bytes, write_json
from synthct.checkpoint import Generator, generator_sha256
from synthct.config import PluginConfig
from synthct.data.dataset import CaseSet
from synthct.errors import SynthctError
from synthct.models.schedulers import training_scheduler
from synthct.training import BalancedSampler, diffusion_step, encode_latents

__all__ = [
    "PLUGIN_FORMAT",
    "PluginError",
    "lora_targets",
    "attach_adapter",
    "adapter_state",
    "train_plugin",
    "train_decoder_adapter",
    "train_site_adapters",
    "decoder_targets",
    "attach_decoder_adapter",
    "DECODER_PREFIX",
    "export_plugin",
    "write_plugin",
    "read_plugin_weights",
    "coarsen",
]

logger = logging.getLogger(__name__)

PLUGIN_FORMAT = 2  # 2: may carry a decoder adapter (``decoder`` in plugin.json)
READABLE_FORMATS = (1, 2)
DECODER_PREFIX = "autoencoder/"  # decoder adapter tensors in plugin.safetensors


class PluginError(SynthctError, ValueError):
    """A plugin cannot be used; the message names it and the reason."""


def lora_targets(unet: nn.Module, targets: str) -> list[str]:
    """Module names a LoRA adapter wraps in ``unet``."""
    names = []
    for name, module in unet.named_modules():
        if targets == "conv+linear":
            ok = isinstance(module, nn.Linear) or (
                isinstance(module, nn.Conv3d) and module.kernel_size != (1, 1, 1)
            )
        elif targets == "attention+time":
            ok = isinstance(module, nn.Linear) and (".attn." in name or "time_emb" in name)
        else:
            raise PluginError(f"unknown plugin targets {targets!r}")
        if ok:
            names.append(name)
    return names


def decoder_targets(autoencoder: nn.Module) -> list[str]:
    """The decoder's 3x3x3 convolutions (what a decoder adapter wraps)."""
    return [
        name
        for name, module in autoencoder.named_modules()
        if name.startswith("decoder.")
        and isinstance(module, nn.Conv3d)
        and module.kernel_size != (1, 1, 1)
    ]


def attach_decoder_adapter(
    autoencoder: nn.Module, rank: int, name: str, targets: list[str] | None = None
) -> nn.Module:
    """Inject a LoRA adapter of ``rank`` (scale 1) on ``autoencoder``'s decoder, in place."""
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets or decoder_targets(autoencoder),
        lora_dropout=0.0,
    )
    return inject_adapter_in_model(lora, autoencoder, adapter_name=name)


def attach_adapter(
    unet: nn.Module, cfg: PluginConfig, name: str, targets: list[str] | None = None
) -> nn.Module:
    """Inject a LoRA adapter called ``name`` into ``unet`` (in place; B starts at zero)."""
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=targets or lora_targets(unet, cfg.targets),
        lora_dropout=0.0,
    )
    return inject_adapter_in_model(lora, unet, adapter_name=name)


def adapter_state(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed without the adapter name (what a plugin file holds)."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()
    }


def load_adapter_state(unet: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    result = _set_state(unet, state, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise PluginError(f"adapter {name!r}: tensors not in the model: {missing[:3]}")


def coarsen(n: int) -> int:
    """Counts leave a site rounded down to a multiple of 5 (1-4 -> 1: 'has a few')."""
    return 0 if n <= 0 else max(1, (n // 5) * 5)


def _adapted_copy(
    module: nn.Module,
    attach: Callable[[nn.Module], Any],
    initial: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> tuple[nn.Module, list[nn.Parameter]]:
    """A frozen copy of ``module`` on ``device`` with the adapter ``attach`` injects (named
    ``plugin``; from ``initial`` tensors if given) and the adapter's parameters, trainable."""
    copied = copy.deepcopy(module).to(device)
    copied.requires_grad_(False)
    attach(copied)
    if initial is not None:
        load_adapter_state(copied, {k: v.to(device) for k, v in initial.items()}, "plugin")
    params = [p for n, p in copied.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return copied, params


def train_plugin(
    gen: Generator,
    cases: CaseSet,
    cfg: PluginConfig,
    *,
    seed: int = 0,
    batch_size: int = 4,
    progress: Callable[..., None] | None = None,
    device: torch.device | str = "cpu",
    initial: dict[str, torch.Tensor] | None = None,
    targets: list[str] | None = None,
) -> nn.Module:
    """LoRA-adapt a copy of the generator's EMA UNet on ``cases`` (base weights frozen), on
    ``device``; the adapted UNet comes back on CPU (exported from there). ``initial``: start
    from these adapter tensors (a stale plugin re-fitted on a new base) instead of zero."""
    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet, params = _adapted_copy(
        gen.ema, lambda m: attach_adapter(m, cfg, "plugin", targets=targets), initial, device
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    ae = copy.deepcopy(gen.autoencoder).to(device).eval()
    z0 = gen.latent_norm.apply(encode_latents(ae, cases.images.to(device)))
    del ae
    scheduler = training_scheduler(gen.config.diffusion)
    sampler = BalancedSampler(cases.labels, balanced=True, generator=generator)
    # a late site is not in the generator's site vocabulary: it adapts the null-site branch
    sites = gen.conditioning.site_indices(cases.sites, unknown_as_null=True)
    for step in range(cfg.steps):
        idx = sampler(batch_size)
        out = diffusion_step(
            unet,
            optimizer,
            z0[idx],
            cases.labels[idx].to(device),
            scheduler,
            gen.config.diffusion,
            conditioning=gen.conditioning,
            sites=None if sites is None else sites[idx],
            generator=generator,
        )
        if progress is not None:
            progress(step + 1, cfg.steps, loss=out["loss"])
    unet.eval()
    return unet.cpu()


def train_decoder_adapter(
    gen: Generator,
    cases: CaseSet,
    cfg: PluginConfig,
    *,
    seed: int = 0,
    batch_size: int = 4,
    progress: Callable[..., None] | None = None,
    device: torch.device | str = "cpu",
    initial: dict[str, torch.Tensor] | None = None,
    targets: list[str] | None = None,
) -> nn.Module:
    """LoRA-adapt a copy of the generator's decoder to reconstruct ``cases`` from their frozen
    encoder's posterior means (what sampling decodes), so the site's scanner style is rendered
    while the latents, and any UNet trained on them, stay valid. Returns the adapted
    autoencoder copy on CPU."""
    from synthct.training import LatentDecoder, decoder_step, detail_range

    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    ae, params = _adapted_copy(
        gen.autoencoder,
        lambda m: attach_decoder_adapter(m, cfg.decoder_rank, "plugin", targets=targets),
        initial,
        device,
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.decoder_lr)
    images = cases.images.to(device)
    z = encode_latents(ae, images)
    decoder = LatentDecoder(ae)
    detail = detail_range(gen.config.autoencoder, gen.config.data.hu_window)
    for step in range(cfg.decoder_steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        out = decoder_step(
            decoder, optimizer, z[idx], images[idx], gen.config.autoencoder, detail=detail
        )
        if progress is not None:
            progress(step + 1, cfg.decoder_steps, loss=out["loss"])
    ae.eval()
    return ae.cpu()


def train_site_adapters(
    gen: Generator,
    cases: CaseSet,
    cfg: PluginConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[str, int], Any] | None = None,
    initial: dict[str, torch.Tensor] | None = None,
    decoder_initial: dict[str, torch.Tensor] | None = None,
    targets: list[str] | None = None,
) -> tuple[nn.Module, nn.Module | None]:
    """A site's whole plugin: the UNet adapter and, with ``cfg.decoder_rank``, the decoder
    adapter (what :func:`export_plugin` writes). ``progress(name, total)``: a context manager
    yielding an update callback per training (a progress bar)."""
    from contextlib import nullcontext

    def bar(name: str, total: int):  # noqa: ANN202 - a context manager
        return progress(name, total) if progress is not None else nullcontext(None)

    with bar(f"plugin ({cases.sites[0] if cases.sites else 'site'})", cfg.steps) as update:
        unet = train_plugin(
            gen, cases, cfg, seed=seed, progress=update, device=device, initial=initial,
            targets=targets,
        )  # fmt: skip
    decoder = None
    if cfg.decoder_rank > 0:  # the scanner's style, where the decoder renders it
        with bar("decoder adapter", cfg.decoder_steps) as update:
            decoder = train_decoder_adapter(
                gen, cases, cfg, seed=seed, progress=update, device=device,
                initial=decoder_initial,
            )  # fmt: skip
    return unet, decoder


def export_plugin(
    unet: nn.Module,
    out: str | Path,
    *,
    gen: Generator,
    generator_dir: str | Path,
    site: str,
    cases: CaseSet,
    cfg: PluginConfig,
    targets: list[str] | None = None,
    rebased_from: str | None = None,
    decoder: nn.Module | None = None,
) -> Path:
    """Write ``plugin.safetensors`` (adapters only) and ``plugin.json`` (provenance) for the
    adapter(s) a site trained on ``cases`` (``decoder``: the autoencoder copy carrying its
    decoder adapter, from :func:`train_decoder_adapter`)."""
    counts = cases.class_counts(gen.config.labels.num_classes)
    seen = {c: coarsen(n) for c, n in zip(gen.config.labels.classes, counts, strict=True)}
    state = adapter_state(unet, "plugin")
    if decoder is not None:
        state.update({DECODER_PREFIX + k: v for k, v in adapter_state(decoder, "plugin").items()})
    return write_plugin(
        state,
        out,
        gen=gen,
        generator_dir=generator_dir,
        site=site,
        classes_seen=seen,
        cfg=cfg,
        targets=targets,
        rebased_from=rebased_from,
    )


def write_plugin(
    state: dict[str, torch.Tensor],
    out: str | Path,
    *,
    gen: Generator,
    generator_dir: str | Path,
    site: str,
    classes_seen: dict[str, int],
    cfg: PluginConfig,
    targets: list[str] | None = None,
    rebased_from: str | None = None,
) -> Path:
    """A plugin folder from adapter tensors: what a site exports and what a registry server
    writes from the tensors a site sent through Flower (``classes_seen`` already coarsened)."""
    from safetensors.torch import save as save_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = save_bytes(state)
    atomic_write_bytes(out / "plugin.safetensors", data)
    decoder = sorted(k.removeprefix(DECODER_PREFIX) for k in state if k.startswith(DECODER_PREFIX))
    if decoder and cfg.decoder_rank < 1:
        raise PluginError(f"{out}: decoder adapter tensors but plugins.decoder_rank is 0")
    meta: dict[str, Any] = {
        "plugin_format": PLUGIN_FORMAT,
        "base_generator_sha256": generator_sha256(generator_dir),
        "site": site,
        "vocabulary": gen.config.labels.classes,
        "vocabulary_hash": gen.config.labels.vocabulary_hash,
        "classes_seen": {c: int(classes_seen.get(c, 0)) for c in gen.config.labels.classes},
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "targets": cfg.targets,
        "target_modules": targets or lora_targets(gen.ema, cfg.targets),
        "tensors": {k: list(v.shape) for k, v in state.items()},
        **(
            {
                "decoder": {
                    "rank": cfg.decoder_rank,
                    "target_modules": decoder_targets(gen.autoencoder),
                }
            }
            if decoder
            else {}
        ),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "weights_sha256": sha256_bytes(data),
        "weights_bytes": len(data),
        **({"rebased_from": rebased_from} if rebased_from else {}),
    }
    write_json(out / "plugin.json", meta, kind="synthct-plugin")
    return out


def read_plugin_weights(
    plugin_dir: str | Path, meta: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A plugin's metadata (``meta`` if already read) and tensors, the weights checked against
    the sha256 and size its plugin.json names (whatever base it was trained on: a stale plugin
    is read to re-fit it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    plugin_dir = Path(plugin_dir)
    meta = read_plugin_meta(plugin_dir) if meta is None else meta
    weights = plugin_dir / "plugin.safetensors"
    if not weights.is_file():
        raise PluginError(f"{plugin_dir}: no plugin.safetensors")
    data = weights.read_bytes()
    if len(data) != meta.get("weights_bytes") or sha256_bytes(data) != meta.get("weights_sha256"):
        raise PluginError(f"{weights}: sha256/size do not match plugin.json (altered or truncated)")
    try:
        return meta, load_bytes(data)
    except SafetensorError as exc:
        raise PluginError(f"{weights}: not a safetensors file: {exc}") from None


def read_plugin_meta(plugin_dir: str | Path) -> dict[str, Any]:
    path = Path(plugin_dir) / "plugin.json"
    if not path.is_file():
        raise PluginError(f"{plugin_dir}: no plugin.json")
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise PluginError(f"{path}: unreadable: {exc}") from None
