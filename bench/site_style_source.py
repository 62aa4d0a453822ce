"""Where does a site-conditioned generator lose each site's style: in the decoder or the UNet?

    python bench/site_style_source.py --generator DIR [--per-site-class 6] [--seed 0]
        [--results bench/results/site_style_source_<date>.json]

The ``site_style`` rule's distance (class-adjusted HU / texture features, standardised on the
demo phantoms' ``holdout``) from the cases made for each site to every site's real ``holdout``
scans, for four sources: the real ``train`` cases themselves (the baseline), their autoencoder
reconstructions decoded with their own site's style and with the null (pooled) style, and
samples made for each site (class and site conditions; ``per-site-class`` per class and site,
the demo's classes). A source whose cases sit nearest their own site passes the rule. Only
``train`` and ``holdout`` are touched.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import bench_command, phantom_manifest

from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.preprocess import hu_to_model
from synthct.eval import distribution as dist
from synthct.eval.features import extract_features
from synthct.eval.gate import load_real
from synthct.eval.site_style import class_means, site_sums, style_match
from synthct.pretrained import load_phantom_reference
from synthct.sampling import reconstruct, sample_volumes


def style(real, images, labels, sites, reference, window) -> dict:
    """The rule's value and per-target distances for cases ``images`` made for ``sites``."""
    fs = extract_features(images, labels, sites, reference, window)
    hold, mine = dist.standardise(real.holdout_features.radiomics, fs.radiomics)
    k = int(real.holdout_features.labels.max()) + 1
    means = class_means(hold, real.holdout_features.labels, k)
    real_sums = site_sums(hold, real.holdout_features.labels, real.holdout_features.sites, means)
    value, detail = style_match(site_sums(mine, np.asarray(fs.labels), sites, means), real_sums)
    return {
        "share_nearest_own": value,
        "per_site": {
            site: {
                "own": d["distance"][site],
                "nearest_other": min(v for s, v in d["distance"].items() if s != site),
                "nearest": d["nearest"],
            }
            for site, d in detail.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", required=True)
    p.add_argument("--per-site-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site-guidance", action="store_true", help="guidance amplifies the site too")
    p.add_argument("--out", default="runs/bench_site_style_source")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    window = config.data.hu_window
    manifest = phantom_manifest(config, Path(args.out))
    gen = load_generator(args.generator)
    sampling = gen.config.sampling.model_copy(update={"site_guidance": args.site_guidance})
    gen.config = gen.config.model_copy(update={"sampling": sampling})
    if not gen.renders_sites:
        raise SystemExit(f"{args.generator}: not site-conditioned; nothing to measure")
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    train = real.train
    rows = {}
    start = time.perf_counter()
    rows["real_train"] = style(
        real, train.images, train.labels, list(train.sites), reference, window
    )
    with torch.no_grad():
        for name, sites in (
            ("reconstructed_own_site", list(train.sites)),
            ("reconstructed_null_site", [None] * len(train)),
        ):
            recon = reconstruct(gen, train.images, sites=sites)
            rows[name] = style(real, recon, train.labels, list(train.sites), reference, window)
            print(name, json.dumps(rows[name]), flush=True)
    classes = list(config.labels.classes)
    labels = torch.arange(len(classes)).repeat(len(config.site_names) * args.per_site_class)
    sites = [s for s in config.site_names for _ in range(len(classes) * args.per_site_class)]
    hu = sample_volumes(
        gen, labels, generator=torch.Generator().manual_seed(args.seed), sites=sites
    )
    rows["sampled_for_site"] = style(
        real, hu_to_model(hu, window), labels, sites, reference, window
    )
    print("sampled_for_site", json.dumps(rows["sampled_for_site"]), flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "generator": args.generator,
        "split": "train (sources), holdout (site means, standardisation)",
        "sampling": gen.config.sampling.model_dump(),
        "per_site_class": args.per_site_class,
        "seed": args.seed,
        "sources": rows,
        "wall_s": round(time.perf_counter() - start),
        "command": bench_command("site_style_source.py", args),
    }
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
