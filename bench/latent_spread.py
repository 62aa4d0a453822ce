"""Where do the generator's samples lack the variety of real cases? Measured in the space the
diffusion UNet works in: the autoencoder's latents (issue 20, diversity).

    python bench/latent_spread.py [--generator DIR] [--per-class 16] [--seed 0]
        [--arms dpmpp:15:shipped dpmpp:15:1 euler_a:60:1]
        [--out runs/bench_latent_spread] [--results bench/results/latent_spread_<date>.json]

The gate's ``mode_collapse`` rule and the cohort-spread bench see samples of one class that are
more alike than real cases, in image space. Here the same question is asked of the latents the
UNet draws, per class, against the posterior means of the real ``train`` cases it learnt from
(``holdout`` as the real-vs-real baseline):

- **across-case spread per channel**: the SD over cases of each latent voxel, averaged over
  voxels, as a ratio to ``train``'s (1.0: as varied as real);
- **within-volume detail per channel**: the RMS of each latent minus its Gaussian-smoothed self
  (sigma 1.5 latent voxels), as a ratio to ``train``'s (texture the UNet renders or not);
- **near-duplicates**: the median distance from each sample to its nearest other sample of the
  class, beside the same for real ``train`` cases (small: samples collapse onto a few modes),
  and the median distance from each sample to its nearest ``train`` case, beside ``holdout``'s
  (small: the samples sit on training cases).

Each arm is ``sampler:steps:guidance`` (``shipped``: the generator's own per-class guidance).
Only ``train`` (what the UNet learnt) and ``holdout`` (the baseline) are read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import bench_command, phantom_world
from scipy import ndimage

from synthct.artifacts import write_json
from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.models.schedulers import sampling_scheduler
from synthct.pretrained import phantom_dir
from synthct.sampling import _unet_denoiser, sample_latents
from synthct.training import encode_latents


def detail(z: torch.Tensor) -> torch.Tensor:
    """Per channel, the RMS of latents minus their Gaussian-smoothed selves (N×C×x×y×z -> C)."""
    a = z.numpy()
    high = a - ndimage.gaussian_filter(a, sigma=(0, 0, 1.5, 1.5, 1.5))
    return torch.from_numpy(np.sqrt((high**2).mean(axis=(0, 2, 3, 4))))


def spread(z: torch.Tensor) -> torch.Tensor:
    """Per channel, the SD over cases of each latent voxel, averaged over voxels."""
    return z.std(0).mean(dim=(1, 2, 3))


def nearest(a: torch.Tensor, b: torch.Tensor, *, same: bool = False) -> float:
    """Median over ``a`` of the L2 distance to the nearest case of ``b`` (itself excluded)."""
    d = torch.cdist(a.flatten(1), b.flatten(1))
    if same:
        d.fill_diagonal_(float("inf"))
    return round(float(d.min(1).values.median()), 2)


def ratio(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [round(float(v), 3) for v in a / b]


@torch.no_grad()
def sample_arm(gen, arm: str, c: int, n: int, seed: int) -> torch.Tensor:
    """``n`` latents of class ``c`` (the encoder's own space) for ``sampler:steps:guidance``."""
    sampler, steps, guidance = arm.split(":")
    name = gen.config.labels.classes[c]
    cfg = gen.config.sampling
    scale = cfg.class_guidance.get(name, cfg.guidance) if guidance == "shipped" else float(guidance)
    z = sample_latents(
        _unet_denoiser(gen.ema.eval()),
        sampling_scheduler(gen.config.diffusion, sampler),
        torch.full((n,), c),
        latent_shape=gen.config.latent_shape,
        conditioning=gen.conditioning,
        guidance=scale,
        steps=int(steps),
        generator=torch.Generator().manual_seed(seed * 100 + c),
        device=torch.device("cpu"),
    )
    return gen.latent_norm.undo(z)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", default=None, help="generator folder (default: shipped)")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=["dpmpp:15:shipped", "dpmpp:15:1", "euler_a:60:1"])
    p.add_argument("--out", default="runs/bench_latent_spread")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    _, train, holdout = phantom_world(config, Path(args.out))
    gen = load_generator(args.generator or phantom_dir() / "generator")
    z_train = encode_latents(gen.autoencoder, train.images)
    z_holdout = encode_latents(gen.autoencoder, holdout.images)
    start = time.perf_counter()
    per_class = {}
    for c, name in enumerate(config.labels.classes):
        tr, ho = z_train[train.labels == c], z_holdout[holdout.labels == c]
        row = {
            "train_cases": len(tr),
            "holdout_cases": len(ho),
            "train_spread": [round(float(v), 4) for v in spread(tr)],
            "train_detail": [round(float(v), 4) for v in detail(tr)],
            "holdout": {
                "spread_ratio": ratio(spread(ho), spread(tr)),
                "detail_ratio": ratio(detail(ho), detail(tr)),
                "nearest_train": nearest(ho, tr),
            },
            "train_nearest_other_train": nearest(tr, tr, same=True),
        }
        for arm in args.arms:
            z = sample_arm(gen, arm, c, args.per_class, args.seed)
            row[arm] = {
                "spread_ratio": ratio(spread(z), spread(tr)),
                "detail_ratio": ratio(detail(z), detail(tr)),
                "nearest_other_sample": nearest(z, z, same=True),
                "nearest_train": nearest(z, tr),
            }
        print(json.dumps({"class": name, **row}), flush=True)
        per_class[name] = row
    write_json(
        args.results or Path(args.out) / "latent_spread.json",
        {
            "date": time.strftime("%Y-%m-%d"),
            "generator": args.generator or "shipped (synthct/pretrained/phantom/generator)",
            "latent_shape": list(gen.config.latent_shape),
            "split": "train (what the UNet learnt; ratios are to it), holdout (baseline)",
            "per_class_samples": args.per_class,
            "seed": args.seed,
            "per_class": per_class,
            "wall_s": round(time.perf_counter() - start, 1),
            "command": bench_command("latent_spread.py", args),
        },
        kind="bench-latent-spread",
    )


if __name__ == "__main__":
    main()
