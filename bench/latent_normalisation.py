"""Does normalising the latents per channel let the diffusion UNet learn the lesion classes
better than the one global scale factor? (why the shipped generator fails ``fidelity_encoder``)

    python bench/latent_normalisation.py [--steps 3000] [--per-class 16] [--seed 0]
        [--results bench/results/latent_normalisation_<date>.json]

The shipped autoencoder's latents of the demo phantoms' ``train`` cases have very uneven
channels (one channel's spread is ~10x the others'): under one global ``1 / std`` the small
channels sit far below the noise at every noise level but the lowest, so the UNet barely sees
them. EDM2 (Karras et al. 2024) normalises latents per channel (mean and std). Here two UNets
with identical seeds, data, batches and steps are trained centrally on the same latents, one
per normalisation, and each is scored as ``bench/sampling_fidelity.py`` scores a generator
(the gate's class-matched KID excess in the reference encoder's and the HU / texture features
against ``holdout``, per class, within-class MS-SSIM excess, reference recall), at the
shipped guidance and at guidance 3. Only ``train`` (learning) and ``holdout`` (scoring) are
touched.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from phantom_world import bench_command, phantom_manifest
from sampling_fidelity import score

from synthct.checkpoint import build_generator, load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.preprocess import hu_to_model, model_to_hu
from synthct.eval.features import extract_features
from synthct.eval.gate import load_real
from synthct.models.schedulers import sampling_scheduler, training_scheduler
from synthct.pretrained import load_phantom_reference, phantom_dir
from synthct.sampling import _decode, sample_latents
from synthct.training import EMA, BalancedSampler, diffusion_step, encode_latents


def normalisers(latents: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(shift, scale) per arm: normalised = (z - shift) * scale."""
    channel = (1, -1, 1, 1, 1)
    mean = latents.mean(dim=(0, 2, 3, 4)).view(channel)
    std = latents.std(dim=(0, 2, 3, 4)).view(channel)
    return {
        "global": (torch.zeros(1), 1.0 / latents.std().reshape(1)),
        "per_channel": (mean, 1.0 / std),
    }


def train_arm(
    gen,
    latents,
    labels,
    steps: int,
    seed: int,
    log_every: int = 250,
    *,
    config=None,
    checkpoints: tuple[int, ...] = (),
    on_checkpoint=None,
    sites: torch.Tensor | None = None,
):
    """A fresh UNet (+ EMA) trained ``steps`` steps on ``latents`` as the trainer does; at each
    step in ``checkpoints`` ``on_checkpoint(step, ema)`` scores the EMA UNet so far. ``config``
    (default: the generator's) may give the fresh UNet another width or a site condition;
    ``sites``: each case's site index (a site-conditioned UNet)."""
    config = config or gen.config
    fresh = build_generator(config, seed=seed)
    unet, conditioning = fresh.unet, fresh.conditioning
    opt = torch.optim.AdamW(unet.parameters(), lr=config.train.diffusion_lr)
    ema = EMA(unet, config.diffusion.ema_decay, target=fresh.ema, step=0)
    rng = torch.Generator().manual_seed(seed)
    sampler = BalancedSampler(labels, balanced=config.train.balanced, generator=rng)
    scheduler = training_scheduler(config.diffusion)
    start, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        idx = sampler(config.train.batch_size)
        parts = diffusion_step(
            unet,
            opt,
            latents[idx],
            labels[idx],
            scheduler,
            config.diffusion,
            conditioning=conditioning,
            sites=None if sites is None else sites[idx],
            generator=rng,
        )
        ema.update(unet)
        losses.append(parts["loss"])
        if step % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(
                f"  step {step}/{steps} loss={recent:.4f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
        if on_checkpoint is not None and step in checkpoints:
            on_checkpoint(step, fresh.ema.eval())
            fresh.ema.train()
    return fresh.ema.eval(), sum(losses[-500:]) / min(500, len(losses))


@torch.no_grad()
def sample(
    gen, ema, shift, scale, labels, guidance: float, seed: int, sites: torch.Tensor | None = None
) -> torch.Tensor:
    """Model-space volumes: sample normalised latents, undo the normalisation, decode
    (``sites``: site indices for a site-conditioned UNet; None: the null site)."""
    cfg = gen.config.sampling
    scheduler = sampling_scheduler(gen.config.diffusion, cfg.sampler)
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(labels), cfg.batch_size):
        z = sample_latents(
            lambda z, t, c, _r: ema(z, t, class_labels=c),
            scheduler,
            labels[i : i + cfg.batch_size],
            sites=None if sites is None else sites[i : i + cfg.batch_size],
            latent_shape=gen.config.latent_shape,
            guidance_interval=cfg.guidance_interval,
            conditioning=gen.conditioning,
            guidance=guidance,
            steps=cfg.steps,
            generator=rng,
            device=torch.device("cpu"),
        )
        out.append(_decode(gen, z / scale + shift))
    return torch.cat(out)


def shipped_world(out: Path):
    """The demo config, the shipped generator and reference model, and the demo phantoms'
    real ``train`` / ``holdout`` cases with their features (rendered under ``out``)."""
    config = load_config(packaged_config_path("demo"))
    manifest = phantom_manifest(config, out)
    gen = load_generator(phantom_dir() / "generator")
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    return config, gen, reference, real


def score_ema(gen, ema, shift, scale, labels, guidance: float, seed: int, reference, real) -> dict:
    """Sample ``labels`` with a trained EMA UNet and score them as sampling_fidelity.py does,
    with the reference classifier's recall per class."""
    classes, window = list(gen.config.labels.classes), gen.config.data.hu_window
    images = sample(gen, ema, shift, scale, labels, guidance, seed)
    images = hu_to_model(model_to_hu(images, window), window)  # as a cohort file
    fs = extract_features(images, labels, ["pooled"] * len(labels), reference, window)
    predicted = reference.predict(images).argmax(1)
    recall = {
        c: round(float((predicted[labels == i] == i).float().mean()), 3)
        for i, c in enumerate(classes)
    }
    return {**score(fs, real, classes), "conditional_recall": recall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, nargs="+", default=[6.0, 3.0])
    p.add_argument("--out", default="runs/bench_latent_normalisation")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config, gen, reference, real = shipped_world(Path(args.out))
    classes = list(config.labels.classes)
    raw = encode_latents(gen.autoencoder, real.train.images)
    labels = real.train.labels
    stats = {
        "channel_mean": [round(float(v), 4) for v in raw.mean(dim=(0, 2, 3, 4))],
        "channel_std": [round(float(v), 4) for v in raw.std(dim=(0, 2, 3, 4))],
        "global_std": round(float(raw.std()), 4),
    }
    print(f"train latents {tuple(raw.shape)}: {stats}", flush=True)
    sample_labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    arms = []
    for name, (shift, scale) in normalisers(raw).items():
        print(f"arm {name}", flush=True)
        start = time.perf_counter()
        ema, final_loss = train_arm(
            copy.copy(gen), (raw - shift) * scale, labels, args.steps, args.seed
        )
        train_s = time.perf_counter() - start
        rows = []
        for guidance in args.guidance:
            scores = score_ema(
                gen, ema, shift, scale, sample_labels, guidance, args.seed, reference, real
            )
            row = {"guidance": guidance, **scores}
            print(json.dumps(row), flush=True)
            rows.append(row)
        arms.append(
            {
                "normalisation": name,
                "final_loss_last500": round(final_loss, 4),
                "train_wall_s": round(train_s),
                "scores": rows,
            }
        )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "autoencoder": "shipped (synthct/pretrained/phantom/generator), encoder frozen",
        "unet": "fresh per arm, same seed, batches and noise; central; EMA used for sampling",
        "steps": args.steps,
        "per_class": args.per_class,
        "seed": args.seed,
        "sampling": {"sampler": config.sampling.sampler, "steps": config.sampling.steps},
        "latent_stats": stats,
        "split": "train (learning), holdout (scoring, baseline: train vs holdout)",
        "arms": arms,
        "command": bench_command("latent_normalisation.py", args),
    }
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
