"""Centralised generator training (all sites' ``train`` pooled): the baseline federated
training is judged against.

Phases: reference model -> autoencoder -> decoder (encoder frozen: site style, the patch-
adversarial term; ``train.decoder_steps``) -> latent scale factor -> latent diffusion (EMA),
with the same step functions the federated phases use.
Every ``checkpoint_every`` steps the generator and the training state (optimiser moments, step,
RNG) are written atomically, so Ctrl-C or a crash leaves a usable checkpoint and ``resume``
continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from synthct.artifacts import append_jsonl, read_json, write_json
from synthct.checkpoint import (
    Generator,
    build_generator,
    load_generator,
    load_tensors,
    save_generator,
    save_tensors,
)
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.models.latent_norm import fit_latent_norm
from synthct.models.schedulers import training_scheduler
from synthct.training import (
    EMA,
    BalancedSampler,
    LatentDecoder,
    autoencoder_step,
    decoder_step,
    detail_range,
    diffusion_step,
    encode_latents,
    resolve_device,
)

__all__ = ["train_central", "ensure_reference", "optimizer_tensors", "load_optimizer_tensors"]

logger = logging.getLogger(__name__)

Progress = Callable[..., None]


def optimizer_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimiser state into safetensors-compatible tensors + JSON metadata."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class _State:
    """Where a training run is: phase, step, RNG, optimisers; saved next to the generator."""

    def __init__(self, run: Path) -> None:
        self.dir = run / "train_state"
        self.phase, self.step = "autoencoder", 0
        self.wall_s = 0.0  # generator training seconds so far, summed over resumed sessions
        self._since = time.perf_counter()

    def elapsed_s(self) -> float:
        """Training wall seconds so far, this session's included (what a budget counts)."""
        return self.wall_s + time.perf_counter() - self._since

    def record(
        self,
        phase: str,
        parts: dict[str, float],
        total: int,
        *,
        metrics_path: Path,
        progress: Progress | None,
        checkpoint_every: int,
        save: Callable[[], None],
        budget_s: float | None,
    ) -> bool:
        """After one step of ``phase``: count it, log it, report it, checkpoint every
        ``checkpoint_every`` steps; True once ``budget_s`` is spent (the phase stops there)."""
        self.step += 1
        append_jsonl(metrics_path, {"phase": phase, "step": self.step, **parts})
        if progress:
            progress(phase, self.step, total, loss=parts["loss"])
        if self.step % checkpoint_every == 0:
            save()
        if budget_s and self.elapsed_s() > budget_s:
            logger.info("%s budget reached at step %d", phase, self.step)
            return True
        return False

    def save(
        self,
        gen: Generator,
        optimizers: dict[str, torch.optim.Optimizer],
        generator: torch.Generator,
        run: Path,
    ) -> None:
        save_generator(
            gen, run / "generator", extra={"trained": {"phase": self.phase, "step": self.step}}
        )
        tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
        meta: dict[str, Any] = {
            "phase": self.phase,
            "step": self.step,
            "wall_s": round(self.elapsed_s(), 3),
            "optimizers": {},
        }
        for name, opt in optimizers.items():
            t, m = optimizer_tensors(opt)
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
            meta["optimizers"][name] = m
        record = save_tensors(self.dir / "state.safetensors", tensors)
        write_json(self.dir / "state.json", {**meta, "tensors": record}, kind="train-state")

    def load(
        self, optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator
    ) -> None:
        meta = read_json(self.dir / "state.json")
        rec = meta["tensors"]
        tensors = load_tensors(self.dir / rec["file"], sha256=rec["sha256"], size=rec["bytes"])
        generator.set_state(tensors["rng"])
        for name, opt in optimizers.items():
            prefix = f"{name}."
            sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if sub:
                load_optimizer_tensors(opt, sub, meta["optimizers"][name])
        self.phase, self.step = meta["phase"], int(meta["step"])
        self.wall_s, self._since = float(meta.get("wall_s", 0.0)), time.perf_counter()


def ensure_reference(
    config: SynthctConfig,
    train: CaseSet,
    holdout: CaseSet,
    run: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train and save ``RUN/reference`` unless it exists; return its info (holdout accuracy)."""
    from synthct.reference import load_reference, save_reference, train_reference

    if (run / "reference" / "reference.json").is_file():
        return load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash).info
    model = train_reference(
        train,
        classes=config.labels.classes,
        vocabulary_hash=config.labels.vocabulary_hash,
        epochs=config.train.reference_epochs,
        seed=config.seed,
        holdout=holdout,
        progress=(lambda d, t, **f: progress("reference", d, t, **f)) if progress else None,
    )
    save_reference(model, run / "reference")
    return model.info


def _decoder_phase(
    decoder: LatentDecoder,
    optimizer: torch.optim.Optimizer,
    raw_latents: torch.Tensor,
    train: CaseSet,
    config: SynthctConfig,
    state: _State,
    sampler: BalancedSampler,
    *,
    budget_s: float | None,
    bookkeeping: dict[str, Any],
) -> None:
    """``train.decoder_steps`` decoder-only steps on the frozen encoder's posterior means (the
    federated decoder phase's step, with its site rows and null-site dropout)."""
    total = config.train.decoder_steps
    detail = detail_range(config.autoencoder, config.data.hu_window)
    device = raw_latents.device
    while state.step < total:
        idx = sampler(config.train.batch_size)
        sites = decoder.site_rows(
            [train.sites[i] for i in idx.tolist()],
            dropout=config.autoencoder.site_style_dropout,
            generator=sampler.generator,
        )
        parts = decoder_step(
            decoder,
            optimizer,
            raw_latents[idx],
            train.images[idx].to(device),
            config.autoencoder,
            sites=None if sites is None else sites.to(device),
            detail=detail,
            patch=config.train.ae_patch,
            generator=sampler.generator,
        )
        half = budget_s / 2 if budget_s else None
        if state.record("decoder", parts, total, budget_s=half, **bookkeeping):
            break


def train_central(
    config: SynthctConfig,
    manifest: str | Path,
    run: str | Path,
    *,
    resume: bool = False,
    budget_min: float | None = None,
    progress: Progress | None = None,
) -> Generator:
    """Train reference models and the generator on the pooled ``train`` split.

    ``progress(phase, step, total, **metrics)`` is called every step. ``budget_min`` caps wall
    time (reference training excluded, resumed sessions summed): the autoencoder stops at half,
    diffusion gets whatever is left (steps not reached are skipped).
    """
    run = Path(run)
    device = resolve_device(config.train.device)
    budget_s = (budget_min or config.train.budget_min or 0) * 60 or None
    train = load_cases(manifest, config, splits=("train",))
    holdout = load_cases(manifest, config, splits=("holdout",))
    ensure_reference(config, train, holdout, run, progress)

    generator = torch.Generator().manual_seed(config.seed)
    state = _State(run)
    if resume and (state.dir / "state.json").is_file():
        gen = load_generator(run / "generator", device)
    else:
        gen = build_generator(config, seed=config.seed).to(device)
    ae_opt = torch.optim.AdamW(gen.autoencoder.parameters(), lr=config.train.ae_lr)
    decoder = LatentDecoder(gen.autoencoder, gen.discriminator)
    decoder_opt = torch.optim.AdamW(decoder.parameters(), lr=config.train.decoder_lr)
    unet_opt = torch.optim.AdamW(gen.unet.parameters(), lr=config.train.diffusion_lr)
    optimizers = {"autoencoder": ae_opt, "decoder": decoder_opt, "unet": unet_opt}
    if resume and (state.dir / "state.json").is_file():
        state.load(optimizers, generator)
        logger.info("resuming at phase %s step %d", state.phase, state.step)
    sampler = BalancedSampler(train.labels, balanced=config.train.balanced, generator=generator)
    bs, every = config.train.batch_size, config.train.checkpoint_every
    metrics_path = run / "metrics.jsonl"
    bookkeeping: dict[str, Any] = {
        "metrics_path": metrics_path,
        "progress": progress,
        "checkpoint_every": every,
        "save": lambda: state.save(gen, optimizers, generator, run),
    }

    if state.phase == "autoencoder":
        total = config.train.ae_steps
        detail = detail_range(config.autoencoder, config.data.hu_window)
        while state.step < total:
            idx = sampler(bs)
            parts = autoencoder_step(
                gen.autoencoder,
                ae_opt,
                train.images[idx].to(device),
                config.autoencoder,
                detail=detail,
                patch=config.train.ae_patch,
                generator=sampler.generator,
            )
            if state.record(
                "autoencoder",
                parts,
                total,
                budget_s=budget_s / 2 if budget_s else None,
                **bookkeeping,
            ):
                break
        state.phase, state.step = "decoder", 0
        state.save(gen, optimizers, generator, run)

    raw_latents = encode_latents(gen.autoencoder, train.images.to(device))  # encoder frozen now
    if state.phase == "decoder":
        _decoder_phase(
            decoder,
            decoder_opt,
            raw_latents,
            train,
            config,
            state,
            sampler,
            budget_s=budget_s,
            bookkeeping=bookkeeping,
        )
        state.phase, state.step = "diffusion", 0
        gen.latent_norm = fit_latent_norm(raw_latents, config.diffusion.latent_norm)
        state.save(gen, optimizers, generator, run)

    scheduler = training_scheduler(config.diffusion)
    latents = gen.latent_norm.apply(raw_latents)
    conditioning = gen.conditioning
    sites = conditioning.site_indices(train.sites)
    # the EMA has averaged state.step steps so far (its warm-up resumes where it stopped)
    ema = EMA(gen.unet, config.diffusion.ema_decay, target=gen.ema, step=state.step)
    total = config.train.diffusion_steps
    while state.step < total:
        idx = sampler(bs)
        parts = diffusion_step(
            gen.unet,
            unet_opt,
            latents[idx],
            train.labels[idx].to(device),
            scheduler,
            config.diffusion,
            conditioning=conditioning,
            sites=None if sites is None else sites[idx],
            generator=generator,
        )
        ema.update(gen.unet)
        if state.record("diffusion", parts, total, budget_s=budget_s, **bookkeeping):
            break
    state.phase = "done" if state.step >= total else "diffusion"
    state.save(gen, optimizers, generator, run)
    return gen
