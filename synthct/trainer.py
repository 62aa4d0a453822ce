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
from synthct.models.scanner_noise import ScannerNoise
from synthct.models.schedulers import training_scheduler
from synthct.phases import Next, PhasePosition, run_phases
from synthct.sampling import measures_scanner_noise, site_noise_power
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


class _State(PhasePosition):
    """Where a training run is (phase, steps of it committed), its wall time, RNG and
    optimisers; saved next to the generator as ``train_state/``."""

    def __init__(self, run: Path) -> None:
        super().__init__()
        self.dir = run / "train_state"
        self.wall_s = 0.0  # generator training seconds so far, summed over resumed sessions
        self._since = time.perf_counter()

    def elapsed_s(self) -> float:
        """Training wall seconds so far, this session's included (what a budget counts)."""
        return self.wall_s + time.perf_counter() - self._since

    def save(
        self,
        gen: Generator,
        optimizers: dict[str, torch.optim.Optimizer],
        generator: torch.Generator,
        run: Path,
    ) -> None:
        save_generator(
            gen, run / "generator", extra={"trained": {"phase": self.phase, "step": self.unit}}
        )
        tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
        meta: dict[str, Any] = {
            "phase": self.phase,
            "step": self.unit,
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
        self.phase, self.unit = meta["phase"], int(meta["step"])
        self.wall_s, self._since = float(meta.get("wall_s", 0.0)), time.perf_counter()


def ensure_reference(
    config: SynthctConfig,
    train: CaseSet,
    holdout: CaseSet,
    run: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train and save ``RUN/reference`` unless it exists; return its info (holdout accuracy)."""
    from synthct.reference import load_reference, save_reference, train_reference_for

    if (run / "reference" / "reference.json").is_file():
        return load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash).info
    model = train_reference_for(
        config,
        train,
        holdout,
        seed=config.seed,
        progress=(lambda d, t, **f: progress("reference", d, t, **f)) if progress else None,
    )
    save_reference(model, run / "reference")
    return model.info


class _CentralDriver:
    """One optimiser step per unit on the pooled ``train`` cases (the same step functions the
    federated sites run); checkpoints every ``train.checkpoint_every`` steps and at each
    phase's end. A wall-time budget ends the autoencoder and decoder phases at half of it
    each and stops diffusion at all of it (resume continues there)."""

    def __init__(
        self,
        config: SynthctConfig,
        gen: Generator,
        train: CaseSet,
        run: Path,
        state: _State,
        *,
        resume: bool,
        budget_s: float | None,
        progress: Progress | None,
    ) -> None:
        self.config, self.gen, self.train, self.run, self.position = config, gen, train, run, state
        self.budget_s, self.progress = budget_s, progress
        self.device = next(gen.unet.parameters()).device
        self.decoder = LatentDecoder(gen.autoencoder, gen.discriminator)
        self.optimizers = {
            "autoencoder": torch.optim.AdamW(gen.autoencoder.parameters(), lr=config.train.ae_lr),
            "decoder": torch.optim.AdamW(self.decoder.parameters(), lr=config.train.decoder_lr),
            "unet": torch.optim.AdamW(gen.unet.parameters(), lr=config.train.diffusion_lr),
        }
        self.generator = torch.Generator().manual_seed(config.seed)
        if resume:
            state.load(self.optimizers, self.generator)
            logger.info("resuming at phase %s step %d", state.phase, state.unit)
        self.sampler = BalancedSampler(
            train.labels, balanced=config.train.balanced, generator=self.generator
        )
        self.detail = detail_range(config.autoencoder, config.data.hu_window)
        self.raw_latents: torch.Tensor | None = None  # the frozen encoder's, once it is frozen
        self.step_fn: Callable[[torch.Tensor], dict[str, float]] | None = None

    def total(self, phase: str) -> int:
        t = self.config.train
        return {
            "autoencoder": t.ae_steps,
            "decoder": t.decoder_steps,
            "diffusion": t.diffusion_steps,
        }[phase]

    def save(self) -> None:
        self.position.save(self.gen, self.optimizers, self.generator, self.run)

    def _latents(self) -> torch.Tensor:
        if self.raw_latents is None:  # the encoder is frozen from the decoder phase on
            self.raw_latents = encode_latents(
                self.gen.autoencoder, self.train.images.to(self.device)
            )
        return self.raw_latents

    def start(self, phase: str) -> None:
        cfg, gen, train = self.config, self.gen, self.train
        if phase == "autoencoder":
            self.step_fn = lambda idx: autoencoder_step(
                gen.autoencoder,
                self.optimizers["autoencoder"],
                train.images[idx].to(self.device),
                cfg.autoencoder,
                detail=self.detail,
                patch=cfg.train.ae_patch,
                generator=self.sampler.generator,
            )
        elif phase == "decoder":
            raw = self._latents()

            def decoder_unit(idx: torch.Tensor) -> dict[str, float]:
                sites = self.decoder.site_rows(
                    [train.sites[i] for i in idx.tolist()],
                    dropout=cfg.autoencoder.site_style_dropout,
                    generator=self.sampler.generator,
                )
                return decoder_step(
                    self.decoder,
                    self.optimizers["decoder"],
                    raw[idx],
                    train.images[idx].to(self.device),
                    cfg.autoencoder,
                    sites=None if sites is None else sites.to(self.device),
                    detail=self.detail,
                    patch=cfg.train.ae_patch,
                    generator=self.sampler.generator,
                )

            self.step_fn = decoder_unit
        else:
            scheduler = training_scheduler(cfg.diffusion)
            latents = gen.latent_norm.apply(self._latents())
            sites = gen.conditioning.site_indices(train.sites)
            # the EMA has averaged `unit` steps so far (its warm-up resumes where it stopped)
            ema = EMA(gen.unet, cfg.diffusion.ema_decay, target=gen.ema, step=self.position.unit)

            def diffusion_unit(idx: torch.Tensor) -> dict[str, float]:
                parts = diffusion_step(
                    gen.unet,
                    self.optimizers["unet"],
                    latents[idx],
                    train.labels[idx].to(self.device),
                    scheduler,
                    cfg.diffusion,
                    conditioning=gen.conditioning,
                    sites=None if sites is None else sites[idx],
                    generator=self.generator,
                )
                ema.update(gen.unet)
                return parts

            self.step_fn = diffusion_unit

    def unit(self, phase: str, index: int) -> tuple[dict[str, Any], Next]:
        assert self.step_fn is not None
        parts = self.step_fn(self.sampler(self.config.train.batch_size))
        share = 1.0 if phase == "diffusion" else 0.5  # of the wall-time budget
        # the last unit ends its phase anyway (a finished diffusion is saved as done)
        over = self.budget_s and self.position.elapsed_s() > self.budget_s * share
        if over and index < self.total(phase):
            logger.info("%s budget reached at step %d", phase, index)
            return parts, Next.STOP if phase == "diffusion" else Next.END_PHASE
        return parts, Next.CONTINUE

    def commit(self, phase: str, record: dict[str, Any]) -> None:
        step = self.position.unit
        append_jsonl(self.run / "metrics.jsonl", {"phase": phase, "step": step, **record})
        if self.progress:
            self.progress(phase, step, self.total(phase), loss=record["loss"])
        if step % self.config.train.checkpoint_every == 0:
            self.save()

    def end(self, phase: str) -> None:
        if phase == "decoder":
            self.gen.latent_norm = fit_latent_norm(
                self._latents(), self.config.diffusion.latent_norm
            )
            if measures_scanner_noise(self.gen, self.config):  # the decoder is final
                self.gen.scanner_noise = ScannerNoise.from_power(
                    site_noise_power(self.gen, self.train.images.to(self.device), self.train.sites)
                )
        if phase != "diffusion":  # the run's last save follows run_phases
            self.save()


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
    time (reference training excluded, resumed sessions summed): the autoencoder and the
    decoder phase stop at half of it each, diffusion gets whatever is left (steps not reached
    are skipped; resume continues diffusion).
    """
    run = Path(run)
    device = resolve_device(config.train.device)
    budget_s = (budget_min or config.train.budget_min or 0) * 60 or None
    train = load_cases(manifest, config, splits=("train",))
    holdout = load_cases(manifest, config, splits=("holdout",))
    ensure_reference(config, train, holdout, run, progress)

    state = _State(run)
    resuming = resume and (state.dir / "state.json").is_file()
    gen = (
        load_generator(run / "generator", device)
        if resuming
        else build_generator(config, seed=config.seed).to(device)
    )
    driver = _CentralDriver(
        config, gen, train, run, state, resume=resuming, budget_s=budget_s, progress=progress
    )
    run_phases(driver)
    driver.save()
    return gen
