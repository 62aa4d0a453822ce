"""Diversity vs conditioning of the generator's samples, per sampler and guidance setting.

    python bench/diversity.py [--generator DIR] [--per-class 16] [--seed 0]
        [--results bench/results/diversity_<date>.json]

Each variant samples ``per-class`` volumes of every class from the same generator (the shipped
one by default) and reports, per class, the within-class mean pairwise MS-SSIM of the samples
beside that of the real ``holdout`` cases of the class (issue target: within 0.05 of real)
and the reference classifier's recall on the samples (conditioning must not be lost for
variety). Variants: DPM-Solver++ (ODE) and its stochastic SDE form, Euler ancestral;
guidance 6 (today's default) and 3; guidance everywhere or only inside a noise-level
interval (Kynkaanniemi et al. 2024). A first row gives the same MS-SSIM for the autoencoder's
reconstructions of the holdout cases (each for its site): how much of a gap the decoder's
smoothing alone would explain. Only ``holdout`` is looked at: defaults are chosen here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from phantom_world import bench_command, phantom_world

from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.eval.diversity import pairwise_msssim
from synthct.eval.generator_quality import conditional_report
from synthct.pretrained import load_phantom_reference, phantom_dir
from synthct.sampling import reconstruct

VARIANTS = [
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.0, 1.0)},
    {"sampler": "dpmpp", "guidance": 3.0, "guidance_interval": (0.0, 1.0)},
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.0, 0.7)},
    {"sampler": "dpmpp_sde", "guidance": 6.0, "guidance_interval": (0.0, 1.0)},
    {"sampler": "dpmpp_sde", "guidance": 6.0, "guidance_interval": (0.0, 0.7)},
    {"sampler": "dpmpp_sde", "guidance": 3.0, "guidance_interval": (0.0, 1.0)},
    {"sampler": "euler_a", "guidance": 6.0, "guidance_interval": (0.0, 1.0)},
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", default=None, help="generator folder (default: shipped)")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_diversity")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    _, _, holdout = phantom_world(config, Path(args.out))
    gen = load_generator(args.generator or phantom_dir() / "generator")
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    with torch.no_grad():
        recon = reconstruct(gen, holdout.images, sites=holdout.sites)
    reconstruction = {}
    for c, name in enumerate(config.labels.classes):
        mask = holdout.labels == c
        real, rec = pairwise_msssim(holdout.images[mask]), pairwise_msssim(recon[mask])
        reconstruction[name] = {"cases": int(mask.sum()), "real": real, "reconstruction": rec}
        reconstruction[name]["excess"] = round(rec - real, 4)
    print(f"reconstructions: {reconstruction}", flush=True)
    rows = []
    for variant in VARIANTS:
        sampling = gen.config.sampling.model_copy(update=variant)
        gen.config = gen.config.model_copy(update={"sampling": sampling})
        report = conditional_report(
            gen, reference, holdout, per_class=args.per_class, seed=args.seed
        )
        msssim = report["pairwise_msssim_per_class"]
        excess = {c: round(v["synthetic"] - v["real"], 4) for c, v in msssim.items()}
        row = {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in variant.items()},
            "steps": sampling.steps,
            "msssim_excess_per_class": excess,
            "msssim_excess_max": max(excess.values()),
            "msssim_per_class": msssim,
            "conditional_accuracy_per_class": report["conditional_accuracy_per_class"],
            "conditional_accuracy_mean": round(report["conditional_accuracy_mean"], 4),
            "wall_s": report["sampling"]["wall_s"],
        }
        rows.append(row)
        print(
            f"{variant['sampler']:9s} g={variant['guidance']} interval={variant['guidance_interval']}"
            f" msssim_excess_max={row['msssim_excess_max']:.3f} {excess}"
            f" cond_acc={row['conditional_accuracy_mean']:.3f}"
            f" {report['conditional_accuracy_per_class']}",
            flush=True,
        )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "generator": args.generator or "shipped (synthct/pretrained/phantom/generator)",
        "split": "holdout",
        "per_class": args.per_class,
        "reconstruction_msssim": reconstruction,
        "seed": args.seed,
        "variants": rows,
        "command": bench_command("diversity.py", args),
    }
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
