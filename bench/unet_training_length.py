"""Does a longer-trained (or wider) diffusion UNet close the lesion classes' fidelity gap, or is
the gap a property of the recipe? (what the next long retraining of the shipped generator needs)

    python bench/unet_training_length.py [--steps 12000] [--every 3000] [--channels 32 64 64]
        [--guidance 3 6] [--per-class 16] [--seed 0] [--zero-snr] [--site-conditioning]
        [--per-site-class 6] [--save DIR] [--results bench/results/unet_training_length_<date>.json]

A fresh UNet (global latent normalisation, class-balanced batches, the demo config's learning
rate and batch) is trained centrally on the shipped autoencoder's latents of the demo phantoms'
``train`` cases; every ``--every`` steps its EMA is scored as ``bench/sampling_fidelity.py``
scores a generator (the gate's class-matched KID excess in the reference encoder's and the HU /
texture features against ``holdout`` over all classes and over the per-site cohort's lesion
mix, per class, within-class MS-SSIM excess, reference recall) at each guidance.
``--zero-snr`` trains and samples under ``diffusion.zero_terminal_snr`` (t = T pure noise,
trailing timesteps). ``--site-conditioning`` gives the fresh UNet the site as a second condition
(``unet.site_conditioning``, each case's own site, dropped as the trainer does) and also scores,
at every checkpoint and guidance, the ``site_style`` rule on ``--per-site-class`` samples per
class made for each site (as ``bench/site_style_source.py`` does; the shipped decoder, which has
no site style, decodes them). ``--save DIR`` keeps a generator per checkpoint (``DIR/step_N``: the
shipped autoencoder, this EMA UNet, its latent normalisation and schedule) for
``bench/cohort_gate.py``. Only ``train``
(learning) and ``holdout`` (scoring) are touched. The gate allows a KID excess of 0.25.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from latent_normalisation import normalisers, sample, score_ema, shipped_world, train_arm
from phantom_world import bench_command
from site_style_source import style

from synthct.artifacts import write_json
from synthct.checkpoint import save_generator
from synthct.data.preprocess import hu_to_model, model_to_hu
from synthct.models.latent_norm import LatentNorm
from synthct.training import encode_latents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--every", type=int, default=3000)
    p.add_argument("--channels", type=int, nargs="+", default=None, help="UNet widths")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 6.0])
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero-snr", action="store_true", help="diffusion.zero_terminal_snr")
    p.add_argument("--site-conditioning", action="store_true", help="unet.site_conditioning")
    p.add_argument("--per-site-class", type=int, default=6, help="site-style samples")
    p.add_argument("--save", type=Path, default=None, help="keep a generator per checkpoint")
    p.add_argument("--out", default="runs/bench_unet_training_length")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config, gen, reference, real = shipped_world(Path(args.out))
    classes = list(config.labels.classes)
    raw = encode_latents(gen.autoencoder, real.train.images)
    shift, scale = normalisers(raw)["global"]
    unet_cfg = gen.config.unet
    if args.channels:
        unet_cfg = unet_cfg.model_copy(update={"channels": args.channels})
    if args.site_conditioning:
        unet_cfg = unet_cfg.model_copy(update={"site_conditioning": True})
    diffusion = type(gen.config.diffusion).model_validate(  # validated: needs v-prediction
        {**gen.config.diffusion.model_dump(), "zero_terminal_snr": args.zero_snr}
    )
    arm_config = gen.config.model_copy(update={"unet": unet_cfg, "diffusion": diffusion})
    scored = dataclasses.replace(gen, config=arm_config)  # samples with the arm's schedule
    sample_labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    conditioning = scored.conditioning
    train_sites = conditioning.site_indices(list(real.train.sites))
    site_names = [s for s in config.site_names for _ in range(len(classes) * args.per_site_class)]
    site_labels = torch.arange(len(classes)).repeat(len(config.site_names) * args.per_site_class)
    site_index = conditioning.site_indices(site_names)  # None for a class-only UNet
    window = config.data.hu_window
    rows: list[dict] = []
    start = time.perf_counter()

    def on_checkpoint(step: int, ema) -> None:
        if args.save:
            norm = LatentNorm(tuple(shift.tolist()), tuple(scale.tolist()))
            unet = copy.deepcopy(ema)
            kept = dataclasses.replace(scored, unet=unet, ema=unet, latent_norm=norm)
            save_generator(kept, args.save / f"step_{step}", sampling_only=True)
        for guidance in args.guidance:
            row = {
                "step": step,
                "guidance": guidance,
                "train_wall_s": round(time.perf_counter() - start),
                **score_ema(
                    scored, ema, shift, scale, sample_labels, guidance, args.seed, reference, real
                ),
            }
            if site_index is not None:  # cases made for each site, against each site's scans
                images = sample(
                    scored, ema, shift, scale, site_labels, guidance, args.seed, sites=site_index
                )
                images = hu_to_model(model_to_hu(images, window), window)
                row["site_style"] = style(real, images, site_labels, site_names, reference, window)
            print(json.dumps(row), flush=True)
            rows.append(row)
            write(rows)

    def write(rows: list[dict]) -> None:
        if not args.results:
            return
        summary = {
            "date": time.strftime("%Y-%m-%d"),
            "device": f"cpu ({os.cpu_count()} cores)",
            "autoencoder": "shipped (synthct/pretrained/phantom/generator), encoder frozen",
            "unet": {
                "channels": list(unet_cfg.channels),
                "init": "fresh, central, EMA used for sampling, global latent normalisation",
            },
            "batch_size": config.train.batch_size,
            "per_class": args.per_class,
            "seed": args.seed,
            "sampling": {"sampler": config.sampling.sampler, "steps": config.sampling.steps},
            "zero_terminal_snr": args.zero_snr,
            "site_conditioning": args.site_conditioning,
            "split": "train (learning), holdout (scoring, baseline: train vs holdout)",
            "gate_allowance": 0.25,
            "rows": rows,
            "command": bench_command("unet_training_length.py", args),
        }
        write_json(args.results, summary, kind="bench-unet-training-length")

    checkpoints = tuple(range(args.every, args.steps + 1, args.every))
    train_arm(
        copy.copy(gen),
        (raw - shift) * scale,
        real.train.labels,
        args.steps,
        args.seed,
        config=arm_config,
        checkpoints=checkpoints,
        on_checkpoint=on_checkpoint,
        sites=train_sites,
    )


if __name__ == "__main__":
    main()
