"""Does a site-conditioned UNet read its site rows? The UNet as a diffusion classifier (issue 26).

    python bench/site_rows_probe.py GENERATOR [GENERATOR ...] [--names NAME ...]
        [--draws 4] [--out runs/bench_site_rows] [--results bench/results/site_rows_<date>.json]

The ``site_style`` rule asks whether the cases made for a site look like its scans, after
sampling, decoding and feature extraction. This asks the UNet directly, cheaply and without
sampling: for each real case, at the same noise draw and timestep, the denoising error under
each site's row (and the null row), its class kept. A UNet that has learnt what a site's
latents look like explains a case best with the row of the case's own site ("diffusion
classifier", Li et al. 2023):

- **accuracy**: fraction of cases whose own site's row gives the lowest error among the sites'
  rows (chance 1 / sites), overall and per site;
- **own - other** and **own - null**: the mean error under the own row minus the mean over the
  other sites' rows, and minus the null row's (negative: the row helps);
- **error**: the mean error under the own row (how well the UNet denoises at all).

The UNet probed is the one that samples (the EMA UNet). Per generator, on the demo phantoms' ``train`` (what the UNet learnt) and ``holdout`` splits
(never ``test``). Each case is averaged over ``--draws`` noise draws and timesteps, the same
for every row and every generator.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from phantom_world import bench_command, phantom_world

from synthct.artifacts import write_json
from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import CaseSet
from synthct.models.schedulers import training_scheduler
from synthct.training import denoising_target, encode_latents


@torch.no_grad()
def row_errors(gen, cases: CaseSet, draws: int, seed: int = 0) -> torch.Tensor:
    """N x (sites + 1): each case's mean denoising error under each site's row, then the null
    row's; the case's class is kept, the same noise and timestep for every row."""
    cond = gen.conditioning
    scheduler = training_scheduler(gen.config.diffusion)
    z0 = gen.latent_norm.apply(encode_latents(gen.autoencoder, cases.images))
    labels = cases.labels
    n, rows = len(z0), len(cond.sites) + 1
    generator = torch.Generator().manual_seed(seed)
    errors = torch.zeros(n, rows)
    for _ in range(draws):
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        z_t = scheduler.add_noise(z0, noise, t)
        target = denoising_target(scheduler, gen.config.diffusion, z0, noise, t)
        for r in range(rows):
            pred = gen.ema(z_t, t, class_labels=cond.encode(labels, torch.full_like(labels, r)))
            errors[:, r] += (pred.float() - target).pow(2).flatten(1).mean(1)
    return errors / draws


def summarise(gen, cases: CaseSet, errors: torch.Tensor) -> dict:
    """Accuracy of the own row as a site classifier, and the error gaps (see the docstring)."""
    cond = gen.conditioning
    sites = cond.site_indices(cases.sites)
    n_sites = len(cond.sites)
    by_site = errors[:, :n_sites]
    own = errors[torch.arange(len(errors)), sites]
    other = (by_site.sum(1) - own) / (n_sites - 1)
    hit = by_site.argmin(1) == sites
    return {
        "cases": len(errors),
        "accuracy": round(float(hit.float().mean()), 3),
        "accuracy_per_site": {
            name: round(float(hit[sites == s].float().mean()), 3)
            for s, name in enumerate(cond.sites)
        },
        "own_minus_other": round(float((own - other).mean()), 4),
        "own_minus_null": round(float((own - errors[:, n_sites]).mean()), 4),
        "error": round(float(own.mean()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generators", nargs="+", help="site-conditioned generator folders")
    p.add_argument("--names", nargs="*", default=None, help="one name per generator")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--out", default="runs/bench_site_rows")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    names = args.names or args.generators
    if len(names) != len(args.generators):
        p.error(f"{len(names)} names for {len(args.generators)} generators")
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    _, train, holdout = phantom_world(config, Path(args.out))
    start = time.perf_counter()
    rows = {}
    for name, folder in zip(names, args.generators, strict=True):
        gen = load_generator(folder)
        if not gen.conditioning.site_conditioned:
            p.error(f"{folder}: a class-only UNet has no site rows to probe")
        rows[name] = {"generator": folder}
        for split, cases in (("train", train), ("holdout", holdout)):
            rows[name][split] = summarise(gen, cases, row_errors(gen, cases, args.draws))
        print(json.dumps({name: rows[name]}), flush=True)
    write_json(
        args.results or Path(args.out) / "site_rows.json",
        {
            "date": time.strftime("%Y-%m-%d"),
            "splits": "train (what the UNet learnt), holdout; test not read",
            "draws": args.draws,
            "generators": rows,
            "wall_s": round(time.perf_counter() - start, 1),
            "command": bench_command("site_rows_probe.py", args, positional=("generators",)),
        },
        kind="bench-site-rows",
    )


if __name__ == "__main__":
    main()
